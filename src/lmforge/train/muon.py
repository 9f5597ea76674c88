"""Muon for the hidden weight matrices, AdamW for everything else, behind one optimizer object.

Muon (Keller Jordan, 2024: https://kellerjordan.github.io/posts/muon/) is SGD with Nesterov momentum whose
update, for each 2-D weight, is replaced by the nearest semi-orthogonal matrix U V^T (G = U S V^T). Every
direction of the update then moves by the same amount, instead of the few dominant directions of the raw
gradient taking nearly all of the step. The orthogonalisation is not an SVD but five steps of a quintic
Newton–Schulz iteration: only matmuls, cheap, and stable in bf16.

Only *hidden* matrices get Muon. Embedding rows are looked up, not multiplied, and the LM head maps to
logits; both (and norms' gains, and biases) keep AdamW, as Keller Jordan, modded-nanogpt and nanochat do.

Update size. An orthogonalised update of shape (rows, cols) = (fan_out, fan_in) has entry RMS
1/sqrt(max(rows, cols)), so unscaled, tall matrices (e.g. an FFN's up projection) would take smaller steps than
square ones. We multiply by sqrt(max(1, rows/cols)) — Keller Jordan's rule, torch.optim.Muon's "original" —
which makes the entry RMS lr/sqrt(fan_in) for every shape. With this rule lr ≈ 0.02 is the well-tested
default. (Moonshot's alternative, 0.2·sqrt(max(rows, cols)), matches AdamW's update RMS so AdamW's lr can be
reused; we keep one rule and a separate `muon_lr`.)

CPU cost: Newton–Schulz is 5·(4m²n + 2m³) FLOPs per matrix per step (m, n = min, max of its shape), whatever
the batch; on a CPU with small batches it can cost more than the forward/backward (bench/muon.py prints
s/step), so prefer more tokens per step with Muon there.

Weight decay is decoupled, as in AdamW: W ← W·(1 − lr·wd) before the update, with Muon's own lr.

Schedule. The trainer writes the scheduled AdamW lr into every group's "lr" each step. A Muon group carries
`lr_scale` = muon_lr / lr, so its effective lr is group["lr"] × lr_scale: both optimizers follow the same
warmup/decay shape, each from its own peak.

Distributed: under DDP every rank holds the full, all-reduced gradient, so each rank runs the same Muon
update on its own copy (redundant compute, no extra communication). FSDP shards matrices across ranks, and
Newton–Schulz needs whole matrices; FSDP + Muon is refused at config time (TrainConfig).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from lmforge.errors import CheckpointError, ConfigError

# Quintic Newton–Schulz coefficients published with Muon (Keller Jordan): chosen to maximise the slope at
# zero so small singular values grow fast. The iteration does not converge to exactly 1: after 5 steps the
# singular values land in roughly [0.7, 1.2], which trains as well as an exact U V^T.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise G (..., rows, cols): U S V^T -> U S' V^T with S' ≈ 1. Returned in `dtype`."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    tall = G.size(-2) > G.size(-1)
    X = G.float()
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is then the smaller one
        X = X.mT
    # Frobenius norm ≥ spectral norm, so this puts every singular value in (0, 1], where the iteration works
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(dtype)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X       # = a X + b (X X^T) X + c (X X^T)^2 X: odd polynomial in X's singular values
    return X.mT if tall else X


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it fast (CUDA SM80+, CPUs with AMX/AVX512-BF16), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
    if device.type == "cpu":
        from lmforge.runtime import cpu_has_fast_bf16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D hidden weight matrices only.

    Per matrix W with gradient G, momentum buffer M (EMA form; the scale is irrelevant after orthogonalising):
        M ← μ M + (1 − μ) G
        U ← G + μ (M − G)  (Nesterov: look ahead along the momentum)   or  U ← M
        O ← NewtonSchulz5(U)
        W ← W (1 − η wd) − η sqrt(max(1, rows/cols)) O,     η = group["lr"] × group["lr_scale"]

    `ns_dtype`: the Newton–Schulz compute dtype; None picks bf16 where fast (see default_ns_dtype), else fp32.
    """

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, lr_scale: float = 1.0,
                 ns_dtype: torch.dtype | None = None):
        if lr < 0 or lr_scale < 0:
            raise ValueError(f"lr and lr_scale must be ≥ 0, got {lr} and {lr_scale}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be ≥ 1, got {ns_steps}")
        defaults = dict(lr=lr, lr_scale=lr_scale, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
        # a runtime choice like AdamW's `fused`, not optimizer state: kept out of state_dict()
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group["lr_scale"]
            mu, wd = group["momentum"], group["weight_decay"]
            # matrices of one shape are orthogonalised together: a few batched matmuls instead of many small
            # ones (on CPU the per-call overhead of small matmuls dominates Newton-Schulz)
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue  # unused this step (e.g. a frozen branch): leave weights and momentum alone
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mu)
                update = g.lerp(buf, mu) if group["nesterov"] else buf
                by_shape.setdefault((tuple(p.shape), p.device), []).append((p, update))
            for (shape, device), items in by_shape.items():
                dtype = self.ns_dtype or default_ns_dtype(device)
                ortho = newton_schulz(torch.stack([u for _, u in items]), group["ns_steps"], dtype)
                scale = -lr * max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, _), o in zip(items, ortho):
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(o.to(p.dtype), alpha=scale)
        return loss


# ---------------------------------------------------------------------------------------------------------------
# which parameters get Muon

def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)        # torch.compile


def output_head(model: nn.Module) -> nn.Module | None:
    """The layer that produces the model's outputs: `lm_head` (lmforge, HF), HF's get_output_embeddings(),
    or else the last nn.Linear registered (a plain MLP's output layer)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        return head
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and isinstance(get(), nn.Module):
        return get()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights Muon should own: nn.Linear weights other than the output heads' (the LM head and a
    `score` head: reward, value), and not shared with an embedding table (tied heads). Everything else —
    embeddings, heads, norms, biases — stays on AdamW."""
    model = _unwrap(model)
    heads = [h for h in (output_head(model), getattr(model, "score", None)) if isinstance(h, nn.Module)]
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for head in heads:
        embedding_ids |= {id(p) for p in head.parameters()}
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, nn.Linear) and not any(m is h for h in heads):
            w = m.weight
            if w.requires_grad and w.ndim == 2 and id(w) not in embedding_ids and id(w) not in seen:
                seen.add(id(w))
                out.append(w)
    return out


class MuonWithAdamW:
    """One optimizer object over two: `muon` (hidden matrices) and `adamw` (the rest).

    What the trainer uses: `param_groups` (Muon's groups first, then AdamW's: the very dicts the two
    optimizers read, so writing g["lr"] reaches them), step(), zero_grad(), state_dict(), load_state_dict().
    The state dict is {"muon": ..., "adamw": ...}: tensors and plain values only, so torch.load(weights_only=True)
    reads it back.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer | None):
        self.muon, self.adamw = muon, adamw  # adamw None: every trainable tensor is a hidden matrix (rare)
        self._parts = [o for o in (muon, adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self._parts for g in o.param_groups]

    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self._parts:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"muon", "adamw"}:
            raise CheckpointError("the saved optimizer state is not Muon's (was the run started with "
                                  "optimizer=adamw?); resume with the optimizer it was trained with",
                                  field="optimizer")
        try:
            self.muon.load_state_dict(state["muon"])
            if (self.adamw is None) != (state["adamw"] is None):
                raise ValueError("one of the two holds AdamW state, the other none")
            if self.adamw is not None:
                self.adamw.load_state_dict(state["adamw"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the saved optimizer state does not fit this model: {e}",
                                  field="optimizer") from None

    def __repr__(self) -> str:
        n_m = sum(p.numel() for g in self.muon.param_groups for p in g["params"])
        n_a = sum(p.numel() for g in self.adamw.param_groups for p in g["params"]) if self.adamw else 0
        return f"MuonWithAdamW(muon: {n_m:,} params, adamw: {n_a:,} params)"


def build_muon_with_adamw(model: nn.Module, groups: list[dict], *, lr: float, muon_lr: float,
                          muon_momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.95),
                          eps: float = 1e-8, fused: bool | None = None,
                          ns_dtype: torch.dtype | None = None) -> MuonWithAdamW:
    """Split the model's optimizer `groups` ({"params", "weight_decay"} dicts, e.g. from the trainer's
    param_groups) into Muon groups (hidden matrices, keeping their group's weight decay; lr_scale = muon_lr/lr)
    and AdamW groups (the rest, at `lr`)."""
    hidden = {id(p) for p in hidden_matrices(model)}
    muon_groups, adamw_groups = [], []
    for g in groups:
        ps = g["params"]
        mine = [p for p in ps if id(p) in hidden]
        rest = [p for p in ps if id(p) not in hidden]
        if mine:
            muon_groups.append({**g, "params": mine, "lr": lr, "lr_scale": muon_lr / lr})
        if rest:
            adamw_groups.append({**g, "params": rest})
    if not muon_groups:
        raise ConfigError("optimizer=muon, but this model has no hidden weight matrices for Muon "
                          "(only embeddings, the output head, norms or biases); use optimizer=adamw",
                          field="optimizer")
    muon = Muon(muon_groups, lr=lr, momentum=muon_momentum, lr_scale=muon_lr / lr, ns_dtype=ns_dtype)
    adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused) if adamw_groups else None
    return MuonWithAdamW(muon, adamw)
