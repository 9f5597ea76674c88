"""Next-token cross-entropy fused with the output projection, in row chunks.

The plain path materialises (tokens x vocab) logits, their log-softmax and its gradient: three passes over a
buffer that is tens of MB for an ordinary batch, far larger than any cache, so on a CPU the softmax costs more
than the head's matmul. Here each chunk of rows goes through matmul -> softmax -> gradient while its logits are
still in cache, and the gradients w.r.t. the hidden states and the head weight are formed right away (the loss
is the end of the graph, so they only wait to be scaled by the incoming gradient). Nothing of size tokens x vocab
outlives a chunk, which also saves that memory on every device.

The result equals `F.cross_entropy(x @ weight.T, targets)` weighted per row, in fp32 (tested against it).
"""
from __future__ import annotations

import torch

# rows per chunk: chunk logits of about this many floats (4 MB) stay in a last-level cache yet keep the
# matmuls large enough to run at full speed
CHUNK_FLOATS = 1 << 20


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, row_scale):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = x.size(0), weight.size(0)
        rows = max(1, CHUNK_FLOATS // V)
        safe = targets.clamp(min=0)
        acc = torch.promote_types(weight.dtype, torch.float32)     # softmax and sums in fp32 (fp64 stays fp64)
        loss = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        w_t = weight.t()
        for s in range(0, N, rows):
            xc, tc, sc = x[s: s + rows], safe[s: s + rows, None], row_scale[s: s + rows, None]
            logits = torch.mm(xc, w_t).to(acc)
            target_logit = logits.gather(1, tc)
            m = logits.amax(1, keepdim=True)
            probs = logits.sub_(m).exp_()                   # in place: the chunk's only (rows x vocab) buffer
            total = probs.sum(1, keepdim=True)
            loss += ((total.log() + m - target_logit) * sc).sum()
            if grad_x is None and grad_w is None:
                continue
            # d loss / d logits = (softmax - onehot(target)) * row weight
            probs.mul_(sc / total)
            probs.scatter_add_(1, tc, -sc)
            g = probs.to(x.dtype)                          # autocast runs the matmuls below in bf16 too
            if need_x:
                grad_x[s: s + rows] = torch.mm(g, weight)
            if need_w:
                grad_w += torch.mm(g.t(), xc)              # summed in fp32 across chunks
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad_loss.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         loss_mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """sum or mean over rows of cross_entropy(x @ weight.T, targets) * mask, as one scalar.

    x (..., d), weight (V, d), targets (...) with -1 = ignored, loss_mask (...) optional weights; 'mean' divides by
    the total weight of the non-ignored rows. Gradients flow to x and weight (not to the mask)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    x2 = x.reshape(-1, x.size(-1))
    t = targets.reshape(-1)
    acc = torch.promote_types(weight.dtype, torch.float32)
    scale = (t != -1).to(acc)
    if loss_mask is not None:
        scale = scale * loss_mask.reshape(-1).to(acc)
    if reduction == "mean":
        scale = scale / scale.sum().clamp(min=1e-8)
    return _LinearCrossEntropy.apply(x2, weight, t, scale)
