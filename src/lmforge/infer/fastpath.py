"""A lean decode step for Llama-style models: the same math as `Transformer.forward` with T=1, in about 25 tensor
calls per layer (views included) instead of about 50.

    dec = FastDecoder(model)                  # cheap: reuses the model's cached inference weights
    logits = dec.step(tokens, cache)          # tokens (B, 1) -> logits (B, V); writes slot cache.pos, advances it
    logits = dec.step(tokens, cache, attn_mask=pad)   # left-padded rows: pad (B, cache.pos + 1), True = real

Why: at batch 1 on CPU a small model's decode step is dominated by per-op dispatch (each aten call costs a few
microseconds), not by FLOPs, and a larger model's step is bound by reading the weights once, plus that overhead.
So the step keeps the residual stream 2-D (B, D) and spends as few ops as it can:
  - RMSNorm is a vector norm and 4 cheap elementwise ops (see _rms_norm);
  - q/k/v (and gate/up) are one matmul each, on the model's cached (in, out) weights (`inference_weight`);
  - RoPE for the single new position rotates q, k AND v in 3 ops: x * COS + flip(x) * SIN, where flip swaps
    the two halves of each head (rotate_half up to sign) and the sign, the attention scale 1/sqrt(hd)
    (folded into q) and "no rotation" for v (COS=1, SIN=0) live in COS/SIN, built once per step from a
    cos/sin table and shared by every layer;
  - the rotated k and v are written into the cache with one copy each;
  - attention is one SDPA call (grouped-query heads without copies);
  - the residual adds ride on the output matmuls: x = addmm(x, y, W_o) and x = addmm(x, h, W_down).
No Python objects are touched per layer beyond a tuple of prepacked tensors.

Native step: when `lmforge.infer.native` builds on this machine (a C++ compiler and ninja; compiled once, cached),
`step` runs the whole stack in one C++ call instead: every matmul through a packed-weight kernel that reads each
weight once for all rows of the step (the packed copy is made on the first step and kept on the model, so it
costs a second copy of the weights in memory), and plain loops for everything between them (the gain is largest
for small models, where dispatch dominates, and for batches, where the weights are read once for every row;
bench/decode.py measures it). `FastDecoder(model, native=False)` keeps the PyTorch ops; `dec.native` says which
one runs. Both are tested against the module path.

Supported (`supports(cfg)`): RoPE, RMSNorm, SwiGLU, no biases, no qk-norm — Llama/Mistral-style configs; fp32
weights outside autocast. Anything else stays on the module path. The weights are looked up from the model's
inference cache when the decoder is built (it is rebuilt for every engine run, so training in between is seen).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.transformer import SDPA_GQA, Attention, Block, FeedForward, KVCache, RMSNorm, Transformer, \
    inference_weight


_NO_MASK = torch.empty(0, 0, dtype=torch.bool)      # "no padding" / "positions = pos" for the C++ step
_NO_POSITIONS = torch.empty(0, dtype=torch.long)


def supports(cfg) -> bool:
    """Whether FastDecoder computes exactly what Transformer.forward does for this config."""
    return (cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.ffn == "swiglu" and cfg.final_norm
            and not (cfg.bias or cfg.qkv_bias or cfg.qk_norm) and (SDPA_GQA or cfg.n_kv_heads == cfg.n_head))


def usable(model) -> bool:
    """supports(model.config), fp32 weights, no autocast (it would change the matmul precision), and the stock
    modules (a wrapped projection, e.g. an adapter, has its own forward the fast path would skip)."""
    if type(model) is not Transformer or not supports(model.config):
        return False
    w = model.tok_emb.weight
    if w.dtype != torch.float32 or torch.is_autocast_enabled(w.device.type) or type(model.norm) is not RMSNorm:
        return False
    for blk in model.blocks:
        if not (type(blk) is Block and type(blk.attn) is Attention and type(blk.ffn) is FeedForward
                and type(blk.attn_norm) is RMSNorm and type(blk.ffn_norm) is RMSNorm):
            return False
        mods = [getattr(blk.attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mods += [getattr(blk.ffn, n) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not nn.Linear or m.weight.dtype != torch.float32 for m in mods):
            return False
    return type(model.lm_head) is nn.Linear


class FastDecoder:
    """Decode steps (T=1) for a `Transformer` whose config `supports`. Build it under no_grad/inference_mode
    (the engine does) right before decoding; rebuild it after the model's weights change."""

    def __init__(self, model, native: bool | None = None):
        cfg = model.config
        if not supports(cfg):
            raise ValueError("FastDecoder needs a RoPE + RMSNorm + SwiGLU config without biases or qk-norm")
        self.cfg = cfg
        self.H, self.Hkv, self.hd = cfg.n_head, cfg.n_kv_heads, cfg.head_dim
        self.emb = model.tok_emb.weight
        self.inv_freq = model._rope_inv_freq(self.emb.device)

        def mat(owner, names):  # the (in, out) operand of x @ W, a view when the model keeps (out, in)
            w, _ = inference_weight(owner, names)
            return w if getattr(owner, "transposed_weights", False) else w.t()

        self.layers = [(blk.attn_norm.weight, mat(blk.attn, ("q_proj", "k_proj", "v_proj")),
                        mat(blk.attn, ("o_proj",)), blk.ffn_norm.weight, mat(blk.ffn, ("gate_proj", "up_proj")),
                        mat(blk.ffn, ("down_proj",))) for blk in model.blocks]
        self.norm_w = model.norm.weight
        self.head = mat(model, ("lm_head",))
        H, Hkv, hd = self.H, self.Hkv, self.hd
        dev = self.emb.device
        # COS = cos * w + v1 and SIN = sin * sign * w per head, with w = 1/sqrt(hd) on q heads (the attention
        # scale, folded in), 1 on k heads and 0 on v heads, and v1 = 1 on v heads only (v passes unrotated)
        w = torch.tensor([1.0 / math.sqrt(hd)] * H + [1.0] * Hkv + [0.0] * Hkv, device=dev)[:, None]
        self._head_w = w
        self._v_one = (w == 0).float().expand(-1, hd).contiguous()
        self._cos = self._sin = self.emb.new_empty(0, hd)   # per-position cos / sign*sin rows, grown on demand
        self._eps = torch.full((1,), cfg.norm_eps, device=dev)   # eps + n*n/D in one addcmul
        self._inv_d = 1.0 / cfg.d_model
        # the C++ step (None: PyTorch ops); native=None uses it when it builds here, True insists
        self._native = self._ext = None
        self._owner, self._packed_set = model, False
        if native is not False and dev.type == "cpu":
            from lmforge.infer import native as native_ext
            ext = native_ext.load()
            if ext is None and native:
                raise RuntimeError(native_ext.why_not() or "native decode step unavailable")
            if ext is not None:
                self._ext = ext
                self._native = ext.NativeDecoder(self.emb.contiguous(), [t for lay in self.layers for t in lay],
                                                 self.norm_w.contiguous(), self.head, H, Hkv, hd, cfg.norm_eps)

    def argmax(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """logits[:, :vocab].argmax(-1), through the C++ step's module when it runs (torch's reduction call
        costs a noticeable share of a small model's token)."""
        if self._ext is not None and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1 \
                and logits.device.type == "cpu":
            return self._ext.argmax_rows(logits, vocab)
        return logits[:, :vocab].argmax(dim=-1)

    @property
    def native(self) -> bool:
        """Whether steps run through the C++ decode step."""
        return self._native is not None

    def _table(self, top: int) -> None:
        """Make sure the cos/sin tables cover positions [0, top)."""
        if top > self._cos.size(0):
            # a table of cos/sin rows, computed as rope_cos_sin does (fp32); rotate_half's sign goes into sin
            n = min(max(2 * top, 256), self.cfg.max_seq_len) if top <= self.cfg.max_seq_len else top
            freqs = torch.arange(n, device=self.emb.device).float()[:, None] * self.inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            half = self.hd // 2
            sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(emb.device)
            self._cos, self._sin = emb.cos(), emb.sin() * sign

    def _rope(self, pos: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """COS, SIN of shape (NH, hd) (one position) or (B, NH, hd) for the positions `pos` (NH = H + 2 Hkv)."""
        self._table((pos if isinstance(pos, int) else int(pos.max())) + 1)
        if isinstance(pos, int):
            cos, sin = self._cos[pos], self._sin[pos]
        else:
            cos, sin = self._cos.index_select(0, pos).unsqueeze(1), self._sin.index_select(0, pos).unsqueeze(1)
        return torch.addcmul(self._v_one, cos, self._head_w), sin * self._head_w

    def step(self, tokens: torch.Tensor, cache: KVCache, attn_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row: tokens (B, 1) -> logits (B, V) for it. Writes cache slot `cache.pos` in every
        layer and advances cache.pos. attn_mask: optional (B, cache.pos + 1) padding mask (True = real token),
        as Transformer.forward takes it; positions then count real tokens (or pass position_ids (B, 1))."""
        H, Hkv, hd = self.H, self.Hkv, self.hd
        B = tokens.size(0)
        pos = cache.pos
        S = pos + 1
        if S > cache.max_len:
            raise ValueError(f"KV cache is full: {pos} + 1 tokens > max_len {cache.max_len}")
        mask = None
        if attn_mask is not None:
            if attn_mask.shape != (B, S):
                raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}, expected {(B, S)}")
            pad = attn_mask.bool()
            if pad.stride(1) != 1:
                pad = pad.contiguous()
            mask = pad[:, None, None, :]                           # the new token is real: it sees itself
            if position_ids is None:
                position_ids = pad.sum(-1) - 1
        # positions must stay below max_seq_len (padding slots take cache room but no position)
        if S > self.cfg.max_seq_len and (position_ids is None or int(position_ids.max()) >= self.cfg.max_seq_len):
            raise ValueError(f"sequence exceeds max_seq_len {self.cfg.max_seq_len}")
        if self._native is not None and cache.k.dtype == torch.float32 and cache.k.is_contiguous() \
                and cache.v.is_contiguous():
            self._table(S)    # positions never exceed the slot index
            self._use_packed()
            logits = self._native.step(
                tokens.reshape(B, 1).long().contiguous(),
                _NO_POSITIONS if position_ids is None else position_ids.reshape(B).long().contiguous(),
                pad if mask is not None else _NO_MASK, cache.k, cache.v, pos, self._cos, self._sin)
            cache.pos = S
            return logits
        if position_ids is not None:
            COS, SIN = self._rope(position_ids.reshape(B))
        else:
            COS, SIN = self._rope(pos)

        D = self.emb.size(1)
        k_slot, v_slot = cache.k[:, :, :, pos], cache.v[:, :, :, pos]   # (L, B, Hkv, hd) views: this step's slot
        keys, values = cache.k[:, :, :, :S].unbind(0), cache.v[:, :, :, :S].unbind(0)
        k_slot, v_slot = k_slot.unbind(0), v_slot.unbind(0)
        x = F.embedding(tokens.reshape(B), self.emb)              # (B, D)
        rms, NH, half = self._rms_norm, H + 2 * Hkv, hd // 2
        for i, (n1, w_qkv, w_o, n2, w_gu, w_down) in enumerate(self.layers):
            qkv = (rms(x, n1) @ w_qkv).view(B, NH, hd)
            # RoPE on q and k (+ the q scale): x * COS + [x2, x1] * SIN, the halves swapped by one flip
            qkv = torch.addcmul(qkv * COS, qkv.view(B, NH, 2, half).flip(2).view(B, NH, hd), SIN)
            q, k, v = qkv.split_with_sizes([H, Hkv, Hkv], dim=1)
            k_slot[i].copy_(k)
            v_slot[i].copy_(v)
            y = F.scaled_dot_product_attention(q.unsqueeze(2), keys[i], values[i], attn_mask=mask, scale=1.0,
                                               enable_gqa=Hkv != H)
            x = torch.addmm(x, y.view(B, H * hd), w_o)
            gate, up = (rms(x, n2) @ w_gu).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w_down)
        cache.pos = S
        return rms(x, self.norm_w) @ self.head

    def extend(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """T new tokens per row in one pass (a speculative verify: the last token and K proposals): tokens (B, T)
        -> logits (B, T, V), token t attending to the cache and to tokens <= t; writes slots cache.pos.. and
        advances cache.pos by T. Each weight is read once for all B*T positions, so on a memory-bound model this
        costs about one decode step. None when the C++ step does not run here (the caller uses the model)."""
        B, T = tokens.shape
        pos = cache.pos
        if self._native is None or cache.k.dtype != torch.float32 or not (cache.k.is_contiguous()
                                                                            and cache.v.is_contiguous()):
            return None
        if pos + T > cache.max_len or pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence exceeds the cache ({cache.max_len}) or max_seq_len ({self.cfg.max_seq_len})")
        self._table(pos + T)
        self._use_packed()
        logits = self._native.step(tokens.long().contiguous(), _NO_POSITIONS, _NO_MASK, cache.k, cache.v, pos,
                                   self._cos, self._sin)
        cache.pos = pos + T
        return logits.view(B, T, -1)

    def _use_packed(self) -> None:
        """Hand the C++ step packed copies of the weights, kept on the model (keyed by the weights' storage and
        version) so that decoders built one after another for the same weights -- every engine run and every
        speculative generation builds one -- pack once, not once each."""
        if self._packed_set:
            return
        mats = [w for lay in self.layers for w in (lay[1], lay[2], lay[4], lay[5])] + [self.head]
        # the parameters' versions (an optimizer step bumps them) and the operands' storage: the inference copies
        # can be inference tensors, which keep no version of their own
        key = (tuple((q.data_ptr(), q._version) for q in self._owner.parameters())
               + tuple((w.data_ptr(), tuple(w.shape), tuple(w.stride())) for w in mats))
        cached = self._owner.__dict__.get("_native_packed")
        if cached is None or cached[0] != key:
            cached = (key, [self._ext.pack_panels(w) for w in mats])
            self._owner.__dict__["_native_packed"] = cached
        self._native.set_packed(cached[1][:-1], cached[1][-1])
        self._packed_set = True

    def _rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * w for 2-D fp32 x in 5 cheap ops: a vector norm is one fast reduction
        (mean() and the fused F.rms_norm cost several times more per call on CPU at this size)."""
        n = torch.linalg.vector_norm(x, 2, -1, keepdim=True)
        return torch.mul(x, torch.addcmul(self._eps, n, n, value=self._inv_d).rsqrt_()).mul_(w)


__all__ = ["FastDecoder", "supports", "usable"]
