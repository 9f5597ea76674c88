"""Inference: sampling parameters and logits processing (sampling.py), the generation loop (generate.py)."""
from lmforge.infer.sampling import SamplingParams, TokenLogprob, process_logits, sample

__all__ = ["SamplingParams", "TokenLogprob", "process_logits", "sample"]
