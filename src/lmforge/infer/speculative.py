"""Speculative decoding: something cheap proposes K tokens, the target model checks all of them in ONE forward pass.

    res = speculative_generate(model, tok, "In the beginning", SamplingParams(temperature=0, max_tokens=64))
    res = speculative_generate(model, tok, prompt, params, draft_model=small, lookahead=4)
    res.text, res.token_ids, res.spec_stats.acceptance_rate, res.spec_stats.target_forwards

Same inputs, outputs and stopping rules as `generate()` (it returns a GenerationResult subclass, or a stream of
Deltas); only the way tokens are produced differs. Two proposers:

  draft model    a smaller model with the SAME tokenizer proposes d_1..d_K one at a time, each drawn from its own
                 processed distribution q_i (process_logits with the request's SamplingParams).
  prompt lookup  (no draft; "prompt lookup decoding", Saxena 2023) find the most recent earlier occurrence of the
                 sequence's last n tokens (n = ngram, then shorter) in prompt + output and propose the K tokens
                 that followed it. Free to propose, and strong wherever text repeats (code edits, quoting, RAG).
                 The proposal is deterministic: q_i is a point mass.

Verification (Leviathan et al. 2023, Chen et al. 2023). The target runs once on [last token, d_1..d_K] and gives
logits at K+1 positions; p_i is what process_logits makes of them — the distribution generate() would sample from
at that point, so penalties and min_tokens see the output so far plus d_1..d_{i-1}. Accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw a replacement from normalize(max(p_i - q_i, 0)) and drop
the rest; if all K are accepted draw a bonus token from p_{K+1}. Every emitted token is then distributed exactly as
p_i: the output has generate()'s distribution (not its exact samples: the random numbers are used differently).
Greedy is the special case where p and q are point masses: d_i is kept iff it is the target's argmax and the
replacement IS the argmax, so the output equals generate(temperature=0) token for token. (Both compute the same
logits, one token vs several tokens per forward pass; rounding could only flip a near-tie: never seen in fp32,
likelier under bf16 autocast.)

Caches: the target's KV cache always holds the sequence but its last token, which opens the next verify pass;
rejected positions are discarded by setting `cache.pos` back. The draft's cache is cut back the same way and
catches up on the accepted tokens (and the replacement) at its next proposal.

Stopping is generate()'s: the tokens of one step are appended one at a time, and the first EOS / stop id / stop
string / budget ends the generation there; what the target accepted beyond it is dropped. The token budget also
caps K, so the caches never hold more than generate()'s would. A stream yields one Delta per verification step
(all the tokens it emitted), where generate() yields one per token; the text joins up the same.

Where it pays: with the C++ decode step (lmforge.infer.native) the verify pass runs through its multi-token pass
(FastDecoder.extend): each weight is read once for all K+1 positions, so on a model whose step is memory-bound it
costs about one plain decode step, and every accepted proposal is a step saved. Draft proposals also run through
the draft's native step. K adapts to the acceptance rate (`adaptive`). Prompt lookup pays most under greedy
decoding on text that repeats its input (rewriting, quoting, RAG); under sampling its proposals are rarely
accepted. On a tiny model, where a step is mostly fixed overhead, there is little to save. Measured numbers:
bench/speculative.py.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.checkpoint import unwrap
from lmforge.infer import fastpath
from lmforge.infer.detokenize import Detokenizer, stop_check
from lmforge.infer.outputs import Delta, GenerationResult, GenerationStream
from lmforge.infer.request import Request, prepare
from lmforge.runtime import autocast, resolve_precision
from lmforge.infer.sampling import SamplingParams, gather_logprobs, log_probs, process_logits, sample


@dataclass
class SpecStats:
    """How well the speculation went. acceptance_rate = accepted / proposed."""
    proposed: int = 0          # proposed tokens the target checked
    accepted: int = 0          # of those, accepted (counted at verification, before any stop cut the output)
    steps: int = 0             # verification passes (each emits 1 + its accepted tokens)
    target_forwards: int = 0   # target forward passes, the prompt's prefill included
    draft_forwards: int = 0    # draft model forward passes (0 for prompt lookup)
    emitted: int = 0           # tokens in the output

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Output tokens per verification pass: 1.0 is plain decoding, lookahead + 1 the best possible."""
        return self.emitted / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_step": self.tokens_per_step}


@dataclass
class SpecResult(GenerationResult):
    spec_stats: SpecStats = field(default_factory=SpecStats)


class SpecStream(GenerationStream):
    """A GenerationStream whose `.result` is a SpecResult; `.spec_stats` is live while it runs."""

    def __init__(self, deltas: Iterator[Delta], prompt_ids: list[int], stats: SpecStats):
        super().__init__(deltas, prompt_ids)
        self.spec_stats = stats

    def __iter__(self) -> Iterator[Delta]:
        for d in super().__iter__():
            if d.finish_reason is not None:  # the base class has just built the result: add the stats
                base = {f.name: getattr(self.result, f.name) for f in dataclasses.fields(GenerationResult)}
                self.result = SpecResult(**base, spec_stats=self.spec_stats)
            yield d


# ---------------------------------------------------------------------------------------------------------------
# the accept/reject rule (batched, so it can be tested on many rows at once)

def verify(p_logits: torch.Tensor, draft: torch.Tensor, q_probs: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for B rows at once.

    p_logits [B, K+1, V]: the target's PROCESSED logits at each proposed position and one past the last.
    draft    [B, K]:      the proposed tokens.
    q_probs  [B, K, V]:   the distributions they were drawn from; None = point masses on `draft` (prompt lookup).
    Returns (n_accepted [B], next_token [B]): row b emits draft[b, :n_accepted[b]] followed by next_token[b].
    Randomness is drawn only where the outcome is uncertain (greedy rows consume none).
    """
    B, K1, V = p_logits.shape
    K = K1 - 1
    dev = p_logits.device
    p = p_logits.float().softmax(dim=-1)
    rows = torch.arange(B, device=dev)
    if K == 0:
        return torch.zeros(B, dtype=torch.long, device=dev), sample(p_logits[:, 0].float(), generator)

    px = p[:, :K].gather(2, draft.unsqueeze(-1)).squeeze(-1)                       # [B, K]
    qx = torch.ones_like(px) if q_probs is None else q_probs.float().gather(2, draft.unsqueeze(-1)).squeeze(-1)
    # accept iff u < p/q, written u*q < p: p >= q always accepts, p = 0 never does, and no division by zero
    uncertain = (px > 0) & (px < qx)
    u = torch.rand(B, K, generator=generator, device=dev) if uncertain.any() else torch.zeros_like(px)
    n = (u * qx < px).long().cumprod(dim=1).sum(dim=1)                             # accepted prefix length

    # the next token: from the residual max(p - q, 0) at the first rejection, or from p at the bonus position
    p_n = p[rows, n]                                                               # [B, V] (n == K: bonus)
    at = n.clamp(max=K - 1)
    q_n = (torch.nn.functional.one_hot(draft[rows, at], V).float() if q_probs is None
           else q_probs.float()[rows, at])
    residual = (p_n - q_n).clamp(min=0)
    # a rejection means p < q somewhere, so the residual has mass; if rounding ate it all, p is the right fallback
    use_residual = (n < K) & (residual.sum(dim=-1) > 0)
    dist = torch.where(use_residual.unsqueeze(1), residual, p_n)
    return n, sample(dist.log(), generator)  # log(0) = -inf: sample() takes single-token rows without randomness


# ---------------------------------------------------------------------------------------------------------------
# proposers

def ngram_proposal(seq: Sequence[int], k: int, ngram: int = 3) -> list[int]:
    """Prompt lookup: the k tokens that followed the most recent earlier occurrence of seq's last n tokens,
    trying n = ngram, ngram-1, ..., 1. A match close to the end is continued periodically (an overlapping copy,
    as LZ77 does), so "a b a b a" proposes "b a b ...". [] when nothing matches."""
    L = len(seq)
    if k <= 0 or L < 2:
        return []
    arr = np.asarray(seq, dtype=np.int64)
    for n in range(min(ngram, L - 1), 0, -1):
        # windows starting at 0..L-n-1: every occurrence except the suffix itself
        win = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((win == arr[L - n:]).all(axis=1))
        if len(hits):
            src = int(hits[-1]) + n                  # the continuation starts here
            period = L - src                         # seq[src:] ... then the copy runs into its own output
            return [int(arr[src + j % period]) for j in range(k)]
    return []


class _Draft:
    """A draft model with its own KV cache. The cache holds a prefix of the sequence; `propose` catches up on what
    is missing and then runs one token at a time."""

    def __init__(self, model, req: Request, max_len: int):
        self.model, self.req = model, req
        self.max_seq = model.config.max_seq_len
        self.cache = model.new_kv_cache(1, max_len=min(self.max_seq, max_len))
        self.device = next(model.parameters()).device
        self.fast = None          # set under inference_mode by the loop

    def forward(self, feed: list[int]) -> torch.Tensor:
        """Logits [V] after feeding `feed` into the draft's cache (one native call when it runs)."""
        return forward_tokens(self.model, self.fast, feed, self.cache, self.device)[-1]

    def propose(self, seq: list[int], out_ids: list[int], k: int, gen, stats: SpecStats):
        """Up to k tokens and the distributions q [k, V] they were drawn from (the draft's processed ones;
        None when greedy: point masses)."""
        k = min(k, self.max_seq - len(seq) + 1)  # the draft reads seq + d_1..d_{k-1}: stay within its context
        if k <= 0:
            return [], None
        params, req = self.req.params, self.req
        feed = seq[self.cache.pos:]
        props, qs = [], []
        if params.argmax_only:   # plain greedy: the draft's argmax, no logit processing
            for _ in range(k):
                t = int(argmax(self.fast, self.forward(feed)[None], req.vocab)[0])
                stats.draft_forwards += 1
                props.append(t)
                feed = [t]
            return props, None
        for _ in range(k):
            raw = self.forward(feed)[None, :req.vocab].float()  # a model may pad its vocabulary; padding is no token
            stats.draft_forwards += 1
            q = process_logits(raw, params, [req.prompt_ids], [out_ids + props], eos_token_ids=req.eos)
            t = int(sample(q, [gen])[0])
            props.append(t)
            if not params.greedy:  # greedy q is a point mass on t: verify's q=None says just that
                qs.append(q[0].softmax(dim=-1))
            feed = [t]
        return props, torch.stack(qs) if qs else None

    def rollback(self, valid: int) -> None:
        """Keep only the first `valid` cached positions (the rest held rejected proposals)."""
        self.cache.pos = min(self.cache.pos, valid)


# ---------------------------------------------------------------------------------------------------------------
# the loop

def fast_decoder(model):
    """The model's decode fast path (FastDecoder) when it runs the C++ step here, else None (module path)."""
    if not fastpath.usable(model):
        return None
    dec = fastpath.FastDecoder(model)
    return dec if dec.native else None


def argmax(fast, logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """logits[:, :vocab].argmax(-1), through the fast path's native argmax when there is one."""
    return fast.argmax(logits, vocab) if fast is not None else logits[:, :vocab].argmax(dim=-1)


def forward_tokens(model, fast, tokens: list[int], cache, device) -> torch.Tensor:
    """Feed `tokens` into one row's KV cache and return their logits [T, V]. A short run goes through the fast path's
    multi-token pass (each weight read once for all T positions: about one decode step on a memory-bound model);
    a long one (a prompt) through the model's forward."""
    if fast is not None and len(tokens) <= MAX_FAST_TOKENS:
        logits = fast.extend(torch.tensor([tokens], dtype=torch.long), cache)
        if logits is not None:
            return logits[0]
    logits, _ = model(torch.tensor([tokens], device=device), kv_cache=cache, logits_to_keep=len(tokens))
    return logits[0]


MAX_FAST_TOKENS = 16


def _spec_decode(model, tokenizer, req: Request, draft_model, lookahead: int, ngram: int, precision: str,
                 stats: SpecStats, adaptive: bool = False) -> Iterator[Delta]:
    params, prompt_ids = req.params, req.prompt_ids
    max_lookahead = min(MAX_FAST_TOKENS - 1, max(2 * lookahead, 8))
    ends = set(req.eos) | set(params.stop_token_ids)
    device = next(model.parameters()).device
    gen = params.make_generator(device, offset=req.choice)
    detok = Detokenizer(tokenizer, params.stop)
    max_len = len(prompt_ids) + req.budget - 1  # what generate() would cache: K is capped so we never need more
    cache = model.new_kv_cache(1, max_len=max_len)
    draft = _Draft(draft_model, req, max_len) if draft_model is not None else None
    seq = list(prompt_ids)   # prompt + output; the target's cache holds all of it but the last token
    # plain greedy (no logprobs to report): accept by comparing argmaxes, which is what verify() reduces to
    argmax_only = params.argmax_only and params.logprobs is None
    out_ids: list[int] = []

    models = [model] + ([draft_model] if draft_model is not None else [])
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode(), autocast(device, resolve_precision(precision, device)):
            for m in models:   # as the engine does: (in, out) weight copies for the 1-row steps on CPU
                if device.type == "cpu" and hasattr(m, "use_transposed_weights"):
                    m.use_transposed_weights(True)
            fast = fast_decoder(model)
            if draft is not None:
                draft.fast = fast_decoder(draft_model)
            if len(seq) > 1:
                model(torch.tensor([seq[:-1]], device=device), kv_cache=cache, logits_to_keep=1)
                stats.target_forwards += 1
            while True:
                # 1. propose: never more than the budget can take (n accepted + 1 more token <= remaining)
                k = min(lookahead, req.budget - len(out_ids) - 1)
                if draft is not None:
                    proposal, q = draft.propose(seq, out_ids, k, gen, stats)
                else:
                    proposal, q = ngram_proposal(seq, k, ngram), None
                K = len(proposal)

                # 2. one target pass over [last token, d_1..d_K]: logits for K+1 positions
                raw = forward_tokens(model, fast, [seq[-1]] + proposal, cache, device)[:, :req.vocab].float()
                stats.target_forwards += 1                # [K+1, vocab]: draft and target may pad differently
                # 3. accept/reject
                if argmax_only:                           # keep the proposals that are the target's argmax
                    best = argmax(fast, raw, req.vocab).tolist()
                    n = next((i for i in range(K) if proposal[i] != best[i]), K)
                    nxt = best[n]
                else:
                    # position i follows d_1..d_{i-1}: penalties and min_tokens must see them as output
                    processed = process_logits(raw, params, [prompt_ids] * (K + 1),
                                               [out_ids + proposal[:i] for i in range(K + 1)], eos_token_ids=req.eos)
                    n, nxt = verify(processed.unsqueeze(0), torch.tensor([proposal], dtype=torch.long, device=device),
                                    None if q is None else q.to(device).unsqueeze(0), gen)
                    n, nxt = int(n[0]), int(nxt[0])
                if adaptive and K:                         # all accepted: propose more; a rejection: fewer
                    lookahead = min(lookahead + 2, max_lookahead) if n == K else max(1, lookahead - 1)
                stats.steps += 1
                stats.proposed += K
                stats.accepted += n
                cache.pos = len(seq) + n  # keep seq and d_1..d_n; the new last token is fed next step
                if draft is not None:
                    draft.rollback(len(seq) + n)
                new = proposal[:n] + [nxt]
                seq += new

                # 4. emit one token at a time, with generate()'s stopping rules
                lps = None
                if params.logprobs is not None:
                    src = log_probs(raw[: n + 1] if params.logprobs_mode == "raw" else processed[: n + 1])
                    lps = gather_logprobs(src, torch.tensor(new, device=device), params.logprobs)
                for i, tok in enumerate(new):
                    out_ids.append(tok)
                    stats.emitted += 1
                    finish, reason = stop_check(detok, tok, out_ids, req, ends)
                    if finish is not None:
                        yield Delta(detok.ready(final=True), new[: i + 1], lps[: i + 1] if lps else lps,
                                    finish, reason)
                        return
                yield Delta(detok.ready(), new, lps)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)


def check_draft(model, tokenizer, draft_model, draft_tokenizer=None, file: str | None = None) -> None:
    """The draft must share the target's tokenizer and device (`file`: where the draft came from, for errors)."""
    where = {"file": str(file)} if file is not None else {"field": "draft_model"}
    if draft_tokenizer is not None and draft_tokenizer != tokenizer:
        raise LmforgeError("the draft model's tokenizer differs from the target's: speculative decoding needs "
                           "both to share one tokenizer", **where)
    dv = draft_model.config.vocab_size
    if dv < tokenizer.vocab_size:
        raise LmforgeError(f"the draft model has {dv} tokens but the tokenizer {tokenizer.vocab_size}: draft and "
                           f"target must share one tokenizer", **where)
    if next(draft_model.parameters()).device != next(model.parameters()).device:
        raise LmforgeError("the draft model must be on the same device as the target", **where)


def speculative_generate(model, tokenizer, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                         draft_model=None, draft_tokenizer=None, lookahead: int = 4, ngram: int = 3,
                         adaptive: bool = True, add_bos: bool | None = None, precision: str = "fp32",
                         stream: bool = False):
    """generate(), sped up by speculation (see the module docstring); same arguments and results, plus
    `result.spec_stats` (a SpecStats; `stream.spec_stats` while streaming).

    draft_model:     a model sharing `tokenizer` (pass `draft_tokenizer` to have that checked); None = prompt lookup.
    lookahead:       K, tokens proposed per step (the starting K when adaptive).
    adaptive:        tune K as it goes: +2 after a pass that accepted every proposal, -1 after a rejection
                     (between 1 and max(2 K, 8)), so K follows the acceptance rate of the text at hand.
    ngram:           prompt lookup matches the last `ngram` tokens first, then shorter suffixes down to one token.
    """
    params = params or SamplingParams()
    if params.n != 1:
        raise ConfigError("speculative_generate() makes one completion; call it once per completion", field="n")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ConfigError(f"must be an integer >= 1, got {lookahead!r}", field="lookahead")
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ConfigError(f"must be an integer >= 1, got {ngram!r}", field="ngram")
    model = unwrap(model)
    if draft_model is not None:
        draft_model = unwrap(draft_model)
        check_draft(model, tokenizer, draft_model, draft_tokenizer)
    req = prepare(model, tokenizer, prompt, params, add_bos)
    stats = SpecStats()
    s = SpecStream(_spec_decode(model, tokenizer, req, draft_model, lookahead, ngram, precision, stats, adaptive),
                   req.prompt_ids, stats)
    return s if stream else s.consume()
