"""Corpora (built-in + user files, streamed) and token shards.

`Corpus`, `list_builtins`, `kjv_verses`, `kjv_text` come from corpus.py; `prepare_shards`, `load_shards`
from shards.py (imported on first use, so listing corpora does not import numpy).
"""
from lmforge.data.corpus import Corpus, CorpusStats, kjv_text, kjv_verses, list_builtins  # noqa: F401

__all__ = ["Corpus", "CorpusStats", "kjv_text", "kjv_verses", "list_builtins", "prepare_shards", "load_shards"]


def __getattr__(name):
    if name in ("prepare_shards", "load_shards"):
        from lmforge.data import shards
        return getattr(shards, name)
    raise AttributeError(f"module 'lmforge.data' has no attribute {name!r}")
