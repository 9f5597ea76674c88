"""Retrieval-augmented generation: index documents into one SQLite file (FTS5 for BM25, sqlite-vec for vectors),
retrieve by keywords, embeddings or both (reciprocal rank fusion), answer with numbered citations through the
inference engine, and measure retrieval on built-in labelled sets.

    from lmforge.rag import Index
    with Index("kjv.sqlite") as ix:
        ix.add(["kjv"])
        hits = ix.search("who built the ark", k=5)

Modules: chunking (documents -> chunks), embed (embedders), store (the SQLite file), retrieve (bm25, dense, hybrid,
MMR), answer (prompt with citations, generation), index (the Index API), evaluate (the benchmark sets and
metrics). Names are loaded on first use, so the command line's verb table (rag/cli.py) stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"Index": "index", "AddReport": "index", "MiniLM": "embed", "CheckpointEmbedder": "embed",
            "Embedder": "embed", "Hit": "retrieve", "Answer": "answer", "Source": "answer"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lmforge.rag.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmforge.rag' has no attribute {name!r}")
