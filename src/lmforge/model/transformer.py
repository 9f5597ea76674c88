"""The decoder-only Transformer: embeddings -> N x (pre-norm attention + pre-norm FFN, residuals) -> norm -> head.

Read top-down: rotary/sinusoidal helpers, the KV cache, attention, FFN, block, then the model.

Conventions worth knowing before importing weights:
- q/k/v/o are separate Linears shaped like Hugging Face Llama's (q_proj, k_proj, v_proj, o_proj), FFNs are
  (gate_proj, up_proj, down_proj) for SwiGLU and (up_proj, down_proj) otherwise, so Llama/Qwen/Mistral weights
  copy over by renaming only. GPT-2's fused Conv1D c_attn must be transposed and split.
- RoPE follows the HF Llama "rotate_half" convention: the head dimension is split into two halves
  [x1, x2] (not interleaved pairs) and rotated as (x1*cos - x2*sin, x2*cos + x1*sin), with frequency i shared
  by channels i and i + head_dim/2. Meta's original checkpoints pair adjacent channels instead; HF's converter
  permutes q/k weights once, so HF weights need no permutation here.
- Masks are boolean, True = may attend.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.loss import linear_cross_entropy

# grouped-query attention inside SDPA (no K/V copies) arrived in torch 2.5
SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ---------------------------------------------------------------------------------------------------------------
# positions

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/head_dim), i < head_dim/2, optionally rescaled for long context."""
    # fp32, as Meta's and HF's reference code compute it: pretrained weights were trained with these values
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is not None:
        factor = scaling["factor"]
        if scaling["rope_type"] == "linear":  # positions divided by factor == frequencies divided by factor
            inv_freq = inv_freq / factor
        elif scaling["rope_type"] == "llama3":
            # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended
            # linearly in 1/wavelength.
            old_len = scaling["original_max_position_embeddings"]
            lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
            wavelen = 2 * math.pi / inv_freq
            smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
            inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, T, head_dim) for positions (B, T), in fp32 whatever autocast says."""
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """Rotate x (B, H, T, hd) — or (B, T, H, hd) with heads_dim=2 — by the angles in cos/sin (B, T, hd);
    HF rotate_half convention."""
    cos, sin = cos.unsqueeze(heads_dim).to(x.dtype), sin.unsqueeze(heads_dim).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def sinusoidal_embedding(position_ids: torch.Tensor, d_model: int) -> torch.Tensor:
    """Vaswani et al. fixed positions: channel 2i = sin(p / 10000^(2i/d)), channel 2i+1 = cos(same)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2, device=position_ids.device).float() / d_model))
    angles = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # interleave sin/cos


# ---------------------------------------------------------------------------------------------------------------
# KV cache

# Under CPU bf16 autocast, compute attention with plain matmuls instead of SDPA (see Attention.forward).
CPU_MATMUL_ATTENTION = True


class KVCache:
    """Preallocated keys/values for incremental decoding: (n_layer, batch, n_kv_heads, max_len, head_dim) each.

    `pos` is the write column: the model writes slots [pos, pos+T) of every row in every layer and advances
    `pos` by T at the end of its forward. Set `pos` back to discard tokens (e.g. speculation).

    Rows of different lengths share the write column by being right-aligned: row b's real tokens sit in
    [pos - lengths[b], pos) and the columns before are padding, which an attention mask hides
    (`padding_mask`). `lengths` is None while every row holds `pos` tokens. A continuously batched engine keeps
    rows of different ages this way: `append_rows` adds freshly prefilled rows (aligned to the write column),
    `select_rows` drops finished ones, `compact` and `reserve` keep the column range as short as the rows need.
    """

    def __init__(self, batch: int, max_len: int, n_layer: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len, self.pos = batch, max_len, 0
        self.lengths: torch.Tensor | None = None   # (batch,) int64 real tokens per row; None = pos for every row

    def reset(self) -> None:
        self.pos = 0
        self.lengths = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, n_kv, T, hd) at [pos, pos+T) of `layer`; return all keys/values [0, pos+T)."""
        T = k.size(2)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {T} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    # ---- rows of different lengths ----
    def row_lengths(self) -> torch.Tensor:
        if self.lengths is None:
            return torch.full((self.batch,), self.pos, dtype=torch.long, device=self.k.device)
        return self.lengths

    def padded(self) -> bool:
        """Whether some row has padding columns (then attention needs `padding_mask`)."""
        return self.lengths is not None and bool((self.lengths != self.pos).any())

    def padding_mask(self, extra: int = 0) -> torch.Tensor:
        """(batch, pos + extra) bool: True on each row's real tokens; the `extra` columns about to be written
        (the next forward's tokens) are real for every row."""
        cols = torch.arange(self.pos + extra, device=self.k.device)
        return cols[None, :] >= (self.pos - self.row_lengths())[:, None]

    def grow(self, tokens: int) -> None:
        """Count `tokens` more real tokens in every row (after a forward that wrote them for all rows)."""
        if self.lengths is not None:
            self.lengths = self.lengths + tokens

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (in that order, repeats allowed): fan a prompt out to n completions, drop
        finished rows, reorder beams. Copies only the filled slots into a cache of the same max_len."""
        rows = torch.as_tensor(rows, device=self.k.device)
        k = self.k.new_zeros((self.k.size(0), len(rows)) + tuple(self.k.shape[2:]))
        v = torch.zeros_like(k)
        k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos].index_select(1, rows)
        v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos].index_select(1, rows)
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, rows)
        self.k, self.v, self.batch = k, v, len(rows)

    def compact(self) -> None:
        """Drop the leading columns that are padding in every row (rows left since they were needed)."""
        if self.batch == 0:
            self.pos = 0
            return
        shift = self.pos - int(self.row_lengths().max())
        if shift > 0:
            self._move(-shift)

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more writes: compact, then reallocate if the cache is still too short."""
        self.compact()
        if self.pos + columns > self.max_len:
            self._resize(self.pos + columns)

    def append_rows(self, other: "KVCache") -> None:
        """Add the rows of `other` (filled up to its own pos) after this cache's rows, right-aligned to this
        cache's write column. Make room with `reserve` afterwards for what the rows will still write."""
        a, b = self.k.shape, other.k.shape
        if (a[0], a[2], a[4], self.k.dtype) != (b[0], b[2], b[4], other.k.dtype):
            raise ValueError("append_rows: caches of different models")
        if other.pos > self.pos:     # the newcomers are longer than the write column: make room on the left
            self._move(other.pos - self.pos)
        lengths = torch.cat([self.row_lengths(), other.row_lengths()])
        shape = list(self.k.shape)
        shape[1] = other.batch
        start = self.pos - other.pos
        for name in ("k", "v"):
            extra = getattr(self, name).new_zeros(shape)
            extra[:, :, :, start:self.pos] = getattr(other, name)[:, :, :, :other.pos]
            setattr(self, name, torch.cat([getattr(self, name), extra], dim=1))
        self.batch += other.batch
        self.lengths = lengths

    def _move(self, shift: int) -> None:
        """Shift every row's filled columns by `shift` (< 0: left, dropping leading padding; > 0: right, adding
        it) and the write column with them."""
        pos = self.pos + shift
        if pos > self.max_len:
            self._resize(pos)
        lo = max(0, -shift)
        for name in ("k", "v"):
            t = getattr(self, name)
            moved = t[:, :, :, lo:self.pos].clone()
            if shift > 0:
                t.zero_()    # the new leading padding must hold finite values (masked: weight 0, but 0 * NaN = NaN)
            t[:, :, :, lo + shift:pos] = moved
        lengths = self.row_lengths()
        self.pos = pos
        self.lengths = lengths

    def _resize(self, max_len: int) -> None:
        for name in ("k", "v"):
            t = getattr(self, name)
            new = t.new_zeros(t.shape[:3] + (max_len,) + t.shape[4:])
            n = min(self.pos, max_len)
            new[:, :, :, :n] = t[:, :, :, :n]
            setattr(self, name, new)
        self.max_len = max_len


# ---------------------------------------------------------------------------------------------------------------
# layers

def inference_linear(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """x @ [W_a; W_b; ...]^T + b: one or more projections of the same input as ONE matmul, for inference.

    Decoding runs M=1 matmuls, whose cost on CPU is call overhead and how the weight is laid out: q/k/v (and
    gate/up) in one call saves calls, and with `owner.transposed_weights` set (Transformer.use_transposed_weights)
    the weight is kept as a contiguous (in, out) copy, which x @ W reads about twice as fast as (out, in) at M=1.
    The combined weight is cached on `owner` and rebuilt when a source tensor changed (an optimizer step bumps its
    version), so sampling between training steps stays correct. Training uses the modules themselves."""
    transposed = getattr(owner, "transposed_weights", False)
    mods = [getattr(owner, n) for n in names]
    if len(names) == 1 and not transposed:
        return mods[0](x)
    if any(type(m) is not nn.Linear for m in mods):
        # a wrapped projection (a LoRA adapter) computes more than x W^T + b: let it run its own forward
        ys = [m(x) for m in mods]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    if transposed and x.numel() >= 16 * x.size(-1):
        # many rows (a prefill): MKL is faster on the (out, in) layout there (notably on wide matrices),
        # so use the modules' own weights; the (in, out) copy is for the 1-row decode steps
        ys = [F.linear(x, m.weight, m.bias) for m in mods]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    w, b = inference_weight(owner, names)
    if not transposed:
        return F.linear(x, w, b)
    y = x @ w
    return y + b if b is not None else y


def inference_weight(owner: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cached combined (weight, bias) inference_linear uses: (in, out) if `owner.transposed_weights`, else
    (out, in). Shared with lmforge.infer.fastpath so the decode fast path holds no second copy."""
    transposed = getattr(owner, "transposed_weights", False)
    mods = [getattr(owner, n) for n in names]
    key = (transposed,) + tuple((m.weight.data_ptr(), m.weight._version, m.weight.dtype, m.weight.device)
                                for m in mods)
    cache = owner.__dict__.setdefault("_infer_w", {})
    cached = cache.get(names)
    if cached is None or cached[0] != key:
        w = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight
        b = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
        cached = cache[names] = (key, w.t().contiguous() if transposed else w, b)
    return cached[1], cached[2]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as HF Llama does, so bf16 results match)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_heads, self.head_dim = cfg.n_head, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.o_proj.is_residual_proj = True
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, kv_cache, return_attn):
        B, T, _ = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_heads, self.head_dim
        infer = not (torch.is_grad_enabled() or self.training)
        if not infer:
            q = self.q_proj(x).view(B, T, H, hd)
            k = self.k_proj(x).view(B, T, Hkv, hd)
            v = self.v_proj(x).view(B, T, Hkv, hd)
        else:  # inference: one matmul, one RoPE over q and k together (fewer ops per decoded token)
            q, k, v = inference_linear(self, ("q_proj", "k_proj", "v_proj"), x).view(B, T, H + 2 * Hkv, hd) \
                .split([H, Hkv, Hkv], dim=2)
            if rope is not None and self.q_norm is None:
                qk = apply_rope(torch.cat([q, k], dim=2), *rope, heads_dim=2)
                q, k, rope = qk[:, :, :H], qk[:, :, H:], None
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)

        is_causal = isinstance(mask, str)  # "causal": the common training case, let SDPA build it
        attn_mask = None if is_causal else mask
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if return_attn:
            # explicit softmax(q k^T / sqrt(hd)) so the weights we return are the ones used
            groups = self.n_head // self.n_kv_heads
            k_, v_ = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = (q.float() @ k_.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
            if is_causal:
                attn_mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril()
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(-1)
            y = (F.dropout(weights, dropout_p) if dropout_p else weights).to(v_.dtype) @ v_
        elif CPU_MATMUL_ATTENTION and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # On CPU under bf16 autocast, SDPA's fused kernel is slow (its backward especially): plain matmuls
            # (autocast runs them as fast bf16 GEMMs) with the softmax in fp32 are faster per training step
            # (tested against SDPA for equal results).
            groups = self.n_head // self.n_kv_heads
            if groups > 1:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if is_causal:
                attn_mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril()
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            p = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
            y = (F.dropout(p, dropout_p) if dropout_p else p) @ v
        elif self.n_kv_heads != self.n_head and SDPA_GQA:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal, enable_gqa=True)
        else:
            groups = self.n_head // self.n_kv_heads
            if groups > 1:
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        if infer:
            return inference_linear(self, ("o_proj",), y), weights
        return self.resid_drop(self.o_proj(y)), weights


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.gelu_approx = cfg.ffn, cfg.gelu_approx
        if cfg.ffn == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.down_proj.is_residual_proj = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        infer = not (torch.is_grad_enabled() or self.training)   # inference: fused, cached weights
        if self.kind == "swiglu":
            if infer:
                gate, up = inference_linear(self, ("gate_proj", "up_proj"), x).chunk(2, dim=-1)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            h = F.silu(gate) * up
        else:
            u = inference_linear(self, ("up_proj",), x) if infer else self.up_proj(x)
            if self.kind == "gelu":
                h = F.gelu(u, approximate=self.gelu_approx)
            elif self.kind == "relu":
                h = F.relu(u)
            else:  # relu2 (Primer): relu(x)^2
                h = F.relu(u).square()
        return inference_linear(self, ("down_proj",), h) if infer else self.drop(self.down_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = make_norm(cfg, cfg.d_model)
        self.ffn = FeedForward(cfg)

    def forward(self, x, rope, mask, kv_cache, return_attn):
        a, weights = self.attn(self.attn_norm(x), rope, mask, kv_cache, return_attn)
        x = x + a
        x = x + self.ffn(self.ffn_norm(x))
        return x, weights


# ---------------------------------------------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.d_model) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.score = nn.Linear(cfg.d_model, cfg.score_dim, bias=False) if cfg.score_dim else None
        # RoPE frequencies are a pure function of the config: kept per device outside the state dict (not a
        # buffer, so a model built on the meta device and filled by load_state_dict still gets correct ones)
        self._rope_freqs: dict[torch.device, torch.Tensor] = {}
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # N(0, init_std); projections that write into the residual stream get init_std / sqrt(2 * n_layer)
        # so the residual's variance does not grow with depth (GPT-2 paper, nanoGPT).
        std = self.config.init_std
        if any(p.is_meta for p in module.parameters(recurse=False)):
            return  # shapes only (e.g. before loading a checkpoint): nothing to fill, and normal_ on meta is slow
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # ---- forward ----
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, return_attn: bool = False,
                loss_mask: torch.Tensor | None = None, reduction: str = "mean", logits_to_keep: int = 0,
                return_logits: bool = True, return_scores: bool = False):
        """Run the model on token ids `idx` (B, T).

        targets:      (B, T) next-token ids, -1 = ignored. Gives `loss` (cross-entropy in fp32).
        loss_mask:    (B, T) weights (bool or float) multiplied into the per-token loss; 'mean' divides by
                      their sum over non-ignored targets (e.g. assistant-only SFT loss).
        reduction:    'mean' (scalar), 'sum' (scalar), or 'none' ((B, T) per-token loss, 0 where ignored).
        attn_mask:    (B, S) padding mask, 1/True = real token, covering every key the call attends to
                      (S = cached tokens + T); or a (B|1, 1|H, T, S) boolean mask used as given.
                      Causality is always added to a padding mask.
        position_ids: (B, T). Default: with a padding mask, the count of real tokens before each token (so left-
                      and right-padded rows get 0, 1, 2, ... on their real tokens); else cache.pos + arange(T).
        kv_cache:     a KVCache; this call fills slots [cache.pos, cache.pos + T) and advances cache.pos.
        return_attn:  also return a list of per-layer attention weights (B, H, T, S), computed explicitly.
        logits_to_keep: 0 = logits for every position; k > 0 = only the last k (inference needs the last one).
        return_logits: False skips the LM head's logits (None): with targets (reduction 'mean' or 'sum') the head is
                      fused with the loss in row chunks (model/loss.py), the same loss and gradients without a
                      (B, T, vocab) tensor; without targets only the score head runs.
        return_scores: also return the score head's output (B, T, score_dim) (config.score_dim > 0): a reward
                      model's or value head's numbers at every position.
        Returns (logits, loss) — loss None without targets — then attentions with return_attn, then scores with
        return_scores.
        """
        cfg = self.config
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        S = past + T
        pad = None
        if attn_mask is not None and attn_mask.dim() == 2:
            if attn_mask.shape != (B, S):
                raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}, expected {(B, S)} "
                                 f"(cached + new tokens)")
            pad = attn_mask.bool()
        # the limit is on positions: padding slots (left-padded batches) take cache room but no position
        longest = S if pad is None or position_ids is not None else int(pad.sum(-1).max())
        if longest > cfg.max_seq_len:
            raise ValueError(f"sequence of {longest} tokens exceeds max_seq_len {cfg.max_seq_len}")
        if position_ids is None:
            if pad is not None:
                position_ids = (pad.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, S, device=idx.device).unsqueeze(0).expand(B, T)

        x = self.tok_emb(idx)
        if cfg.pos == "learned":
            x = x + self.pos_emb(position_ids)
        elif cfg.pos == "sinusoidal":
            # Vaswani et al. scale the embeddings by sqrt(d_model) so the unit-amplitude sinusoids don't drown them
            x = x * math.sqrt(cfg.d_model) + sinusoidal_embedding(position_ids, cfg.d_model).to(x.dtype)
        x = self.emb_drop(x)
        rope = rope_cos_sin(position_ids, self._rope_inv_freq(idx.device)) if cfg.pos == "rope" else None
        mask = self._attention_mask(attn_mask, pad, B, T, past, idx.device)

        attentions = []
        for block in self.blocks:
            x, weights = block(x, rope, mask, kv_cache, return_attn)
            if return_attn:
                attentions.append(weights)
        if kv_cache is not None:
            kv_cache.pos = S
        x = self.norm(x)

        scores = None
        if return_scores:
            if self.score is None:
                raise ValueError("this model has no score head (config.score_dim is 0)")
            scores = self.score(x[:, -logits_to_keep:] if logits_to_keep else x)
        if targets is None:
            x = x[:, -logits_to_keep:] if logits_to_keep else x
            infer = not (torch.is_grad_enabled() or self.training)
            logits = None if not return_logits else \
                inference_linear(self, ("lm_head",), x) if infer else self.lm_head(x)
            loss = None
        elif not return_logits and reduction != "none" and type(self.lm_head) is nn.Linear:
            logits = None                                  # a LoRA-wrapped head takes the plain path below
            loss = linear_cross_entropy(x, self.lm_head.weight, targets, loss_mask, reduction)
        else:
            logits = self.lm_head(x)
            loss = self._loss(logits, targets, loss_mask, reduction)
        out = (logits, loss) + ((attentions,) if return_attn else ()) + ((scores,) if return_scores else ())
        return out

    def _rope_inv_freq(self, device) -> torch.Tensor:
        freqs = self._rope_freqs.get(device)
        if freqs is None:
            cfg = self.config
            freqs = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
            self._rope_freqs[device] = freqs
        return freqs

    @staticmethod
    def _attention_mask(attn_mask, pad, B, T, past, device):
        """A boolean (B|1, 1, T, S) mask, None (attend to everything), or "causal" (let SDPA build it)."""
        if attn_mask is not None and pad is None:
            if attn_mask.dtype != torch.bool or attn_mask.dim() != 4:
                raise ValueError("attn_mask must be a (B, S) padding mask or a boolean (B, H, T, S) mask")
            return attn_mask  # a full mask from the caller
        if pad is None:
            if past == 0 and T > 1:
                return "causal"
            if T == 1:
                return None  # one new token sees every cached one
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        mask = torch.arange(S, device=device)[None, :] <= q_pos  # causal, offset by the cached tokens
        if pad is not None:
            # Padding queries would see no key at all (softmax of all -inf = NaN, which then leaks through the
            # values); let every query see itself. Real queries already do, so they are unchanged.
            mask = (mask & pad[:, None, :]) | (torch.arange(S, device=device)[None, :] == q_pos)
            return mask[:, None]  # (B, 1, T, S)
        return mask[None, None]

    @staticmethod
    def _loss(logits, targets, loss_mask, reduction):
        V = logits.size(-1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # fp32 at least
        per_tok = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1,
                                  reduction="none").view(targets.shape)
        valid = (targets != -1).to(per_tok.dtype)
        weights = valid if loss_mask is None else valid * loss_mask.to(per_tok.dtype)
        per_tok = per_tok * weights
        if reduction == "none":
            return per_tok
        if reduction == "sum":
            return per_tok.sum()
        if reduction == "mean":
            return per_tok.sum() / weights.sum().clamp(min=1e-8)
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    # ---- helpers ----
    def use_transposed_weights(self, enabled: bool = True) -> None:
        """Inference on CPU: keep (in, out) copies of the matmul weights (see inference_linear). Costs one more
        copy of those weights in memory; training is unaffected (it uses the parameters)."""
        for m in [self] + [mod for blk in self.blocks for mod in (blk.attn, blk.ffn)]:
            if getattr(m, "transposed_weights", False) != enabled:  # every Engine calls this: keep built copies
                m.transposed_weights = enabled
                m.__dict__.pop("_infer_w", None)

    def new_kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                     device=None) -> KVCache:
        cfg = self.config
        w = self.tok_emb.weight
        return KVCache(batch, max_len or cfg.max_seq_len, cfg.n_layer, cfg.n_kv_heads, cfg.head_dim,
                       dtype=dtype or w.dtype, device=device or w.device)

    def num_params(self) -> dict[str, int]:
        """total (tied weights once), embedding (token + learned position tables), non_embedding (the rest,
        which includes an untied LM head: it is a matmul run for every token)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        emb = self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return {"total": total, "embedding": emb, "non_embedding": total - emb}

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at context `seq_len` (PaLM appendix B / nanoGPT):

            6 * N  +  12 * n_layer * n_head * head_dim * seq_len

        N = parameters used in matmuls = non_embedding + the LM head when tied (its matmul still runs; the
        lookup tables do no FLOPs). Each weight costs 2 FLOPs forward and 4 backward per token; the attention
        scores and weighted sum cost 2 * 2 * seq_len * head_dim per head forward, x3 with backward (causal
        masking's saving is ignored, as is customary)."""
        cfg = self.config
        seq_len = seq_len or cfg.max_seq_len
        n = self.num_params()["non_embedding"]
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups (nanoGPT): every >= 2-D tensor (matmul weights and embeddings) decays;
        norms' weights and biases do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]
