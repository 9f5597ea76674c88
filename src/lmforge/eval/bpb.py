"""Bits per byte: the tokenizer-independent language-modelling metric.

bpb = (total NLL in nats over every target token of the split) / ln 2 / (UTF-8 bytes of the split's text).

The split is scored as one stream of windows of `seq_len` tokens. With the default stride (= seq_len) they
overlap by one token, so every token after the first is a target exactly once, but a target early in a window
sees little context. With a smaller stride (a sliding window, as HF's perplexity guide does) window k > 0 scores
only its last `stride` targets: every target is still scored exactly once, each with at least seq_len - stride
tokens of context (the split's first window excepted). It costs seq_len / stride times the compute; it is the
fair way to compare with an n-gram model, which always sees its full context. Targets that are special tokens (BOS at document starts) carry no bytes and are left out of
the NLL sum, so the byte count of the targets equals the text's byte count (checked against meta.json).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of each token id; 0 for special tokens (they stand for no text)."""
    specials = set(tokenizer.special_tokens.values())
    return np.array([0 if i in specials else len(tokenizer.id_to_bytes(i)) for i in range(tokenizer.vocab_size)],
                    dtype=np.int64)


def window_starts(n_tokens: int, seq_len: int, stride: int | None = None) -> list[int]:
    """Window k starts at k * stride and scores targets from k * stride + seq_len - stride on (k > 0); windows
    are added until the last target (index n_tokens - 1) is covered."""
    stride = stride or seq_len
    starts = [0] if n_tokens > 1 else []
    while starts and starts[-1] + seq_len < n_tokens - 1:
        starts.append(starts[-1] + stride)
    return starts


@torch.no_grad()
def evaluate_bpb(model, tokens: np.ndarray, token_bytes: np.ndarray, seq_len: int, batch_size: int = 8,
                 max_tokens: int | None = None, progress: bool = False, device=None,
                 stride: int | None = None) -> dict:
    """Score `tokens` (a 1-D array, e.g. the val memmap). Returns loss (nats/token), bpb, tokens, bytes.
    stride: see the module docstring (default seq_len: no overlap)."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    device = device or next(model.parameters()).device
    n = len(tokens)
    starts = window_starts(n, seq_len, stride)
    if max_tokens is not None and max_tokens < n - 1:
        # a quick estimate: windows spread evenly over the whole split (its head alone may not be typical)
        k = max(1, max_tokens // seq_len)
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, k).round().astype(int)]
    tb = torch.as_tensor(token_bytes, device=device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    nll_all = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes, n_targets, n_scored = 0, 0, 0
    bar = tqdm(total=min(n - 1, len(starts) * stride), disable=not progress, unit="tok", unit_scale=True, desc="eval bpb", leave=False)
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        # windows of different length at the tail: pad targets with -1 (ignored)
        x = torch.zeros(len(group), seq_len, dtype=torch.long)
        y = torch.full((len(group), seq_len), -1, dtype=torch.long)
        for r, s in enumerate(group):
            chunk = torch.from_numpy(np.asarray(tokens[s:min(s + seq_len + 1, n)], dtype=np.int64))
            x[r, :len(chunk) - 1] = chunk[:-1]
            y[r, :len(chunk) - 1] = chunk[1:]
            if s > 0:   # the earlier window scored these targets (with more context there)
                y[r, :seq_len - stride] = -1
        x, y = x.to(device), y.to(device)
        logits = _logits(model(x))
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1,
                              reduction="none").view_as(y).double()
        valid = y >= 0
        yb = tb[y.clamp(min=0)] * valid
        scored = yb > 0
        nll_sum += (nll * scored).sum()
        nll_all += (nll * valid).sum()
        n_bytes += int(yb.sum())
        n_targets += int(valid.sum())
        n_scored += int(scored.sum())
        bar.update(int(valid.sum()))
    bar.close()
    nll_sum, nll_all = float(nll_sum), float(nll_all)
    return {"loss": nll_all / max(n_targets, 1), "bpb": nll_sum / math.log(2) / max(n_bytes, 1),
            "tokens": n_targets, "scored_tokens": n_scored, "bytes": n_bytes}


def _logits(out):
    """Models may return logits or (logits, loss)."""
    return out[0] if isinstance(out, (tuple, list)) else out
