"""Generation for one prompt: prefill the prompt into the KV cache, then decode one token at a time.

    model, tok = lmforge.load("runs/quickstart/checkpoint")
    res = generate(model, tok, "Once upon a time", SamplingParams(temperature=0.8, max_tokens=50))
    res.text, res.token_ids, res.finish_reason            # 'stop' (EOS / stop id / stop string) | 'length'
    for delta in generate(model, tok, "Hello", params, stream=True):
        print(delta.text, end="", flush=True)             # UTF-8-safe, stop strings never shown

What counts as the end of a sequence: the tokenizer's EOS, and its BOS too — pretraining shards store every
document as [BOS] + text, so a base model "ends" a document by starting the next one. `ignore_eos` turns both
off; `stop_token_ids` add more. The terminating token is kept in `token_ids` (with its logprob: an RL loss needs
it) but never in `text`. A stop string cuts `text` right before it; `token_ids` keep every token sampled.

Streaming text is decoded incrementally from bytes: a token may hold half a multi-byte character, which is kept
back until the character is complete. Text that could be the beginning of a stop string is kept back too, just
as many characters as could still match, and released as soon as it cannot.

The loop itself lives in `engine.py` (batched: many prompts, n completions each); `generate` is a batch of one.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.infer.sampling import SamplingParams, TokenLogprob, gather_logprobs, log_probs, process_logits, sample


@dataclass
class Delta:
    """One step of a stream: new text (possibly empty), the tokens sampled since the last delta, their logprobs.
    The last delta of a stream has finish_reason set."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]                      # every sampled token, the terminating one included
    finish_reason: str                        # 'stop' | 'length'
    stop_reason: int | str | None = None      # the EOS/stop token id or the stop string that ended it
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when params.logprobs is set
    prompt_token_ids: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# incremental detokenization with stop strings

class Detokenizer:
    """Token ids in, safe text out: never half a UTF-8 character, never (a possible start of) a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.stop, self.skip_special = tokenizer, list(stop), skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""      # all text so far (cut before a stop string once one matched)
        self.emitted = 0    # characters of self.text already handed out

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; return the stop string it completed, if any (self.text is then cut before it)."""
        special = getattr(self.tokenizer, "is_special", lambda i: False)(token_id)
        data = b"" if special and self.skip_special else self.tokenizer.id_to_bytes(token_id)
        return self._append(self._decoder.decode(data), check_stop)

    def finish(self, check_stop: bool = True) -> str | None:
        """End of generation: flush a dangling partial character (as U+FFFD: the bytes really were invalid)."""
        return self._append(self._decoder.decode(b"", final=True), check_stop)

    def _append(self, new: str, check_stop: bool) -> str | None:
        start = len(self.text)
        self.text += new
        if not (new and check_stop and self.stop):
            return None
        # a match must end inside the new text, so it starts at most max_stop - 1 characters before it
        lo = max(0, start - self._max_stop + 1)
        hits = []
        for s in self.stop:
            i = self.text.find(s, lo)
            while 0 <= i and i + len(s) <= start:  # ended before this text: not checked then (min_tokens)
                i = self.text.find(s, i + 1)
            if i >= 0:
                hits.append((i, s))
        if not hits:
            return None
        i, s = min(hits, key=lambda h: h[0])  # the earliest start among the stops completed just now
        self.text = self.text[:i]
        return s

    def ready(self, final: bool = False) -> str:
        """The text that can be shown now (all of it when final)."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest unshown suffix that is a proper prefix of some stop string."""
        for k in range(min(self._max_stop - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


# ---------------------------------------------------------------------------------------------------------------
# the generation loop

def stop_check(detok: Detokenizer, tok: int, out_ids: list[int], req: "_Request", ends,
               grammar_done: bool = False) -> tuple[str | None, int | str | None]:
    """Feed `tok` (already appended to out_ids) to the detokenizer and decide whether the sequence ends here:
    (finish_reason or None, stop_reason). THE stopping rule of every decoding loop: an end/stop token id, then a
    stop string (not before min_tokens), then a completed grammar, then the budget. On a finish the detokenizer
    is flushed (a dangling partial character becomes U+FFFD), which may still complete a stop string."""
    check_stop = len(out_ids) >= req.params.min_tokens
    finish, reason = None, None
    if tok in ends:
        finish, reason = "stop", tok
    elif (matched := detok.add(tok, check_stop)) is not None:
        finish, reason = "stop", matched
    elif grammar_done:
        finish = "stop"
    elif len(out_ids) >= req.budget:
        finish = "length"
    if finish is not None and (reason is None or isinstance(reason, int)):
        if (matched := detok.finish(check_stop)) is not None:
            finish, reason = "stop", matched
    return finish, reason


def end_token_ids(tokenizer) -> list[int]:
    """EOS and BOS (see the module docstring), whichever the tokenizer has."""
    ids = []
    for name in ("eos_id", "bos_id"):
        try:
            ids.append(int(getattr(tokenizer, name)))
        except (AttributeError, LmforgeError):
            pass
    return list(dict.fromkeys(ids))


def _prompt_ids(tokenizer, prompt, add_bos: bool | None, vocab: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        if add_bos is not False:  # text prompts start a document, as in the pretraining shards
            bos = getattr(tokenizer, "bos_id", None)
            ids = ([bos] if bos is not None else []) + ids
    else:
        ids = [int(i) for i in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        if add_bos and getattr(tokenizer, "bos_id", None) is not None and ids[:1] != [tokenizer.bos_id]:
            ids = [tokenizer.bos_id] + ids
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise LmforgeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", field="prompt")
    if not ids:
        raise LmforgeError("the prompt is empty (and the tokenizer has no BOS to start from)", field="prompt")
    return ids


def _autocast(device: torch.device, precision: str):
    from lmforge.runtime import autocast, resolve_precision
    return autocast(device, resolve_precision(precision, device))


@dataclass
class _Request:
    """Everything checked and derived before the first forward pass (so errors surface at the call)."""
    prompt_ids: list[int]
    params: SamplingParams
    vocab: int              # ids >= vocab are model padding, never sampled
    budget: int             # tokens to generate at most
    eos: list[int]          # end-of-sequence ids (masked by min_tokens)
    choice: int = 0         # which of the n completions: seeds the generator with seed + choice


def _prepare(model, tokenizer, prompt, params: SamplingParams, add_bos: bool | None, choice: int = 0) -> _Request:
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{cfg.vocab_size}: they do not belong together")
    vocab = tokenizer.vocab_size  # a model may pad its vocabulary; padding is no token
    params.check_vocab(vocab)
    prompt_ids = _prompt_ids(tokenizer, prompt, add_bos, vocab)
    if len(prompt_ids) > cfg.max_seq_len:
        raise LmforgeError(f"the prompt has {len(prompt_ids)} tokens, more than the model's context of "
                           f"{cfg.max_seq_len} tokens (max_seq_len)", field="prompt")
    # the last sampled token is never fed back, so a full context still yields one token
    room = cfg.max_seq_len - len(prompt_ids) + 1
    budget = room if params.max_tokens is None else min(params.max_tokens, room)
    eos = [] if params.ignore_eos else end_token_ids(tokenizer)
    return _Request(prompt_ids, params, vocab, budget, eos, choice)


class GenerationStream:
    """Iterate for Deltas; afterwards `.result` holds the whole GenerationResult."""

    def __init__(self, deltas: Iterator[Delta], prompt_ids: list[int]):
        self._deltas, self.prompt_ids = deltas, prompt_ids
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[Delta]:
        text, ids, lps = [], [], []
        for d in self._deltas:
            text.append(d.text)
            ids += d.token_ids
            lps += d.logprobs or []
            if d.finish_reason is not None:
                self.result = GenerationResult("".join(text), ids, d.finish_reason, d.stop_reason,
                                               lps if d.logprobs is not None else None, self.prompt_ids)
            yield d

    def consume(self) -> GenerationResult:
        for _ in self:
            pass
        return self.result


def _unwrap(model):
    return getattr(model, "module", model)  # DDP


def generate(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None,
             stream: bool = False, *, add_bos: bool | None = None, precision: str = "fp32", constraint=None):
    """Generate one completion of `prompt` (text, or token ids) with the engine (a batch of one).

    stream=False: returns a GenerationResult. stream=True: returns a GenerationStream of Deltas.
    add_bos: text prompts get the tokenizer's BOS first (as documents in pretraining do) unless False;
    id prompts get it only when True. precision: 'fp32' (default, exact), 'bf16', 'fp16' or 'auto' (autocast).
    constraint: a `constrained.Grammar` (JSON schema, regex, choices) the text must follow.
    Errors the user can fix (prompt too long, ids outside the vocabulary, n > 1) raise LmforgeError at the call.
    """
    from lmforge.infer.engine import Engine
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
    from lmforge.infer.engine import Engine
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
