"""Inference: one validated sampling parameter object (sampling.py), the step-driven engine with continuous
batching and `generate` for one prompt (engine.py), requests, outputs and the streaming detokenizer.

    from lmforge.infer import Engine, SamplingParams, generate

The names are loaded on first use, so importing a submodule that needs no torch (the CLI's verb table in
infer/cli.py) stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SamplingParams": "sampling", "TokenLogprob": "sampling", "process_logits": "sampling", "sample": "sampling",
    "params_from_generation_config": "sampling",
    "Delta": "outputs", "GenerationResult": "outputs", "GenerationStream": "outputs", "RequestOutput": "outputs",
    "Engine": "engine", "generate": "engine", "generate_n": "engine",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lmforge.infer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmforge.infer' has no attribute {name!r}")
