"""Generation for one prompt — a thin loop over the engine (lmforge.infer.engine), a batch of one.

    model, tok = lmforge.load("runs/quickstart/checkpoint")
    res = generate(model, tok, "Once upon a time", SamplingParams(temperature=0.8, max_tokens=50))
    res.text, res.token_ids, res.finish_reason            # 'stop' (EOS / stop id / stop string) | 'length'
    for delta in generate(model, tok, "Hello", params, stream=True):
        print(delta.text, end="", flush=True)             # UTF-8-safe, stop strings never shown

The terminating token is kept in `token_ids` (with its logprob: an RL loss needs it) but never in `text`. A stop
string cuts `text` right before it; `token_ids` keep every token sampled. What ends a sequence: see
lmforge.infer.request; how text is released while streaming: lmforge.infer.detokenize.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from lmforge.errors import CheckpointError, ConfigError
from lmforge.infer.engine import Engine
from lmforge.infer.outputs import GenerationResult, GenerationStream
from lmforge.infer.sampling import SamplingParams


def generate(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None,
             stream: bool = False, *, add_bos: bool | None = None, precision: str = "fp32", constraint=None):
    """Generate one completion of `prompt` (text, or token ids) with the engine (a batch of one).

    stream=False: returns a GenerationResult. stream=True: returns a GenerationStream of Deltas.
    add_bos: text prompts get the tokenizer's BOS first (as documents in pretraining do) unless False;
    id prompts get it only when True. precision: 'fp32' (default, exact), 'bf16', 'fp16' or 'auto' (autocast).
    constraint: a `constrained.Grammar` (JSON schema, regex, choices) the text must follow.
    Errors the user can fix (prompt too long, ids outside the vocabulary, n > 1) raise LmforgeError at the call.
    """
    params = params or SamplingParams()
    if params.n != 1:
        raise ConfigError("generate() makes one completion; use generate_n() for n > 1", field="n")
    run = Engine(model, tokenizer, precision=precision).start([prompt], params, constraint=constraint,
                                                               add_bos=add_bos)
    s = GenerationStream((d for _, _, d in run), run.prompt_ids[0])
    return s if stream else s.consume()


def generate_n(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams, *,
               add_bos: bool | None = None, precision: str = "fp32", constraint=None) -> list[GenerationResult]:
    """params.n completions of one prompt: one prefill, then the n rows decode as a batch; completion i uses
    seed + i (when seeded), so each equals what generate() gives with that seed."""
    return Engine(model, tokenizer, precision=precision).generate([prompt], params, constraint=constraint,
                                                                 add_bos=add_bos)[0]


# ---------------------------------------------------------------------------------------------------------------
# default sampling settings of a model directory

GENERATION_CONFIG_KEYS = {"max_new_tokens": "max_tokens"}  # HF name -> ours; our own names pass through


def params_from_generation_config(path: str | Path, defaults: dict | None = None, **overrides) -> SamplingParams:
    """SamplingParams from `defaults`, then a checkpoint's generation_config.json (the keys we know), then
    `overrides` that are not None (command-line flags)."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    gc_file = Path(path) / "generation_config.json"
    values = dict(defaults or {})
    if gc_file.is_file():
        try:
            gc = json.loads(gc_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"corrupt JSON: {e.msg}", file=str(gc_file), line=e.lineno) from None
        for k, v in (gc.items() if isinstance(gc, dict) else []):
            k = GENERATION_CONFIG_KEYS.get(k, k)
            if k in names and k not in ("n", "seed", "logprobs"):
                values[k] = v
        if gc.get("do_sample") is False:
            values["temperature"] = 0.0
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    try:
        return SamplingParams(**values)
    except ConfigError as e:
        if e.field is not None and e.field.split(".")[0] not in given:
            e.file = str(gc_file)  # the bad value came from the checkpoint, not the command line
        raise
