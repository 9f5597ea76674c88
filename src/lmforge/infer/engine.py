"""The inference engine: many prompts, one preallocated KV cache, prefill once, then decode a batch per step.

    engine = Engine(model, tok)
    results = engine.generate(["In the beginning", "And God said"], SamplingParams(max_tokens=40, n=2, seed=0))
    results[1][0].text                       # prompt 1, completion 0 (of params.n)
    for i, choice, delta in engine.start(prompts, params):   # a stream: (prompt index, completion index, Delta)
        ...

How a batch runs:
  1. prefill   the distinct prompts, left-padded to the longest, in ONE forward (a padding mask keeps rows apart,
               positions count real tokens only), writing the cache;
  2. fan out   a prompt asked for n completions gets n cache rows copied from its prefilled row: the prompt is
               computed once, not n times;
  3. decode    one forward per step for every live row; a row that finishes (EOS, stop id, stop string, grammar
               complete, budget) is dropped from the cache at once, so the batch shrinks as rows end.

Each row samples with its own SamplingParams and its own seeded generator (`seed + completion index`): the same
request gives the same tokens alone or inside any batch. Greedy outputs of a batch equal batch-1 outputs.
A `constraint` (a `lmforge.infer.constrained.Grammar`) masks each row's logits to what its grammar allows; the
row stops when the grammar is complete. The raw logprobs stay the model's own (unconstrained) distribution.

Fast path: when every live row is greedy with no penalty, bias, min_tokens, logprobs or grammar, a step is just
argmax over the last logits (no [B, V] processing), which is what a small model's decode speed needs on CPU.
Decode steps of Llama-style fp32 models run through `lmforge.infer.fastpath.FastDecoder` (same logits; on CPU a
C++ step built on first use, lmforge.infer.native, else about half the tensor ops per layer of the module path);
the prefill and every other model use the model's forward.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.fastpath import FastDecoder
from lmforge.infer.fastpath import usable as fastpath_usable
from lmforge.infer.generate import (Delta, Detokenizer, GenerationResult, _autocast, _prepare, _Request, _unwrap,
                                    end_token_ids, stop_check)
from lmforge.infer.sampling import SamplingParams, gather_logprobs, log_probs, process_logits, sample


@dataclass
class _Row:
    """One completion being generated: a cache row while it is live."""
    prompt: int                          # index of its prompt in the batch
    choice: int                          # which of that prompt's n completions
    req: _Request
    ends: set[int]
    gen: torch.Generator | None
    detok: Detokenizer
    matcher: object | None = None        # a constrained.Matcher
    out: list[int] = dataclasses.field(default_factory=list)
    fast: bool = False                   # plain greedy: argmax is the whole sampling step


class Run:
    """A prepared batch (everything validated at `Engine.start`). Iterate for (prompt, choice, Delta); each
    (prompt, choice) stream ends with a Delta whose finish_reason is set. After iterating, `results[p][c]`."""

    def __init__(self, engine: "Engine", rows: list[_Row], prompts: list[list[int]]):
        self.engine, self.rows, self.prompt_ids = engine, rows, prompts
        n = [0] * len(prompts)
        for r in rows:
            n[r.prompt] += 1
        self.results: list[list[GenerationResult | None]] = [[None] * k for k in n]
        self._started = False

    def __iter__(self) -> Iterator[tuple[int, int, Delta]]:
        if self._started:
            raise RuntimeError("a Run can be iterated once")
        self._started = True
        acc = {(r.prompt, r.choice): ([], []) for r in self.rows}
        for p, c, d in self.engine._decode(self.rows, self.prompt_ids):
            text, lps = acc[(p, c)]
            text.append(d.text)
            lps += d.logprobs or []
            if d.finish_reason is not None:
                row = next(r for r in self.rows if (r.prompt, r.choice) == (p, c))
                self.results[p][c] = GenerationResult(
                    "".join(text), list(row.out), d.finish_reason, d.stop_reason,
                    lps if row.req.params.logprobs is not None else None, self.prompt_ids[p])
            yield p, c, d

    def consume(self) -> list[list[GenerationResult]]:
        for _ in self:
            pass
        return self.results


class Engine:
    """Batched generation for one model + tokenizer. precision: 'fp32' (default, exact), 'bf16', 'fp16', 'auto'."""

    def __init__(self, model, tokenizer, *, precision: str = "fp32", transposed_weights: bool | None = None,
                 fast_path: bool = True):
        self.model = _unwrap(model)
        # decode steps through lmforge.infer.fastpath when the model allows it (same logits, far fewer ops)
        self.fast_path = fast_path
        self.tokenizer = tokenizer
        self.precision = precision
        self.device = next(self.model.parameters()).device
        # CPU decoding reads (in, out) weight copies ~2x faster at batch 1 (Transformer.use_transposed_weights);
        # by default on CPU for models up to 2B parameters (the copy doubles their matmul weights in memory)
        if transposed_weights is None:
            transposed_weights = self.device.type == "cpu" and sum(p.numel() for p in self.model.parameters()) <= 2e9
        if transposed_weights and hasattr(self.model, "use_transposed_weights"):
            self.model.use_transposed_weights(True)
        self._eos = end_token_ids(tokenizer)     # for min_tokens (rows with ignore_eos leave them alone)

    # ---- API ----
    def start(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None
              = None, *, constraint=None, add_bos: bool | None = None) -> Run:
        """Validate and prepare a batch: `params` (and `constraint`) one for all prompts or one per prompt;
        prompt i gets params[i].n completions. Nothing runs until the Run is iterated."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ConfigError("give a non-empty list of prompts", field="prompts")
        if len(prompts) and isinstance(prompts[0], int):
            raise ConfigError("prompts is a list of token ids: wrap one prompt in a list", field="prompts")
        plist = _per_prompt(params if params is not None else SamplingParams(), len(prompts), "params")
        clist = _per_prompt(constraint, len(prompts), "constraint")
        rows, prompt_ids = [], []
        for i, (prompt, p, g) in enumerate(zip(prompts, plist, clist)):
            # a grammar decides where the text ends: min_tokens would ban the only tokens it allows at the end
            one = p.replace(n=1, **({"min_tokens": 0} if g is not None else {}))
            for c in range(p.n):
                req = _prepare(self.model, self.tokenizer, prompt, one, add_bos, choice=c)
                if c == 0:
                    prompt_ids.append(req.prompt_ids)
                fast = p.greedy and not (p.logit_bias or p.min_tokens or p.repetition_penalty != 1.0
                                         or p.presence_penalty or p.frequency_penalty
                                         or p.logprobs is not None) and g is None
                rows.append(_Row(i, c, req, set(req.eos) | set(p.stop_token_ids),
                                 one.make_generator(self.device, offset=c), Detokenizer(self.tokenizer, p.stop),
                                 g.matcher() if g is not None else None, fast=fast))
        return Run(self, rows, prompt_ids)

    def generate(self, prompts, params=None, *, constraint=None, add_bos=None) -> list[list[GenerationResult]]:
        """results[i][c]: completion c of prompt i."""
        return self.start(prompts, params, constraint=constraint, add_bos=add_bos).consume()

    # ---- the loop ----
    def _decode(self, rows: list[_Row], prompts: list[list[int]]) -> Iterator[tuple[int, int, Delta]]:
        model, dev = self.model, self.device
        lens = [len(p) for p in prompts]
        L = max(lens)
        padded = any(n != L for n in lens)
        # cache slots: prompt (padded to L) + every step but the last sampled token, which is never fed back
        steps = max(r.req.budget for r in rows)
        cache = model.new_kv_cache(len(prompts), max_len=L + steps - 1)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L + steps - 1, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = True
        ids, mask = ids.to(dev), mask.to(dev)
        mask[:, L:] = True     # generated tokens are always real

        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), _autocast(dev, self.precision):
                logits, _ = model(ids, kv_cache=cache, logits_to_keep=1,
                                  **({"attn_mask": mask[:, :L]} if padded else {}))
                # fan out: row r continues prompt rows[r].prompt's cache row
                src = torch.tensor([r.prompt for r in rows], device=dev)
                if len(rows) != len(prompts) or any(r.prompt != i for i, r in enumerate(rows)):
                    cache.select_rows(src)
                    mask = mask.index_select(0, src)
                last = logits[:, -1, :].index_select(0, src)
                live = list(rows)
                # built per run from the model's current weights (so training in between is picked up)
                # (CPU only: that is where it is measured and tested)
                fast = FastDecoder(model) if self.fast_path and dev.type == "cpu" and fastpath_usable(model) else None
                while True:
                    toks, events = self._step(last, live, fast)
                    for r, ev in zip(live, events):
                        yield r.prompt, r.choice, ev
                    keep = [j for j, ev in enumerate(events) if ev.finish_reason is None]
                    if not keep:
                        return
                    if len(keep) < len(live):
                        kt = torch.tensor(keep, device=dev)
                        cache.select_rows(kt)
                        mask, toks = mask.index_select(0, kt), toks.index_select(0, kt)
                        live = [live[j] for j in keep]
                        padded = padded and not bool(mask[:, :L].all())
                    S = cache.pos + 1
                    if fast is not None:
                        last = fast.step(toks.view(-1, 1), cache, mask[:, :S] if padded else None)
                    else:
                        logits, _ = model(toks.view(-1, 1), kv_cache=cache, logits_to_keep=1,
                                          **({"attn_mask": mask[:, :S]} if padded else {}))
                        last = logits[:, -1, :]
        finally:
            model.train(was_training)

    def _step(self, logits: torch.Tensor, live: list[_Row], fast: FastDecoder | None = None
              ) -> tuple[torch.Tensor, list[Delta]]:
        """Sample one token for every live row from its last logits [R, V]; return the tokens and a Delta each."""
        vocab = self.tokenizer.vocab_size
        if all(r.fast for r in live):
            toks = fast.argmax(logits, vocab) if fast is not None else logits[:, :vocab].argmax(dim=-1)
            lps = [None] * len(live)
        else:
            raw = logits.float()
            if vocab < raw.shape[-1]:
                raw = raw[:, :vocab]     # the model's padding ids are no tokens
            masked = raw
            if any(r.matcher is not None for r in live):
                masked = raw.clone()
                for j, r in enumerate(live):
                    if r.matcher is not None:
                        r.matcher.apply(masked[j])
            params = [r.req.params for r in live]
            processed = process_logits(masked, params, [r.req.prompt_ids for r in live], [r.out for r in live],
                                       eos_token_ids=self._eos)
            toks = sample(processed, [r.gen for r in live])
            lps = [None] * len(live)
            want = [j for j, r in enumerate(live) if r.req.params.logprobs is not None]
            if want:
                for mode, source in (("raw", raw), ("processed", processed)):
                    js = [j for j in want if live[j].req.params.logprobs_mode == mode]
                    if js:
                        t = torch.tensor(js, device=raw.device)
                        k = max(live[j].req.params.logprobs for j in js)
                        got = gather_logprobs(log_probs(source.index_select(0, t)), toks.index_select(0, t), k)
                        for j, g in zip(js, got):
                            g.top = g.top[:live[j].req.params.logprobs]
                            lps[j] = [g]
        events = []
        for r, tok, lp in zip(live, toks.tolist(), lps):
            events.append(self._advance(r, tok, lp))
        return toks, events

    @staticmethod
    def _advance(r: _Row, tok: int, lp) -> Delta:
        """Append `tok` to row r; decide whether the row ends here (same rules as generate())."""
        r.out.append(tok)
        if r.matcher is not None and tok not in r.ends:
            r.matcher.accept(tok)
        done = r.matcher is not None and r.matcher.is_done()
        finish, reason = stop_check(r.detok, tok, r.out, r.req, r.ends, grammar_done=done)
        if finish is None:
            return Delta(r.detok.ready(), [tok], lp)
        return Delta(r.detok.ready(final=True), [tok], lp, finish, reason)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"got {len(value)} {name} for {n} prompts (give one, or one per prompt)", field=name)
        return list(value)
    return [value] * n


__all__ = ["Engine", "Run", "LmforgeError"]
