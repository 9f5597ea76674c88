"""Test-time compute: spend more inference on one prompt to get a better answer.

    res = best_of_n(model, tok, prompt, SamplingParams(n=8, temperature=0.8, max_tokens=64, seed=0))
    res = best_of_n(model, tok, prompt, params, scorer=lambda p, c: reward(p, c))   # a reward model, a checker...
    res = self_consistency(model, tok, prompt, params)              # majority vote over the last number
    res = beam_search(model, tok, prompt, n_beams=4, max_tokens=32, length_penalty=1.0)
    res.best.text, [(c.score, c.text) for c in res.candidates], res.votes

Every method returns ALL candidates with their scores, not just the winner, so a caller can show or re-rank them.

- best-of-N samples N completions and keeps the one with the highest score: its mean token logprob under the
  model's RAW distribution (log_softmax of the model's logits before temperature/top-k/...: comparable however
  it was sampled), or `scorer(prompt_text, completion_text)` when one is given. Ties go to the earliest sample.
- self-consistency (Wang et al. 2022) samples N completions, extracts an answer from each (default: the last
  number in the text) and returns the most common answer. Candidates without an answer do not vote. Ties between
  answers go to the answer whose best candidate has the higher mean logprob, then to the answer seen first;
  `best` is that answer's candidate with the highest mean logprob.
- beam search keeps the n_beams most likely partial sequences (sum of token logprobs) and scores a finished one
  by sum_logprob / length ** length_penalty, where length counts the generated tokens including the terminating
  EOS/stop token. It reproduces Hugging Face `generate(num_beams=K, do_sample=False, length_penalty=...,
  early_stopping=...)`: the same candidates per step (the top max(2, 1 + #end ids) * K continuations), only the
  top K of them may finish, the same three early-stopping rules, and the n_beams best finished hypotheses.

The terminating token (EOS / stop id) is part of `token_ids` and of the logprob sums (ending is a decision the
model makes, and HF counts it too) but never of `text` — the same convention as `generate()`.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.checkpoint import unwrap
from lmforge.infer.engine import generate_n
from lmforge.infer.outputs import GenerationResult
from lmforge.infer.request import prepare
from lmforge.infer.sampling import SamplingParams, log_probs


@dataclass
class Candidate:
    """One completion and what it scored. `score` is what the method ranks by (see each method)."""
    text: str
    token_ids: list[int]                  # generated ids, the terminating EOS/stop id included
    score: float
    mean_logprob: float                   # sum_logprob / len(token_ids), raw distribution
    sum_logprob: float
    finish_reason: str                    # 'stop' | 'length'
    answer: Hashable | None = None        # self-consistency: the extracted answer (None = none found)
    logprobs: list[float] = field(default_factory=list, repr=False)  # one per token_ids entry


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate]           # best-of-N / self-consistency: in sampling order; beam: best first
    votes: dict | None = None             # self-consistency: {answer: count}, most votes first

    def table(self, width: int = 60) -> str:
        """The candidates as text lines (best marked with '*'): score, mean logprob, answer, the text's start."""
        lines = [f"  {'score':>9} {'mean lp':>8} {'tokens':>6}  {'answer':<10} text"]
        for c in self.candidates:
            text = c.text if len(c.text) <= width else c.text[:width - 1] + "…"
            answer = "" if c.answer is None else str(c.answer)
            lines.append(f"{'*' if c is self.best else ' '} {c.score:9.4f} {c.mean_logprob:8.4f} "
                         f"{len(c.token_ids):6d}  {answer:<10} {text!r}")
        if self.votes is not None:
            lines.append("votes: " + (", ".join(f"{a!s}: {n}" for a, n in self.votes.items()) or "no answers"))
        return "\n".join(lines)


SampleFn = Callable[..., list[GenerationResult]]


# ---------------------------------------------------------------------------------------------------------------
# sampling N candidates (shared by best-of-N and self-consistency)

def _prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    return _text(tokenizer, ids)


def _text(tokenizer, ids: Sequence[int]) -> str:
    """Ids -> text without special tokens (as generate() shows them)."""
    special = getattr(tokenizer, "is_special", lambda i: False)
    return b"".join(tokenizer.id_to_bytes(i) for i in ids if not special(i)).decode("utf-8", errors="replace")


def _sample(model, tokenizer, prompt, params: SamplingParams, sample_fn: SampleFn | None, progress: bool,
            **gen_kw) -> list[Candidate]:
    """params.n completions with raw-distribution logprobs, as Candidates (score not set yet)."""
    if not isinstance(params, SamplingParams):
        raise ConfigError(f"expected SamplingParams, got {type(params).__name__}", field="params")
    # raw logprobs of the chosen tokens (the caller's top-k alternatives count is kept if they asked for one)
    params = params.replace(logprobs=params.logprobs if params.logprobs is not None else 0, logprobs_mode="raw")
    sample_fn = sample_fn or generate_n
    if progress and params.n > 1:
        # one call per sample, to show progress. Completion i is seeded with seed + i, exactly as one call
        # with n=N does, so the candidates are the same either way.
        from tqdm import tqdm
        results = []
        for i in tqdm(range(params.n), desc="sampling", unit="sample", disable=None, leave=False):
            one = params.replace(n=1, seed=None if params.seed is None else params.seed + i)
            results += sample_fn(model, tokenizer, prompt, one, **gen_kw)
    else:
        results = sample_fn(model, tokenizer, prompt, params, **gen_kw)
    if len(results) != params.n:
        raise ValueError(f"the sampler returned {len(results)} completions for n={params.n}")
    out = []
    for r in results:
        if r.logprobs is None or len(r.logprobs) != len(r.token_ids):
            raise ValueError("the sampler must return one logprob per token (params.logprobs was set)")
        lps = [lp.logprob for lp in r.logprobs]
        total = math.fsum(lps)
        mean = total / len(lps) if lps else float("-inf")
        out.append(Candidate(r.text, list(r.token_ids), mean, mean, total, r.finish_reason, logprobs=lps))
    return out


# ---------------------------------------------------------------------------------------------------------------
# best-of-N

def best_of_n(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams, *,
              scorer: Callable[[str, str], float] | None = None, sample_fn: SampleFn | None = None,
              progress: bool = True, **gen_kw) -> SearchResult:
    """Sample params.n completions; `best` has the highest score (ties: the earliest sample).

    score = scorer(prompt_text, completion_text) when a scorer is given (a reward model, a unit test, a regex),
    else the completion's mean token logprob under the raw model distribution.
    sample_fn(model, tokenizer, prompt, params, **gen_kw) -> list[GenerationResult] defaults to generate_n (the
    batched engine can pass its own); gen_kw (add_bos, precision) go to it.
    """
    cands = _sample(model, tokenizer, prompt, params, sample_fn, progress, **gen_kw)
    if scorer is not None:
        ptext = _prompt_text(tokenizer, prompt)
        for i, c in enumerate(cands):
            s = scorer(ptext, c.text)
            if isinstance(s, torch.Tensor) and s.numel() == 1:
                s = s.item()
            if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s):
                raise LmforgeError(f"the scorer returned {s!r} for candidate {i}; expected a number", field="scorer")
            c.score = float(s)
    best = max(cands, key=lambda c: c.score)  # max() keeps the first of equal scores
    return SearchResult(best, cands)


# ---------------------------------------------------------------------------------------------------------------
# self-consistency

# a number: optional minus (not when glued to a word, as in "5-3"), digits with optional thousands commas,
# optional decimals
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in `text`, normalised so that equal values vote together: '1,000' -> '1000',
    '42.0' -> '42', '-0.50' -> '-0.5'. None when there is no number."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def self_consistency(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams, *,
                     extract: Callable[[str], Hashable | None] | None = None, sample_fn: SampleFn | None = None,
                     progress: bool = True, **gen_kw) -> SearchResult:
    """Sample params.n completions, extract an answer from each, return the plurality answer.

    extract(text) -> answer or None (default: last_number). Each candidate's score is the share of the N samples
    that gave its answer (0 for no answer). Ties between answers: the answer whose best candidate has the higher
    mean logprob wins, then the answer seen first. `best` is the winning answer's candidate with the highest mean
    logprob (the earliest of equals). With no answer at all, `best` is the most likely candidate and votes is {}.
    """
    extract = extract or last_number
    cands = _sample(model, tokenizer, prompt, params, sample_fn, progress, **gen_kw)
    for c in cands:
        c.answer = extract(c.text)
    votes = Counter(c.answer for c in cands if c.answer is not None)
    n = len(cands)
    for c in cands:
        c.score = votes[c.answer] / n if c.answer is not None else 0.0

    def top_of(answer):  # the answer's most likely candidate (first of equals)
        return max((c for c in cands if c.answer == answer), key=lambda c: c.mean_logprob)

    if votes:
        first_seen = {a: i for i, a in reversed(list(enumerate(c.answer for c in cands)))}
        ranked = sorted(votes, key=lambda a: (-votes[a], -top_of(a).mean_logprob, first_seen[a]))
        best = top_of(ranked[0])
        votes = {a: votes[a] for a in ranked}
    else:
        best, votes = max(cands, key=lambda c: c.mean_logprob), {}
    return SearchResult(best, cands, votes)


# ---------------------------------------------------------------------------------------------------------------
# beam search

@dataclass
class _Hyp:
    ids: list[int]
    lps: list[float]
    total: float   # sum of logprobs, accumulated in fp32 as the topk saw it (HF's running score)


def beam_search(model, tokenizer, prompt: str | Sequence[int], *, n_beams: int = 4, max_tokens: int | None = 64,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, add_bos: bool | None = None,
                precision: str = "fp32", progress: bool = True) -> SearchResult:
    """Deterministic beam search through the model's KV cache (one cache row per beam).

    A hypothesis ends on the tokenizer's EOS/BOS (as in generate(); not with ignore_eos) or a stop_token_id, or
    at max_tokens. Its score is sum_logprob / len ** length_penalty (HF's convention: > 0 favours longer
    sequences, < 0 shorter ones). early_stopping: True = stop as soon as n_beams hypotheses finished; False = stop
    when the best running beam, scored at its current length, cannot beat the worst of n_beams finished ones;
    "never" = like False but, with length_penalty > 0, scored at max_tokens (the canonical bound).
    max_tokens=None runs until the context is full. Returns the n_beams best finished hypotheses, best first.
    """
    if isinstance(n_beams, bool) or not isinstance(n_beams, int) or n_beams < 1:
        raise ConfigError(f"must be an integer >= 1, got {n_beams!r}", field="n_beams")
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ConfigError(f"must be a finite number, got {length_penalty!r}", field="length_penalty")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ConfigError(f"must be true, false or 'never', got {early_stopping!r}", field="early_stopping")
    model = unwrap(model)
    # the same prompt handling, checks and end ids as generate()
    req = prepare(model, tokenizer, prompt,
                   SamplingParams(max_tokens=max_tokens, stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos),
                   add_bos)
    ends = set(req.eos) | set(req.params.stop_token_ids)
    K, budget, prompt_ids = n_beams, req.budget, req.prompt_ids
    keep = max(2, 1 + len(ends)) * K  # enough candidates that K of them are still running after EOS picks
    device = next(model.parameters()).device

    def normed(total: float, length: int) -> float:
        return total / length ** length_penalty

    running = [_Hyp([], [], 0.0)]
    finished: list[tuple[float, _Hyp]] = []  # (score, hyp), best first, at most K
    from lmforge.runtime import autocast, resolve_precision
    from tqdm import tqdm
    bar = tqdm(total=budget, desc="beam search", unit="tok", disable=None if progress else True, leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, resolve_precision(precision, device)):
            cache = model.new_kv_cache(1, max_len=len(prompt_ids) + budget - 1)  # the last token is never fed
            logits, _ = model(torch.tensor([prompt_ids], device=device), kv_cache=cache, logits_to_keep=1)
            for t in range(1, budget + 1):  # t = generated length once this step's token is appended
                raw = logits[:, -1, :].float()
                if req.vocab < raw.shape[-1]:
                    raw[:, req.vocab:] = float("-inf")  # model padding is no token
                lp = log_probs(raw)  # (beams, V)
                scores = torch.tensor([h.total for h in running], device=device)
                total = (lp + scores[:, None]).flatten()
                top_v, top_i = total.topk(min(keep, total.numel()))
                V = lp.shape[-1]
                new_running, new_origin, just_finished = [], [], []
                for rank, (v, i) in enumerate(zip(top_v.tolist(), top_i.tolist())):
                    if v == float("-inf"):
                        break
                    b, tok = divmod(i, V)
                    h = _Hyp(running[b].ids + [tok], running[b].lps + [lp[b, tok].item()], v)
                    if tok in ends or t == budget:
                        if rank < K:  # candidates past the top K are only there to keep K beams running
                            just_finished.append((normed(v, t), h))
                    elif len(new_running) < K:
                        new_running.append(h)
                        new_origin.append(b)
                # keep the K best finished (stable: earlier ones win ties)
                finished = sorted(finished + just_finished, key=lambda sh: -sh[0])[:K]
                bar.update(1)
                if t == budget or not new_running or _done(finished, new_running, K, t, budget,
                                                           length_penalty, early_stopping):
                    break
                running = new_running
                _reorder(cache, new_origin)
                feed = torch.tensor([[h.ids[-1]] for h in running], device=device)
                logits, _ = model(feed, kv_cache=cache, logits_to_keep=1)
    finally:
        bar.close()
        model.train(was_training)

    cands = []
    for score, h in finished:
        stopped = h.ids[-1] in ends
        total = math.fsum(h.lps)
        cands.append(Candidate(_text(tokenizer, h.ids[:-1] if stopped else h.ids), h.ids, score,
                               total / len(h.ids), total, "stop" if stopped else "length", logprobs=h.lps))
    return SearchResult(cands[0], cands)


def _reorder(cache, origin: list[int]) -> None:
    """Make cache row i hold the keys/values of beam origin[i]."""
    if origin == list(range(cache.batch)):
        return
    idx = torch.tensor(origin, device=cache.k.device)
    if len(origin) != cache.batch:  # the first step grows 1 row into K (or fewer beams survive): new buffers
        cache.k, cache.v = cache.k.index_select(1, idx), cache.v.index_select(1, idx)
        cache.batch = len(origin)
    else:  # copy only the filled slots (indexing copies first, so rows may read and write each other)
        cache.k[:, :, :, :cache.pos] = cache.k[:, idx, :, :cache.pos]
        cache.v[:, :, :, :cache.pos] = cache.v[:, idx, :, :cache.pos]


def _done(finished, running, K: int, t: int, budget: int, length_penalty: float, early_stopping) -> bool:
    """HF's stopping rules, checked after step t (running beams now hold t tokens)."""
    if len(finished) < K:
        return False
    if early_stopping is True:
        return True
    # can the best running beam still beat the worst finished hypothesis? (a heuristic for length_penalty > 0
    # with early_stopping=False: a longer continuation could score higher; "never" bounds it at max length)
    length = budget if early_stopping == "never" and length_penalty > 0 else t
    best_possible = running[0].total / length ** length_penalty
    return best_possible <= finished[-1][0]
