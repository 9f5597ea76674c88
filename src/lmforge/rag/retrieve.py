"""Retrieval: BM25 (keywords), dense (cosine between embeddings), hybrid (reciprocal rank fusion), and MMR.

    hits = search(store, embedder, "who built the ark", k=5, mode="hybrid")   # list[Hit], best first

bm25     SQLite FTS5's BM25 over Porter-stemmed words; the question's words are OR-ed, each quoted, so no
         character of a question is FTS5 syntax (words in more than half the chunks are left out: BM25 gives them
         no weight, and their posting lists are the longest to read).
dense    the question's embedding against every chunk vector (an exact scan), score = cosine.
hybrid   reciprocal rank fusion of the two rankings (Cormack et al. 2009): score = sum of 1 / (60 + rank) over
         the lists a chunk is in, each list cut at CANDIDATES. Rank-based, so BM25's unbounded scores and cosines
         need no calibration against each other.
mmr      optional re-ranking for diversity (Carbonell & Goldstein 1998): from the mode's top candidates, pick
         one at a time the chunk maximising  lambda * cos(question, chunk) - (1 - lambda) * max cos(chunk, picked).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lmforge.errors import ConfigError

MODES = ("bm25", "dense", "hybrid")
RRF_K = 60
CANDIDATES = 50                 # depth of each ranking fused by hybrid and re-ranked by MMR
MAX_QUERY_BYTES = 8192          # a longer question is refused: it is no question, and FTS5 would OR every word
MAX_QUERY_TERMS = 64
_WORD = re.compile(r"\w+")


@dataclass
class Hit:
    rank: int
    score: float
    id: int                     # chunk id in the index
    source: str                 # file path or built-in corpus name
    document: str
    location: str               # e.g. "Genesis 1:3-7"
    start: int                  # byte span in the document
    end: int
    text: str

    def to_json(self) -> dict:
        return {"rank": self.rank, "score": float(self.score), "source": self.source,
                "location": self.location, "text": self.text, "id": self.id}


def check_query(query: str) -> str:
    if not isinstance(query, str) or not query.strip():
        raise ConfigError("the question is empty", field="question")
    n = len(query.encode("utf-8", "surrogatepass"))
    if n > MAX_QUERY_BYTES:
        raise ConfigError(f"the question has {n:,} bytes, more than the limit of {MAX_QUERY_BYTES:,}",
                          field="question")
    return query


def fts_query(query: str, common: set[str] = frozenset(), stems=None) -> str | None:
    """An FTS5 MATCH expression: the question's distinct words, quoted, OR-ed (None when it has no word). Words
    whose stems are all in `common` (Store.common_stems) are left out, unless every word is."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[:MAX_QUERY_TERMS]
    if common and stems is not None:
        words = [w for w in words if not set(stems(w)) <= common] or words
    return " OR ".join(f'"{w}"' for w in words) or None


def bm25(store, query: str, limit: int) -> list[tuple[int, float]]:
    match = fts_query(query, store.common_stems(), store.stems)
    return store.bm25(match, limit) if match else []


def rrf(rankings: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: {id: sum 1 / (k + rank)} sorted best first (ties: the id first seen first)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (i, _) in enumerate(ranking, 1):
            scores[i] = scores.get(i, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda x: -x[1])


def mmr(store, qvec: np.ndarray, ranked: list[tuple[int, float]], k: int, lam: float) -> list[tuple[int, float]]:
    """The first k of `ranked` re-ordered by maximal marginal relevance (scores kept from `ranked`)."""
    vecs = store.vectors([i for i, _ in ranked])
    pool = [(i, s) for i, s in ranked if i in vecs]
    if not pool:
        return []
    V = np.stack([vecs[i] for i, _ in pool])
    rel = V @ qvec
    sim = V @ V.T
    picked: list[int] = []
    left = list(range(len(pool)))
    while left and len(picked) < k:
        redundancy = sim[np.ix_(left, picked)].max(1) if picked else np.zeros(len(left))
        best = left[int(np.argmax(lam * rel[left] - (1 - lam) * redundancy))]
        picked.append(best)
        left.remove(best)
    return [pool[j] for j in picked]


def search(store, embedder, query: str, k: int = 5, mode: str = "hybrid", mmr_lambda: float | None = None,
           qvec: np.ndarray | None = None) -> list[Hit]:
    """The k best chunks for `query`. `qvec`: the question's embedding if already computed."""
    check_query(query)
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})", field="mode")
    if k < 1:
        raise ConfigError(f"must be >= 1, got {k}", field="k")
    if mmr_lambda is not None and not 0 <= mmr_lambda <= 1:
        raise ConfigError(f"must be in [0, 1], got {mmr_lambda}", field="mmr")
    depth = max(k, CANDIDATES) if (mode == "hybrid" or mmr_lambda is not None) else k
    need_vec = mode != "bm25" or mmr_lambda is not None
    if mode == "bm25":
        ranked = bm25(store, query, depth)
    elif mode == "dense":
        qvec = embedder.embed([query])[0] if qvec is None else qvec
        ranked = store.knn(qvec, depth)
    else:
        # BM25 runs in SQLite (no GIL) on a second thread while the question is embedded on this one; the
        # vectors are read first, so that only that thread uses the connection meanwhile
        store.matrix()
        with ThreadPoolExecutor(1) as pool:
            keywords = pool.submit(bm25, store, query, depth)
            qvec = embedder.embed([query])[0] if qvec is None else qvec
            ranked = rrf([keywords.result(), store.knn(qvec, depth)])
    if need_vec and qvec is None:
        qvec = embedder.embed([query])[0]
    ranked = mmr(store, qvec, ranked, k, mmr_lambda) if mmr_lambda is not None else ranked[:k]
    rows = store.chunks([i for i, _ in ranked])
    return [Hit(rank, score, i, r["source"], r["document"], r["location"], r["start"], r["end"], r["text"])
            for rank, (i, score) in enumerate(((i, s) for i, s in ranked if i in rows), 1)
            for r in [rows[i]]]


__all__ = ["Hit", "search", "bm25", "rrf", "mmr", "fts_query", "check_query", "MODES", "RRF_K", "CANDIDATES",
           "MAX_QUERY_BYTES"]
