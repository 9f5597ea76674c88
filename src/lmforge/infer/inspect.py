"""Seeing inside a model: attention heat maps, the next-token distribution, per-token logprobs of a continuation.

    tokens, attn = attention_maps(model, tok, "The cat sat")          # attn: [layers, heads, T, T], rows sum to 1
    plot_attention(tokens, attn, "attn.png")                           # every layer x head; layer=, head= pick
    next_token_topk(model, tok, "The cat", k=5)                        # [TokenProb(id, token, prob, logprob)]
    continuation_logprobs(model, tok, "The cat", " sat on the mat")    # per-token logprobs, total, mean

    lmforge attention --checkpoint DIR --prompt TEXT [--layer L --head H] --out FILE.png
    lmforge inspect   --checkpoint DIR --prompt TEXT [--continuation TEXT] [--top-k K]

Everything runs one fp32 forward pass over the whole text (no KV cache, no sampling): these are the model's raw
probabilities. A text prompt starts with BOS, as documents did in pretraining (and as generate() does).
The continuation is tokenized on its own and appended to the prompt's ids, so its tokens are the ones a model
generating after the prompt would have produced; the same text tokenized as one string may split differently
at the boundary.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import ConfigError, LmforgeError


# ---------------------------------------------------------------------------------------------------------------
# text -> ids, checked

def checked_ids(tokenizer, text: str | Sequence[int], what: str, add_bos: bool) -> list[int]:
    """The ids of `text` (a string, or ids checked against the vocabulary), BOS first when add_bos and the
    tokenizer has one; empty input is an error naming the field `what`."""
    if isinstance(text, str):
        if not text:
            raise LmforgeError("is empty", field=what)
        ids = tokenizer.encode(text)
    else:
        ids = [int(i) for i in (text.tolist() if hasattr(text, "tolist") else text)]
        if not ids:
            raise LmforgeError("is empty", field=what)
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise LmforgeError(f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                               field=what)
    if add_bos:
        try:
            ids = [int(tokenizer.bos_id)] + ids
        except (AttributeError, LmforgeError):  # a tokenizer without BOS: the text alone
            pass
    return ids


def _check_fits(model, n: int, what: str) -> None:
    ctx = model.config.max_seq_len
    if n > ctx:
        raise LmforgeError(f"{n} tokens do not fit the model's context of {ctx} tokens (max_seq_len)", field=what)


def _forward(model, ids: list[int], **kw):
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids], device=device), **kw)
    finally:
        model.train(was_training)


def _raw_log_probs(model, tokenizer, logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the tokenizer's vocabulary in fp32 (ids past it are model padding, never a token)."""
    logits = logits.float().clone()
    if tokenizer.vocab_size < logits.shape[-1]:
        logits[..., tokenizer.vocab_size:] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def token_label(tokenizer, i: int) -> str:
    """One token as a readable label: spaces as '·', newlines/tabs escaped, partial UTF-8 bytes as \\xNN."""
    s = tokenizer.token_str(i) if hasattr(tokenizer, "token_str") else tokenizer.decode([i])
    return s.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


# ---------------------------------------------------------------------------------------------------------------
# attention

def attention_maps(model, tokenizer, prompt: str | Sequence[int], *, add_bos: bool = True
                   ) -> tuple[list[str], torch.Tensor]:
    """(token labels, attention weights [n_layer, n_head, T, T] in fp32 on the CPU) for one prompt.

    Row i of a map is where token i looks: a distribution over tokens 0..i (causal), summing to 1.
    """
    ids = checked_ids(tokenizer, prompt, "prompt", add_bos)
    _check_fits(model, len(ids), "prompt")
    _, _, attns = _forward(model, ids, return_attn=True, logits_to_keep=1)
    attn = torch.stack([a[0] for a in attns]).float().cpu()  # [L, H, T, T]
    return [token_label(tokenizer, i) for i in ids], attn


IMAGE_FORMATS = ("png", "pdf", "svg")
GRID_LABEL_MAX_T = 16  # grid cells get token labels only up to this many tokens (beyond, they are unreadable)


def figure_size(n_tokens: int, n_rows: int, n_cols: int) -> tuple[float, float]:
    """Figure size in inches: one map grows with the tokens (labels stay readable); a grid has fixed-size cells,
    shrunk so that the figure stays within 40 inches a side."""
    if n_rows == n_cols == 1:
        side = min(max(5.0, 2.5 + 0.28 * n_tokens), 30.0)
        return side + 1.2, side  # + room for the colour bar
    cell = min(max(1.6, 0.1 * n_tokens), 3.0)
    cell = min(cell, 38.0 / n_cols, 38.0 / n_rows)
    return n_cols * cell + 1.2, n_rows * cell + 0.8


def pick_indices(n: int, index: int | None, name: str) -> list[int]:
    """All of range(n) when index is None, else [index], checked (an error naming the field `name`)."""
    if index is None:
        return list(range(n))
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise LmforgeError(f"must be in 0..{n - 1} (the model has {n} {name}s), got {index!r}", field=name)
    return [index]


def plot_attention(tokens: Sequence[str], attn: torch.Tensor, out: str | Path, *, layer: int | None = None,
                   head: int | None = None, title: str | None = None, dpi: int = 100) -> Path:
    """Draw attention maps to an image file (PNG, or any format matplotlib writes, by its suffix).

    Both layer and head given: one big map with every token labelled. Otherwise a grid, rows = layers, columns =
    heads (all of them, or the one picked). Keys (attended-to tokens) run left to right, queries top to bottom;
    the causal upper triangle is left blank. Colours span 0..1 in every cell, so cells compare directly.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    L, H, T, _ = attn.shape
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} token labels for {T} positions")
    layers, heads = pick_indices(L, layer, "layer"), pick_indices(H, head, "head")
    if out.suffix.lower().lstrip(".") not in IMAGE_FORMATS:
        raise LmforgeError(f"cannot write a {out.suffix or 'suffix-less'} image; use .png (or .pdf, .svg)",
                           field="out")

    rows, cols = len(layers), len(heads)
    single = rows == cols == 1
    w, h = figure_size(T, rows, cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w, h), dpi=dpi, squeeze=False, layout="constrained")
    causal = np.triu(np.ones((T, T), dtype=bool), k=1)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # masked (future) cells: blank
    labelled = single or T <= GRID_LABEL_MAX_T
    font = max(5.0, min(10.0, 260.0 / T)) if single else 5.0
    image = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing")  # e.g. CJK tokens in the default font
        for r, li in enumerate(layers):
            for c, hi in enumerate(heads):
                ax = axes[r][c]
                data = np.ma.array(attn[li, hi].numpy(), mask=causal)
                image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
                ax.set_title(f"layer {li} head {hi}" if single else f"L{li} H{hi}", fontsize=12 if single else 7)
                ax.set_xticks([])
                ax.set_yticks([])
                if labelled and (single or r == rows - 1):
                    ax.set_xticks(range(T))
                    ax.set_xticklabels(tokens, rotation=90, fontsize=font, parse_math=False)
                if labelled and (single or c == 0):
                    ax.set_yticks(range(T))
                    ax.set_yticklabels(tokens, fontsize=font, parse_math=False)
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.046 if single else 0.02, pad=0.02)
        if single:
            axes[0][0].set_xlabel("attended-to token (key)")
            axes[0][0].set_ylabel("token (query)")
        if title:
            fig.suptitle(title, parse_math=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)  # no bbox_inches="tight": the size is figure_size() * dpi, as documented
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------
# probabilities

@dataclass
class TokenProb:
    token_id: int
    token: str          # label (token_label)
    prob: float
    logprob: float


def next_token_topk(model, tokenizer, prompt: str | Sequence[int], k: int = 10, *, add_bos: bool = True
                    ) -> list[TokenProb]:
    """The k most likely next tokens after `prompt` (raw model distribution), most likely first."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"must be an integer >= 1, got {k!r}", field="top_k")
    ids = checked_ids(tokenizer, prompt, "prompt", add_bos)
    _check_fits(model, len(ids), "prompt")
    logits, _ = _forward(model, ids, logits_to_keep=1)
    lp = _raw_log_probs(model, tokenizer, logits[0, -1])
    vals, idx = lp.topk(min(k, tokenizer.vocab_size))
    return [TokenProb(i, token_label(tokenizer, i), math.exp(v), v) for i, v in zip(idx.tolist(), vals.tolist())]


@dataclass
class ContinuationLogprobs:
    prompt_ids: list[int]
    token_ids: list[int]     # the continuation's ids
    tokens: list[str]        # their labels
    logprobs: list[float]    # log P(token_ids[i] | prompt, token_ids[:i])
    total: float
    mean: float

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean)


def continuation_logprobs(model, tokenizer, prompt: str | Sequence[int], continuation: str | Sequence[int], *,
                          add_bos: bool = True) -> ContinuationLogprobs:
    """Per-token logprobs of `continuation` given `prompt`, from one forward pass over prompt + continuation."""
    p_ids = checked_ids(tokenizer, prompt, "prompt", add_bos)
    _check_fits(model, len(p_ids), "prompt")
    c_ids = checked_ids(tokenizer, continuation, "continuation", False)
    _check_fits(model, len(p_ids) + len(c_ids), "continuation")
    logits, _ = _forward(model, p_ids + c_ids)
    # position t predicts token t + 1: the continuation's tokens are predicted from the last prompt position on
    lp = _raw_log_probs(model, tokenizer, logits[0, len(p_ids) - 1:-1])
    got = lp.gather(1, torch.tensor(c_ids, device=lp.device)[:, None]).squeeze(1).tolist()
    total = math.fsum(got)
    return ContinuationLogprobs(p_ids, c_ids, [token_label(tokenizer, i) for i in c_ids], got, total,
                                total / len(got))
