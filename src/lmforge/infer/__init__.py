"""Inference: one validated sampling parameter object (sampling.py), the step-driven engine with continuous
batching (engine.py), and `generate` for one prompt (generate.py), a loop over the engine."""
from lmforge.infer.sampling import SamplingParams, TokenLogprob, process_logits, sample
from lmforge.infer.outputs import Delta, GenerationResult, RequestOutput
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate, generate_n

__all__ = ["SamplingParams", "TokenLogprob", "process_logits", "sample", "Delta", "GenerationResult",
           "RequestOutput", "Engine", "generate", "generate_n"]
