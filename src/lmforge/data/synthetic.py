"""A synthetic token stream for fast checks of the training machinery: learnable in a few dozen steps.

Documents follow a fixed successor rule (t -> 7t + 3 mod 60) with 10% noise, each starting with BOS, so a tiny
model's loss falls quickly and two runs can be compared step by step without any corpus or tokenizer.
"""
from __future__ import annotations

import numpy as np

VOCAB, BOS = 64, 63


def successor_stream(n_docs: int, seed: int) -> np.ndarray:
    """`n_docs` documents of 20-89 tokens (ids 0..59), each after a BOS, as one uint16 stream."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        tok = int(rng.integers(0, 60))
        doc = []
        for _ in range(int(rng.integers(20, 90))):
            doc.append(tok)
            tok = (tok * 7 + 3) % 60 if rng.random() > 0.1 else int(rng.integers(0, 60))
        out += [BOS, *doc]
    return np.array(out, dtype=np.uint16)
