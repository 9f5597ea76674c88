"""Markov n-gram baseline: a table of how often each token follows the previous n-1 tokens.

An order-n model predicts token t from the n-1 tokens before it (n=1 unigram, n=2 bigram, ...). It is the
simplest "next-token predictor", and it shows why an LLM is needed: the table has room for |V|^(n-1)
contexts, so as n grows almost every context met at evaluation was never seen in training.
It is measured with the Transformer's metric, bits per byte on the same validation split.

Stream conventions (the same as the Transformer evaluation):
  * every document starts with BOS; a context never reaches left of the last BOS: positions further left
    are padded with BOS, so the context right after a BOS is [BOS, BOS, ...] ("just [BOS]"). The start of a
    stream counts as a document start.
  * every token is a target; BOS targets (the model's "end of document") are trained on but carry no bytes,
    so `bits_per_byte` leaves them out of the sum.

Storage (numpy only, no per-n-gram Python objects). Contexts form a suffix trie stored level by level:
a context of length k (level k) is identified by its index in the sorted int64 array `ctx_keys[k]`, where
    key = id(its suffix of length k-1) * V + (its oldest token).
This numbers contexts exactly (no hash collisions) for any n, and the parent of a context is its
back-off context. An n-gram (context, next token) is the single int64 key `ctx_id * V + token`, kept
sorted with its count; lookups are vectorised `np.searchsorted`.

Smoothing (both are properly normalised distributions over the whole vocabulary):
  * "addk"  Lidstone/Laplace:  P(w|h) = (c(hw) + k) / (c(h) + k|V|)   on the full (n-1)-token context.
  * "kn"    interpolated modified Kneser-Ney (Chen & Goodman 1998):
              P_k(w|h) = (c(hw) - D_k(c(hw))) / c(h)  +  gamma(h) * P_{k-1}(w|h'),
              gamma(h) = sum_w D_k(c(hw)) / c(h),   h' = h without its oldest token,
            with three discounts per order (c = 1, 2, 3+) estimated from counts-of-counts, P_{-1} = 1/|V|
            (uniform floor), and, below the top order, continuation counts c(hw) = #{distinct x: x h w seen}
            (raw counts for n-grams that start with BOS: nothing but BOS can precede them). A context never
            seen at some order passes the lower-order distribution through unchanged.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.io import atomic_file

SMOOTHINGS = ("kn", "addk")
FORMAT = "lmforge-markov"
_CHUNK = 1 << 20  # evaluation positions per vectorised step (bounds memory, drives the progress bar)


# ---------------------------------------------------------------------------------------------- contexts

def _doc_starts(x: np.ndarray, bos_id: int) -> np.ndarray:
    """start[i] = index of the last BOS at or before i (0 if none): no context reaches further left."""
    idx = np.where(x == bos_id, np.arange(len(x), dtype=np.int64), 0)
    return np.maximum.accumulate(idx) if len(idx) else idx


def _context_floor(start: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For targets at positions t: the leftmost position their context may use."""
    return np.where(t > 0, start[np.maximum(t - 1, 0)], 0)


def _context_token(x, floor, t, lag, bos_id):
    """The token `lag` positions before each target, or BOS padding where that crosses a document start."""
    pos = t - lag
    return np.where(pos >= floor, x[np.maximum(pos, 0)], bos_id)


def _as_ids(tokens, vocab_size: int, what: str) -> np.ndarray:
    x = np.asarray(tokens)
    if x.ndim != 1:
        raise DataError(f"{what} must be a 1-D sequence of token ids")
    x = x.astype(np.int64, copy=False)
    if len(x) and (x.min() < 0 or x.max() >= vocab_size):
        raise DataError(f"{what} hold ids outside [0, {vocab_size}) (max {int(x.max())}): "
                        "the data and the model use different tokenizers")
    return x


def _bar(total: int, desc: str, progress: bool):
    # delay: quick steps stay silent; only counting that takes a while shows a bar
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress, leave=False, delay=2.0)


def _kn_discounts(counts: np.ndarray) -> np.ndarray:
    """Modified-KN discounts D1, D2, D3+ from counts-of-counts (Chen & Goodman), kept in (0, j]."""
    n1, n2, n3, n4 = (float(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4))
    default = np.array([0.5, 1.0, 1.5])  # for tiny tables whose counts-of-counts have holes
    if n1 == 0 or n2 == 0:
        return default
    y = n1 / (n1 + 2 * n2)
    d = np.array([1 - 2 * y * n2 / n1,
                  2 - 3 * y * n3 / n2,
                  3 - 4 * y * n4 / n3 if n3 > 0 else np.nan])
    d = np.where(np.isfinite(d) & (d > 0), d, default)
    # D > 0 leaves mass for unseen tokens; D_j <= j keeps c - D(c) >= 0, so each level sums to exactly 1
    return np.clip(d, 1e-3, [1.0, 2.0, 3.0])


# ------------------------------------------------------------------------------------------------- model

class MarkovModel:
    """An order-n token Markov chain with add-k or interpolated modified Kneser-Ney smoothing."""

    def __init__(self, order: int, vocab_size: int, bos_id: int, smoothing: str, k: float,
                 ctx_keys: list, ng_keys: list, ng_counts: list, ctx_total: list, ctx_dsum: list,
                 discounts: np.ndarray, train_tokens: int):
        self.order, self.vocab_size, self.bos_id = order, vocab_size, bos_id
        self.smoothing, self.k = smoothing, k
        # per level 0..order-1 (context length); ng_*/ctx_* are None for levels a smoothing does not use
        self.ctx_keys, self.ng_keys, self.ng_counts = ctx_keys, ng_keys, ng_counts
        self.ctx_total, self.ctx_dsum = ctx_total, ctx_dsum
        self.discounts = discounts  # (order, 3): D1, D2, D3+ per level (KN only)
        self.train_tokens = train_tokens

    # ---- training

    @classmethod
    def fit(cls, tokens, order: int, vocab_size: int, bos_id: int, smoothing: str = "kn", k: float = 0.1,
            progress: bool = False) -> "MarkovModel":
        """Count every n-gram of a token stream (a 1-D array or memmap) and build the smoothed tables."""
        _check_params(order, vocab_size, bos_id, smoothing, k)
        V, n = vocab_size, order
        x = _as_ids(tokens, V, "train tokens")
        if len(x) * V >= 2 ** 62:
            raise DataError(f"{len(x)} tokens x vocab {V} overflows the int64 n-gram keys; use fewer tokens")
        start = _doc_starts(x, bos_id)
        t = np.arange(len(x), dtype=np.int64)
        if len(x) and x[0] == bos_id:
            t = t[1:]  # the stream's opening BOS has nothing before it to be predicted from
        if len(t) == 0:
            raise DataError("no training tokens to count")
        floor = _context_floor(start, t)
        kn = smoothing == "kn"
        bar = _bar(len(t) * (n + (n - 1 if kn else 0)), f"counting {n}-grams", progress)

        # contexts, one trie level at a time: each position's level-k id from its level-(k-1) id
        ids = np.zeros(len(t), dtype=np.int64)
        ctx_keys = [np.zeros(1, dtype=np.int64)]  # level 0: the empty context, id 0
        for lag in range(1, n):
            keys, ids = np.unique(ids * V + _context_token(x, floor, t, lag, bos_id), return_inverse=True)
            ctx_keys.append(keys)
            bar.update(len(t))
        top_keys, top_counts = np.unique(ids * V + x[t], return_counts=True)
        del ids, floor, start
        bar.update(len(t))

        ng_keys, ng_counts = [None] * n, [None] * n
        ctx_total, ctx_dsum = [None] * n, [None] * n
        discounts = np.zeros((n, 3))
        ng_keys[n - 1], ng_counts[n - 1] = top_keys, top_counts
        if kn:
            # lower orders: fold each distinct n-gram onto its back-off (k-1)-gram
            raw = top_counts
            for lev in range(n - 2, -1, -1):
                hi = ng_keys[lev + 1]
                parent = ctx_keys[lev + 1][hi // V] // V
                keys, inv = np.unique(parent * V + hi % V, return_inverse=True)
                cont = np.bincount(inv, minlength=len(keys))          # distinct left extensions
                raw = np.bincount(inv, weights=raw, minlength=len(keys)).astype(np.int64)
                if lev >= 1:  # n-grams starting with BOS can only be preceded by BOS: keep raw counts
                    cont = np.where(ctx_keys[lev][keys // V] % V == bos_id, raw, cont)
                ng_keys[lev], ng_counts[lev] = keys, cont
                bar.update(len(t))
            for lev in range(n):
                discounts[lev] = _kn_discounts(ng_counts[lev])
        for lev in range(n) if kn else [n - 1]:
            c = ng_counts[lev]
            ctx = ng_keys[lev] // V
            ctx_total[lev] = np.bincount(ctx, weights=c, minlength=len(ctx_keys[lev])).astype(np.float64)
            if kn:
                d = discounts[lev][np.minimum(c, 3) - 1]
                ctx_dsum[lev] = np.bincount(ctx, weights=d, minlength=len(ctx_keys[lev]))
            # counts are small: store them in the narrowest unsigned type that holds them
            ng_counts[lev] = c.astype(np.uint32 if c.max() < 2 ** 32 else np.uint64)
        bar.close()
        return cls(n, V, bos_id, smoothing, float(k), ctx_keys, ng_keys, ng_counts, ctx_total, ctx_dsum,
                   discounts, train_tokens=int(len(x)))

    # ---- evaluation

    def _walk(self, x, start, t) -> list[np.ndarray]:
        """Trie ids of the targets' contexts at every level (-1 where that context was never seen)."""
        V, floor = self.vocab_size, _context_floor(start, t)
        ids = np.zeros(len(t), dtype=np.int64)
        levels = [ids]
        for lag in range(1, self.order):
            keys = self.ctx_keys[lag]
            q = ids * V + _context_token(x, floor, t, lag, self.bos_id)
            i = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
            ids = np.where((ids >= 0) & (keys[i] == q), i, -1)
            levels.append(ids)
        return levels

    def _count(self, lev, ids, w):
        keys = self.ng_keys[lev]
        q = ids * self.vocab_size + w
        i = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[i] == q, self.ng_counts[lev][i], 0).astype(np.float64)

    def _discount(self, lev, c):
        return np.where(c > 0, self.discounts[lev][np.clip(c, 1, 3).astype(np.int64) - 1], 0.0)

    def _probs(self, levels, y) -> np.ndarray:
        """P(y | context) for each target, contexts given by their trie ids per level."""
        V = self.vocab_size
        p = np.full(len(y), 1.0 / V)
        if self.smoothing == "addk":
            ids = levels[-1]
            m = ids >= 0  # an unseen context has c(h) = 0, so add-k gives the uniform 1/V
            c = self._count(self.order - 1, ids[m], y[m])
            p[m] = (c + self.k) / (self.ctx_total[-1][ids[m]] + self.k * V)
            return p
        for lev, ids in enumerate(levels):  # interpolate upward from the uniform floor
            m = ids >= 0
            if not m.any():
                break  # a context unseen at this level is unseen at every longer level too
            i = ids[m]
            c = self._count(lev, i, y[m])
            p[m] = (c - self._discount(lev, c) + self.ctx_dsum[lev][i] * p[m]) / self.ctx_total[lev][i]
        return p

    def _evaluate(self, tokens, progress: bool = False):
        """Per-token NLL (nats) and whether each token's full (n-1)-token context was seen in training."""
        x = _as_ids(tokens, self.vocab_size, "tokens")
        start = _doc_starts(x, self.bos_id)
        nll = np.empty(len(x))
        seen = np.empty(len(x), dtype=bool)
        with _bar(len(x), f"eval order {self.order}", progress) as bar:
            for s in range(0, len(x), _CHUNK):
                t = np.arange(s, min(s + _CHUNK, len(x)), dtype=np.int64)
                levels = self._walk(x, start, t)
                nll[t] = -np.log(self._probs(levels, x[t]))
                seen[t] = levels[-1] >= 0
                bar.update(len(t))
        return nll, seen

    def nll(self, tokens, progress: bool = False) -> np.ndarray:
        """-ln P(token_t | its context) in nats for every position t of a token stream (BOS ones included)."""
        return self._evaluate(tokens, progress)[0]

    def bits_per_byte(self, tokens, n_bytes: int, bos_id: int | None = None, progress: bool = False) -> float:
        """Sum of NLL over non-BOS targets, in bits, per UTF-8 byte of the text the tokens encode."""
        return self._bpb(tokens, n_bytes, bos_id, progress)[0]

    def _bpb(self, tokens, n_bytes, bos_id=None, progress=False):
        if bos_id is not None and bos_id != self.bos_id:
            raise DataError(f"data BOS id {bos_id} differs from the model's {self.bos_id}: different tokenizers")
        if n_bytes <= 0:
            raise DataError(f"byte count must be positive, got {n_bytes}")
        x = _as_ids(tokens, self.vocab_size, "tokens")
        nll, seen = self._evaluate(x, progress)
        target = x != self.bos_id  # BOS carries no bytes
        bpb = float(nll[target].sum() / math.log(2) / n_bytes)
        return bpb, float(seen[target].mean()) if target.any() else 0.0

    # ---- generation

    def distribution(self, context) -> np.ndarray:
        """P(next token | context) over the whole vocabulary; `context` is the preceding token ids."""
        V, n = self.vocab_size, self.order
        ctx = _as_ids(np.asarray(list(context), dtype=np.int64), V, "context")
        window = ctx[max(len(ctx) - (n - 1), 0):]
        x = np.append(window, 0)  # a slot for the (unknown) next token, so the walk sees it as a target
        levels = self._walk(x, _doc_starts(x, self.bos_id), np.array([len(window)], dtype=np.int64))
        p = np.full(V, 1.0 / V)
        for lev in (range(n) if self.smoothing == "kn" else [n - 1]):
            cid = int(levels[lev][0])
            if cid < 0:
                break
            keys = self.ng_keys[lev]
            a, b = np.searchsorted(keys, [cid * V, (cid + 1) * V])
            w, c = keys[a:b] - cid * V, self.ng_counts[lev][a:b].astype(np.float64)
            tot = self.ctx_total[lev][cid]
            if self.smoothing == "addk":
                p = np.full(V, self.k / (tot + self.k * V))
                p[w] += c / (tot + self.k * V)
            else:
                p *= self.ctx_dsum[lev][cid] / tot
                p[w] += (c - self._discount(lev, c)) / tot
        return p

    def sample(self, prompt_ids, n_tokens: int, seed: int = 0, temperature: float = 1.0,
               stop_at_bos: bool = True) -> list[int]:
        """Generate up to n_tokens after the prompt (temperature <= 0: greedy); stops at BOS (end of document)."""
        rng = np.random.default_rng(seed)
        ctx = [int(i) for i in _as_ids(np.asarray(list(prompt_ids), dtype=np.int64), self.vocab_size, "prompt")]
        out: list[int] = []
        for _ in range(n_tokens):
            p = self.distribution(ctx[-(self.order - 1):] if self.order > 1 else [])
            if temperature <= 0:
                nxt = int(np.argmax(p))
            else:
                if temperature != 1.0:
                    logit = np.log(p) / temperature
                    p = np.exp(logit - logit.max())
                cdf = np.cumsum(p)
                nxt = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), self.vocab_size - 1)
            if stop_at_bos and nxt == self.bos_id:
                break
            out.append(nxt)
            ctx.append(nxt)
        return out

    # ---- size, save, load

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"discounts": self.discounts}
        for lev in range(self.order):
            out[f"ctx_keys_{lev}"] = self.ctx_keys[lev]
            for name in ("ng_keys", "ng_counts", "ctx_total", "ctx_dsum"):
                a = getattr(self, name)[lev]
                if a is not None:
                    out[f"{name}_{lev}"] = a
        return out

    def table_stats(self) -> dict:
        """Size of the table: distinct contexts / n-grams actually seen vs the |V|^(n-1) possible contexts."""
        V, n = self.vocab_size, self.order
        return {
            "order": n, "vocab_size": V, "smoothing": self.smoothing, "train_tokens": self.train_tokens,
            "contexts": int(len(self.ctx_keys[n - 1])),
            "ngrams": int(len(self.ng_keys[n - 1])),
            "contexts_all_orders": int(sum(len(a) for a in self.ctx_keys)),
            "ngrams_all_orders": int(sum(len(a) for a in self.ng_keys if a is not None)),
            "bytes": int(sum(a.nbytes for a in self._arrays().values())),
            "possible_contexts": V ** (n - 1),
            "possible_ngrams": V ** n,
        }

    def save(self, path) -> None:
        """Write an .npz (plain arrays + a JSON header; no pickle), atomically."""
        path = Path(path)
        meta = {"format": FORMAT, "version": 1, "order": self.order, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "smoothing": self.smoothing, "k": self.k, "train_tokens": self.train_tokens}
        with atomic_file(path) as f:  # a file object, so numpy does not append ".npz" to the name
            np.savez(f, meta=np.array(json.dumps(meta)), **self._arrays())

    @classmethod
    def load(cls, path) -> "MarkovModel":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError("Markov model file not found", file=str(path))
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise CheckpointError(f"not a {FORMAT} file", file=str(path))
                arrays = {name: z[name] for name in z.files}
            n = int(meta["order"])
            get = lambda name: [arrays.get(f"{name}_{lev}") for lev in range(n)]  # noqa: E731
            ctx_keys, ng_keys = get("ctx_keys"), get("ng_keys")
            if any(a is None for a in ctx_keys) or ng_keys[n - 1] is None:
                raise CheckpointError("Markov model file is missing tables", file=str(path))
            return cls(n, int(meta["vocab_size"]), int(meta["bos_id"]), meta["smoothing"], float(meta["k"]),
                       ctx_keys, ng_keys, get("ng_counts"), get("ctx_total"), get("ctx_dsum"),
                       arrays["discounts"], int(meta["train_tokens"]))
        except CheckpointError:
            raise
        except Exception as e:  # not a zip, truncated, missing header fields, ...
            raise CheckpointError(f"unreadable Markov model ({type(e).__name__}: {e})", file=str(path)) from None


def _check_params(order, vocab_size, bos_id, smoothing, k):
    if not isinstance(order, (int, np.integer)) or order < 1:
        raise ConfigError(f"order must be an integer >= 1, got {order!r}", field="order")
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}", field="vocab_size")
    if not 0 <= bos_id < vocab_size:
        raise ConfigError(f"bos_id {bos_id} is outside the vocabulary [0, {vocab_size})", field="bos_id")
    if smoothing not in SMOOTHINGS:
        raise ConfigError(f"smoothing must be one of {', '.join(SMOOTHINGS)}, got {smoothing!r}", field="smoothing")
    if smoothing == "addk" and not k > 0:
        raise ConfigError(f"k must be > 0 for add-k smoothing (k = 0 gives unseen tokens probability 0), got {k}",
                          field="k")


# ------------------------------------------------------------------------------------------ token shards

def _meta_int(meta: dict, data_dir, *keys) -> int:
    """An integer from meta.json (e.g. "vocab_size", or "val", "bytes"); a clear error if it is missing."""
    v = meta
    for key in keys:
        v = v.get(key) if isinstance(v, dict) else None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise DataError("missing or bad value", file=str(Path(data_dir) / "meta.json"), field=".".join(keys))
    return v


def load_data(data_dir):
    """(train tokens, val tokens, vocab_size, bos_id, val UTF-8 bytes) from a `lmforge data prepare` directory."""
    from lmforge.data.shards import load_shards  # the one reader of the shard format (checks sizes vs meta)

    train, val, meta = load_shards(data_dir)
    return (train, val, _meta_int(meta, data_dir, "vocab_size"), _meta_int(meta, data_dir, "bos_id"),
            _meta_int(meta, data_dir, "val", "bytes"))


# ------------------------------------------------------------------------------------------ sweep + CLI

def markov_sweep(data_dir, orders=(1, 2, 3, 4, 5), smoothing: str = "kn", k: float = 0.1,
                 max_train_tokens: int | None = None, progress: bool = True) -> list[dict]:
    """Train and evaluate one model per order on a shard directory: the 'table explodes with n' table."""
    train, val, vocab_size, bos_id, val_bytes = load_data(data_dir)
    if max_train_tokens is not None:
        train = train[:max_train_tokens]
    train = np.asarray(train, dtype=np.int64)  # one copy, shared by every order
    val = np.asarray(val, dtype=np.int64)
    rows = []
    for n in orders:
        t0 = time.perf_counter()
        model = MarkovModel.fit(train, n, vocab_size, bos_id, smoothing, k, progress=progress)
        t1 = time.perf_counter()
        bpb, seen = model._bpb(val, val_bytes, bos_id, progress=progress)
        t2 = time.perf_counter()
        st = model.table_stats()
        rows.append({"order": n, "smoothing": smoothing, "contexts": st["contexts"], "ngrams": st["ngrams"],
                     "table_bytes": st["bytes"], "table_mb": st["bytes"] / 2 ** 20,
                     "possible_contexts": st["possible_contexts"], "val_context_seen": seen,
                     "val_bpb": bpb, "train_seconds": t1 - t0, "eval_seconds": t2 - t1})
    return rows


def format_big(v: int) -> str:
    """A count for a table: digits with commas, or scientific notation once it is too long to read."""
    return f"{v:,}" if v < 10 ** 7 else f"{v:.2e}"


def format_sweep(rows: list[dict]) -> str:
    """A plain-text (and markdown) table of markov_sweep rows."""
    head = ["order", "contexts", "n-grams", "table MB", "|V|^(n-1)", "val ctx seen", "val bits/byte", "train s"]
    body = [[str(r["order"]), format_big(r["contexts"]), format_big(r["ngrams"]), f"{r['table_mb']:.2f}",
             format_big(r["possible_contexts"]), f"{100 * r['val_context_seen']:.1f}%", f"{r['val_bpb']:.4f}",
             f"{r['train_seconds']:.2f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                      *(line(b) for b in body)])
