"""Sampling: one validated parameter object and the logits processing it describes.

`SamplingParams` follows the OpenAI completion API (and vLLM's `SamplingParams`) in names and meaning.
Every row of a batch may carry its own params; the processing is vectorised over the batch.

Processing order (the ONE order, applied by `process_logits` to fp32 logits of shape [B, V]):

  1. logit_bias          add bias[id] to the logit of each listed token id                    (OpenAI)
  2. min_tokens          while fewer than min_tokens tokens were generated, EOS and
                         stop_token_ids get -inf (unless ignore_eos leaves EOS alone)          (vLLM, HF MinNewTokens)
  3. repetition_penalty  for every id in prompt + output: logit / p if logit > 0 else logit * p (HF, CTRL paper)
  4. presence_penalty,   for every id in the OUTPUT only:                                      (OpenAI)
     frequency_penalty     logit -= presence * (count > 0) + frequency * count
  5. temperature         logit / T; T = 0 means greedy: every token but the argmax gets -inf
  6. top_k               keep the k largest logits (ties with the k-th kept, as HF does)
  7. top_p               keep the smallest set of most likely tokens whose mass reaches top_p
  8. min_p               drop tokens whose probability is below min_p * (top probability)
  9. sample              one draw from softmax(processed) with the row's torch.Generator

Steps 1, 3, 5-8 are exactly Hugging Face `generate()`'s order (SequenceBias -> RepetitionPenalty -> MinNewTokens
-> Temperature -> TopK -> TopP -> MinP); HF puts the min-tokens mask after the repetition penalty, which gives the
same result because the penalty maps -inf to -inf. Presence/frequency penalties have no HF processor.

Logprobs are computed with log_softmax in fp32. `logprobs_mode` picks which distribution they describe:
  "raw"       (default) the model's own distribution, log_softmax(model logits), before any step above —
              comparable across sampling settings, what scoring and evaluation want;
  "processed" the distribution the token was actually drawn from (after step 8; filtered tokens are -inf,
              and with temperature 0 it is a point mass: 0.0 for the argmax, -inf elsewhere).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import CheckpointError, ConfigError

LOGPROBS_MODES = ("raw", "processed")
MAX_ABS_LOGIT_BIAS = 100.0   # OpenAI's range for logit_bias values
MAX_ABS_PENALTY = 2.0        # OpenAI's range for presence/frequency penalties


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. Validated on construction (ConfigError names the field)."""

    n: int = 1
    """Number of completions for one prompt."""
    temperature: float = 1.0
    """Softmax temperature. 0 = greedy (argmax), no randomness."""
    top_k: int = 0
    """Keep only the k most likely tokens. 0 or -1 = off (stored as 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this cumulative probability. In (0, 1]; 1 = off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one. In [0, 1]; 0 = off."""
    repetition_penalty: float = 1.0
    """HF/CTRL penalty on tokens seen in prompt + output (> 1 discourages repeats, < 1 encourages). 1 = off."""
    presence_penalty: float = 0.0
    """OpenAI: subtract this from the logit of every token already in the OUTPUT. In [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI: subtract this times the token's count in the OUTPUT. In [-2, 2]."""
    logit_bias: dict[int, float] | None = None
    """{token id: bias added to its logit}, bias in [-100, 100] (-100 effectively bans a token)."""
    min_tokens: int = 0
    """EOS and stop_token_ids cannot be produced, and stop strings are not checked, before this many tokens."""
    max_tokens: int | None = None
    """Most tokens to generate; None = until the model's context window is full."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the generation; the text is cut before the first one and it is never emitted."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the generation like EOS does (they are not part of the output)."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks); EOS is then an ordinary token."""
    seed: int | None = None
    """Seed of this request's own torch.Generator: same seed -> same output, alone or in a batch."""
    logprobs: int | None = None
    """None = no logprobs; K >= 0 = the chosen token's logprob plus the K most likely alternatives."""
    logprobs_mode: str = "raw"
    """"raw": model distribution before processing; "processed": the distribution sampled from."""

    def __post_init__(self):
        self.n = _int(self.n, "n", lo=1)
        self.temperature = _num(self.temperature, "temperature", lo=0.0)
        self.top_k = _int(self.top_k, "top_k", lo=-1)
        if self.top_k == -1:
            self.top_k = 0
        self.top_p = _num(self.top_p, "top_p", lo=0.0, hi=1.0, lo_open=True)
        self.min_p = _num(self.min_p, "min_p", lo=0.0, hi=1.0)
        self.repetition_penalty = _num(self.repetition_penalty, "repetition_penalty", lo=0.0, lo_open=True)
        self.presence_penalty = _num(self.presence_penalty, "presence_penalty",
                                     lo=-MAX_ABS_PENALTY, hi=MAX_ABS_PENALTY)
        self.frequency_penalty = _num(self.frequency_penalty, "frequency_penalty",
                                      lo=-MAX_ABS_PENALTY, hi=MAX_ABS_PENALTY)
        self.logit_bias = _logit_bias(self.logit_bias)
        self.min_tokens = _int(self.min_tokens, "min_tokens", lo=0)
        if self.max_tokens is not None:
            self.max_tokens = _int(self.max_tokens, "max_tokens", lo=1)
            if self.min_tokens > self.max_tokens:
                raise ConfigError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                  field="min_tokens")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _id_list(self.stop_token_ids, "stop_token_ids")
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"expected true/false, got {self.ignore_eos!r}", field="ignore_eos")
        if self.seed is not None:
            self.seed = _int(self.seed, "seed", lo=-(2 ** 63), hi=2 ** 64 - 1)
        if self.logprobs is not None:
            self.logprobs = _int(self.logprobs, "logprobs", lo=0)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ConfigError(f"{self.logprobs_mode!r} is not one of {', '.join(LOGPROBS_MODES)}",
                              field="logprobs_mode")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def argmax_only(self) -> bool:
        """Greedy with nothing that reshapes the logits (bias, min_tokens, penalties): the next token is the
        argmax of the raw logits, and process_logits can be skipped (logprobs still need it)."""
        return self.greedy and not (self.logit_bias or self.min_tokens or self.repetition_penalty != 1.0
                                    or self.presence_penalty or self.frequency_penalty)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids and logprobs count must fit the model's vocabulary (known only once a model is loaded)."""
        for name, ids in (("logit_bias", list(self.logit_bias or {})), ("stop_token_ids", self.stop_token_ids)):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ConfigError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})", field=name)
        if self.logprobs is not None and self.logprobs > vocab_size:
            raise ConfigError(f"{self.logprobs} exceeds the vocabulary size {vocab_size}", field="logprobs")

    def make_generator(self, device: str | torch.device = "cpu", offset: int = 0) -> torch.Generator | None:
        """This request's generator (None without a seed: the global RNG is used). `offset` separates the n choices."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed((self.seed + offset) % 2 ** 64)
        return g

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


# --- validation helpers: every message names the field --------------------------------------------------------

def _num(v, name, *, lo=None, hi=None, lo_open=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v) if isinstance(v, str) else None
        except ValueError:
            v = None
        if v is None:
            raise ConfigError("expected a number", field=name)
    v = float(v)
    if not math.isfinite(v):
        raise ConfigError(f"must be finite, got {v}", field=name)
    too_low = lo is not None and (v <= lo if lo_open else v < lo)
    if too_low or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf)" if hi is None else f"{hi:g}]"
        raise ConfigError(f"must be in {left}{lo_s}, {hi_s}, got {v:g}", field=name)
    return v


def _int(v, name, *, lo=None, hi=None) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"expected an integer, got {v!r}", field=name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"must be {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}, got {v}", field=name)
    return v


def _token_id(v, name) -> int:
    if isinstance(v, str) and v.strip().isdigit():  # JSON object keys are strings: {"50256": -100}
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"token ids must be non-negative integers, got {v!r}", field=name)
    return v


def _logit_bias(bias) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ConfigError(f"expected a mapping {{token id: bias}}, got {bias!r}", field="logit_bias")
    out = {}
    for k, v in bias.items():
        out[_token_id(k, "logit_bias")] = _num(v, f"logit_bias.{k}", lo=-MAX_ABS_LOGIT_BIAS, hi=MAX_ABS_LOGIT_BIAS)
    return out or None


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise ConfigError(f"expected a string or a list of strings, got {stop!r}", field="stop")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"stop strings must be non-empty strings, got {s!r}", field="stop")
    return list(dict.fromkeys(stop))  # dedupe, keep order


def _id_list(ids, name) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ConfigError(f"expected a list of token ids, got {ids!r}", field=name)
    return [_token_id(i, name) for i in ids]


# --- logits processing -------------------------------------------------------------------------------------------

def _per_row(params: SamplingParams | Sequence[SamplingParams], batch: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch
    params = list(params)
    if len(params) != batch:
        raise ValueError(f"got {len(params)} SamplingParams for a batch of {batch} rows")
    return params


def _rows_tensor(values, logits) -> torch.Tensor:
    return torch.tensor(values, dtype=logits.dtype, device=logits.device).unsqueeze(1)  # [B, 1]


def _scatter_mask(shape, rows_ids: Sequence[Sequence[int]], device) -> torch.Tensor:
    """[B, V] bool, True where row b's id list contains that id."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    r = [b for b, ids in enumerate(rows_ids) for _ in ids]
    if r:
        c = [i for ids in rows_ids for i in ids]
        mask[torch.tensor(r, device=device), torch.tensor(c, device=device)] = True
    return mask


def process_logits(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
                   prompt_ids: Sequence[Sequence[int]] | None = None,
                   output_ids: Sequence[Sequence[int]] | None = None,
                   eos_token_ids: Iterable[int] = ()) -> torch.Tensor:
    """Apply steps 1-8 of the module docstring to `logits` [B, V]; returns new fp32 logits [B, V].

    `params` is one SamplingParams for every row or one per row; `prompt_ids[b]` / `output_ids[b]` are row b's
    prompt and generated token ids so far (for the penalties and min_tokens); `eos_token_ids` are the tokenizer's
    end-of-sequence ids (for min_tokens).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    B, V = logits.shape
    rows = _per_row(params, B)
    prompt_ids = prompt_ids if prompt_ids is not None else [[] for _ in range(B)]
    output_ids = output_ids if output_ids is not None else [[] for _ in range(B)]
    x = logits.float().clone()
    dev = x.device
    eos = list(eos_token_ids)

    # 1. logit_bias: one scatter-add of (row, id, bias) triples
    triples = [(b, i, v) for b, p in enumerate(rows) for i, v in (p.logit_bias or {}).items()]
    if triples:
        r, c, v = zip(*triples)
        x.index_put_((torch.tensor(r, device=dev), torch.tensor(c, device=dev)),
                     torch.tensor(v, dtype=x.dtype, device=dev), accumulate=True)

    # 2. min_tokens: EOS / stop ids are impossible until the row has generated enough
    banned = [[] if len(output_ids[b]) >= p.min_tokens else (p.stop_token_ids + ([] if p.ignore_eos else eos))
              for b, p in enumerate(rows)]
    if any(banned):
        x.masked_fill_(_scatter_mask((B, V), banned, dev), float("-inf"))

    # 3. repetition penalty (HF): over prompt + output, applied once per distinct token
    if any(p.repetition_penalty != 1.0 for p in rows):
        seen = _scatter_mask((B, V), [list(prompt_ids[b]) + list(output_ids[b]) for b in range(B)], dev)
        pen = _rows_tensor([p.repetition_penalty for p in rows], x)
        x = torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)

    # 4. presence / frequency penalties (OpenAI): over output tokens only
    if any(p.presence_penalty or p.frequency_penalty for p in rows):
        counts = torch.zeros((B, V), dtype=x.dtype, device=dev)
        r = [b for b in range(B) for _ in output_ids[b]]
        if r:
            c = [i for b in range(B) for i in output_ids[b]]
            counts.index_put_((torch.tensor(r, device=dev), torch.tensor(c, device=dev)),
                              torch.ones(len(r), dtype=x.dtype, device=dev), accumulate=True)
        x = x - _rows_tensor([p.frequency_penalty for p in rows], x) * counts \
              - _rows_tensor([p.presence_penalty for p in rows], x) * (counts > 0).to(x.dtype)

    # 5. temperature; greedy rows become a point mass on their argmax (ties: the lowest id, like torch.argmax)
    greedy = torch.tensor([p.greedy for p in rows], device=dev)
    if any(p.temperature not in (0.0, 1.0) for p in rows):
        x = x / _rows_tensor([p.temperature if not p.greedy else 1.0 for p in rows], x)
    if greedy.any():
        point = torch.full_like(x, float("-inf")).scatter_(1, x.argmax(dim=-1, keepdim=True), 0.0)
        x = torch.where(greedy.unsqueeze(1), point, x)

    # 6. top-k: drop logits below the k-th largest (ties with it survive, as in HF TopKLogitsWarper)
    ks = [min(p.top_k, V) if p.top_k > 0 and not p.greedy else V for p in rows]
    if any(k < V for k in ks):
        # the k-th largest value per row from one topk of the largest k (a full sort of the vocabulary costs far more)
        top = x.topk(max(k for k in ks if k < V), dim=-1).values
        kth = top.gather(1, torch.tensor([min(k, top.size(1)) for k in ks], device=dev).unsqueeze(1) - 1)
        kth = torch.where(torch.tensor([k < V for k in ks], device=dev).unsqueeze(1), kth, float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))

    # 7. top-p: on the ascending sort, drop the prefix whose total mass is <= 1 - top_p; the top token always stays
    if any(p.top_p < 1.0 and not p.greedy for p in rows):
        top_p = _rows_tensor([p.top_p if not p.greedy else 1.0 for p in rows], x)
        sorted_asc, idx = x.sort(dim=-1, descending=False)
        cum = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[:, -1] = False
        drop = torch.zeros_like(drop_sorted).scatter_(1, idx, drop_sorted)
        x = x.masked_fill(drop & (top_p < 1.0), float("-inf"))

    # 8. min-p: relative to the most likely token's probability
    if any(p.min_p > 0 and not p.greedy for p in rows):
        min_p = _rows_tensor([p.min_p if not p.greedy else 0.0 for p in rows], x)
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return x


def sample(processed: torch.Tensor,
           generators: torch.Generator | Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Draw one token id per row from softmax(processed) [B, V] -> LongTensor [B].

    `generators`: one torch.Generator for the whole batch, or one per row (None = the global RNG). Per-row
    generators make a seeded row's draws independent of what else is in the batch. Rows with a single finite
    logit (greedy, or filtered down to one token) take it without consuming randomness.
    """
    probs = processed.float().softmax(dim=-1)
    B = probs.shape[0]
    out = processed.argmax(dim=-1)
    one = (processed > float("-inf")).sum(dim=-1) <= 1
    if isinstance(generators, torch.Generator) or generators is None:
        rand_rows = (~one).nonzero().flatten()
        if len(rand_rows):
            out[rand_rows] = _draw(probs[rand_rows], generators)
        return out
    generators = list(generators)
    if len(generators) != B:
        raise ValueError(f"got {len(generators)} generators for a batch of {B} rows")
    global_rows = [b for b in range(B) if generators[b] is None and not one[b]]
    if global_rows:
        t = torch.tensor(global_rows, device=probs.device)
        out[t] = _draw(probs[t], None)
    for b, g in enumerate(generators):
        if g is not None and not one[b]:
            out[b] = _draw(probs[b:b + 1], g)[0]
    return out


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of probs [R, V] by inverting the CDF with one uniform draw per row. torch.multinomial draws
    V exponentials per sample on CPU (at vocabulary size that is as long as a small model's whole decode step); this is
    a float64 cumulative sum and a binary search. A zero-probability id is never drawn: it adds nothing to the
    sum, so no uniform lands in its (empty) interval."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(1).clamp_(max=probs.shape[-1] - 1)


# --- logprobs ----------------------------------------------------------------------------------------------------

@dataclass
class TokenLogprob:
    """The chosen token's logprob and the `k` most likely tokens with theirs (most likely first)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in fp32, whatever the logits' dtype (bf16 log-probs lose too much precision)."""
    return torch.log_softmax(logits.float(), dim=-1)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Per row: logprob of token_ids[b] and the top-k (id, logprob) pairs of logprobs [B, V]."""
    chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1).tolist()
    if k > 0:
        vals, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(int(t), lp, top) for t, lp, top in zip(token_ids.tolist(), chosen, tops)]


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
