"""The process-wide random number generators (torch CPU and CUDA, Python, NumPy) as JSON, for exact resume.

A checkpoint holds the state of these generators after its step. Resuming is exact only if nothing draws from
them between `set_rng_state` and the first resumed step; the trainer therefore restores them last, and helpers
that need random numbers of their own (e.g. runtime.measured_peak_flops) use a local torch.Generator.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": _py_state(random.getstate()),
             "numpy": _np_state(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def _np_state(s):
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]
