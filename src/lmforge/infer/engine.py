"""The inference engine: a step function over requests that join and leave a running batch (continuous batching).

    engine = Engine(model, tok, max_batch=16)
    engine.add_request("a", "In the beginning", SamplingParams(max_tokens=40, seed=0))
    while engine.has_unfinished():
        for out in engine.step():                 # RequestOutput: request_id, index, token_ids, text, finished
            print(out.request_id, out.text, end="")
    engine.add_request("b", [1, 17, 42], params)  # any time, also between steps of a running batch
    engine.abort("b")                             # frees its rows at once

One `step()` (iteration-level scheduling, as in Orca and vLLM):
  1. decode    one forward for every live row, one token each;
  2. leave     a row that finishes (EOS, stop id, stop string, grammar complete, budget) leaves the cache at once
               and its slot is free;
  3. admit     waiting requests, first come first served, while the batch has fewer than `max_batch` rows and the
               KV-token budget `max_kv_tokens` allows (each completion reserves prompt + max_tokens tokens);
  4. prefill   the admitted prompts, left-padded to their longest, in ONE forward into a fresh cache; a prompt that
               asks for n completions is computed once and its cache row copied n times; each row samples its
               first token from the prefill logits and joins the running cache (`KVCache.append_rows`), to decode
               with the others from the next step on.
Rows of different ages decode together because the KV cache keeps a length per row: every row writes at the same
column, each row's tokens are right-aligned there, and a padding mask hides the columns before them (positions
count real tokens only). The cache is compacted and grown on admission, so it stays as short as its rows need.

Each row samples with its own SamplingParams and its own seeded generator (`seed + completion index`): a request
gives the same tokens alone, in any batch, and whenever it joins. `start()` / `generate()` (a list of prompts run
to completion) and `generate()` (one prompt, at the end of this module) are loops over `step()`.

A `constraint` (a `lmforge.infer.constrained.Grammar`) masks a row's logits to what its grammar allows; the row
stops when the grammar is complete. The raw logprobs stay the model's own (unconstrained) distribution.
When every live row is greedy with no penalty, bias, min_tokens, logprobs or grammar, sampling is argmax over the
last logits. Decode steps of Llama-style fp32 models on CPU run through `lmforge.infer.fastpath.FastDecoder`
(same logits; a C++ step built on first use when possible); prefill and every other model use the module forward.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.checkpoint import unwrap
from lmforge.errors import ConfigError
from lmforge.infer.detokenize import Detokenizer, stop_check
from lmforge.infer.fastpath import FastDecoder
from lmforge.infer.fastpath import usable as fastpath_usable
from lmforge.infer.outputs import Delta, GenerationResult, GenerationStream, RequestOutput
from lmforge.infer.prefix_cache import PrefixCache
from lmforge.infer.request import Request, end_token_ids, prepare
from lmforge.infer.sampling import SamplingParams, gather_logprobs, log_probs, process_logits, sample
from lmforge.runtime import autocast, resolve_precision


@dataclass
class _Row:
    """One completion being generated: a cache row while it is live."""
    request_id: object
    choice: int                          # which of the request's n completions
    req: Request
    ends: set[int]
    gen: torch.Generator | None
    detok: Detokenizer
    matcher: object | None = None        # a constrained.Matcher
    out: list[int] = dataclasses.field(default_factory=list)
    fast: bool = False                   # plain greedy: argmax is the whole sampling step
    slot: int = -1                       # the batch slot it holds while admitted
    kv_tokens: int = 0                   # KV tokens reserved for it (prompt + budget)
    done: bool = False


@dataclass
class _Waiting:
    request_id: object
    prompt_ids: list[int]
    rows: list[_Row]


class Engine:
    """Continuous-batching generation for one model + tokenizer.

    max_batch:     most rows (completions) decoding at once; a request with n > max_batch is refused.
    max_kv_tokens: KV-cache budget in tokens: admitted rows reserve prompt + max_tokens each; a request that can
                   never fit is refused at add_request (None: no budget beyond max_batch).
    precision:     'fp32' (default, exact), 'bf16', 'fp16', 'auto' (autocast).
    prefix_cache_mb: memory for the keys/values of prompt prefixes already computed, reused by later prompts that
                   start the same way (lmforge.infer.prefix_cache; least recently used out first); 0 turns it off.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 256, max_kv_tokens: int | None = None,
                 precision: str = "fp32", transposed_weights: bool | None = None, fast_path: bool = True,
                 prefix_cache_mb: float = 256):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"must be an integer >= 1, got {max_batch!r}", field="max_batch")
        if max_kv_tokens is not None and (isinstance(max_kv_tokens, bool) or not isinstance(max_kv_tokens, int)
                                          or max_kv_tokens < 1):
            raise ConfigError(f"must be an integer >= 1 or None, got {max_kv_tokens!r}", field="max_kv_tokens")
        self.model = unwrap(model)
        self.tokenizer = tokenizer
        self.precision = precision
        self.max_batch, self.max_kv_tokens = max_batch, max_kv_tokens
        self.device = next(self.model.parameters()).device
        self._precision = resolve_precision(precision, self.device)
        # CPU decoding reads (in, out) weight copies faster at batch 1 (Transformer.use_transposed_weights);
        # by default on CPU for models up to 2B parameters (the copy doubles their matmul weights in memory)
        if transposed_weights is None:
            transposed_weights = self.device.type == "cpu" and sum(p.numel() for p in self.model.parameters()) <= 2e9
        if transposed_weights and hasattr(self.model, "use_transposed_weights"):
            self.model.use_transposed_weights(True)
        self.fast_path = fast_path
        self._eos = end_token_ids(tokenizer)     # for min_tokens (rows with ignore_eos leave them alone)
        self._waiting: deque[_Waiting] = deque()
        self._requests: dict[object, list[_Row]] = {}   # request id -> its unfinished rows (waiting or live)
        self._live: list[_Row] = []                     # in cache row order
        self._next: torch.Tensor | None = None          # (len(live),) each row's last token, fed at the next decode
        self._cache = None
        self._free_slots = list(range(max_batch))       # a heap: the lowest free slot is reused first
        self._kv_reserved = 0
        self._aborted: list[RequestOutput] = []
        self._fast: FastDecoder | None = None
        self._run_ids = itertools.count()
        if not isinstance(prefix_cache_mb, (int, float)) or isinstance(prefix_cache_mb, bool) or prefix_cache_mb < 0:
            raise ConfigError(f"must be a number >= 0, got {prefix_cache_mb!r}", field="prefix_cache_mb")
        cfg = getattr(self.model, "config", None)
        self.prefix_cache: PrefixCache | None = None
        dims = [getattr(cfg, a, None) for a in ("n_layer", "n_kv_heads", "head_dim")]
        w = next(self.model.parameters(), None)
        if prefix_cache_mb > 0 and hasattr(self.model, "new_kv_cache") and w is not None \
                and all(isinstance(d, int) for d in dims):
            size = w.element_size()
            per_token = 2 * dims[0] * dims[1] * dims[2] * size
            self.prefix_cache = PrefixCache(per_token, int(prefix_cache_mb * 2 ** 20))
        self._weights_seen = None       # the weights' versions the prefix cache was filled with

    # ---- the step API ----
    def add_request(self, request_id, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    constraint=None, add_bos: bool | None = None) -> None:
        """Queue a request (prompt: text or token ids). Everything is checked here: a bad prompt or parameter, a
        duplicate id, or a request that could never fit the engine raises LmforgeError now."""
        if request_id in self._requests:
            raise ConfigError(f"request id {request_id!r} is already in use", field="request_id")
        self._enqueue(self._prepare(request_id, prompt, params, constraint, add_bos))

    def abort(self, request_id) -> bool:
        """Stop a request, waiting or running; its rows leave the batch now and the next `step()` reports each
        unfinished completion once with finish_reason 'abort'. False if the id is unknown (or already done)."""
        rows = self._requests.pop(request_id, None)
        if rows is None:
            return False
        self._waiting = deque(w for w in self._waiting if w.request_id != request_id)
        gone = {id(r) for r in rows}
        keep = [j for j, r in enumerate(self._live) if id(r) not in gone]
        if len(keep) < len(self._live):
            self._keep_rows(keep)
        for r in rows:
            self._release(r)
            self._aborted.append(RequestOutput(request_id, r.choice, [], r.detok.ready(final=True), True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._live or self._aborted)

    def num_live(self) -> int:
        """Rows decoding now (each holds one slot)."""
        return len(self._live)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def used_slots(self) -> int:
        return self.max_batch - len(self._free_slots)

    def reserved_kv_tokens(self) -> int:
        """KV tokens reserved by admitted rows (counted against max_kv_tokens)."""
        return self._kv_reserved

    def step(self) -> list[RequestOutput]:
        """Decode one token for every live row, then admit and prefill what fits (slots freed by rows that just
        ended are reused at once; each newcomer samples its first token from the prefill). Every row gets exactly
        one token per step. Returns one RequestOutput per completion that produced something in this step."""
        outs: list[RequestOutput] = []
        aborted, self._aborted = self._aborted, []
        model = self.model
        was_training = model.training
        if was_training:          # (a module-tree walk: only when needed, not on every step)
            model.eval()
        try:
            with torch.inference_mode(), autocast(self.device, self._precision):
                if self._live:
                    self._decode(outs)
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted, outs)
        finally:
            if was_training:
                model.train()
        return aborted + outs

    # ---- batches run to completion (loops over step) ----
    def start(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None
              = None, *, constraint=None, add_bos: bool | None = None) -> "Run":
        """Validate and queue a batch: `params` (and `constraint`) one for all prompts or one per prompt; prompt i
        gets params[i].n completions. Iterate the Run for (prompt index, completion index, Delta)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ConfigError("give a non-empty list of prompts", field="prompts")
        if len(prompts) and isinstance(prompts[0], int):
            raise ConfigError("prompts is a list of token ids: wrap one prompt in a list", field="prompts")
        if self.has_unfinished():
            raise ConfigError("the engine is running other requests: use add_request/step, or another Engine")
        plist = _per_prompt(params if params is not None else SamplingParams(), len(prompts), "params")
        clist = _per_prompt(constraint, len(prompts), "constraint")
        run = next(self._run_ids)
        # every prompt is checked before any is queued, so a bad one leaves the engine as it was
        waiting = [self._prepare((run, i), prompt, p, g, add_bos)
                   for i, (prompt, p, g) in enumerate(zip(prompts, plist, clist))]
        for w in waiting:
            self._enqueue(w)
        return Run(self, [w.prompt_ids for w in waiting], [len(w.rows) for w in waiting],
                   [p.logprobs is not None for p in plist])

    def generate(self, prompts, params=None, *, constraint=None, add_bos=None) -> list[list[GenerationResult]]:
        """results[i][c]: completion c of prompt i."""
        return self.start(prompts, params, constraint=constraint, add_bos=add_bos).consume()

    # ---- admission ----
    def _prepare(self, request_id, prompt, params, constraint, add_bos) -> _Waiting:
        p = params if params is not None else SamplingParams()
        g = constraint
        # a grammar decides where the text ends: min_tokens would ban the only tokens it allows at the end
        one = p.replace(n=1, **({"min_tokens": 0} if g is not None else {}))
        req = prepare(self.model, self.tokenizer, prompt, one, add_bos)
        kv = len(req.prompt_ids) + req.budget
        if p.n > self.max_batch:
            raise ConfigError(f"asks for {p.n} completions but the engine decodes at most {self.max_batch} rows "
                              f"(max_batch)", field="n")
        if self.max_kv_tokens is not None and p.n * kv > self.max_kv_tokens:
            raise ConfigError(f"needs {p.n} x ({len(req.prompt_ids)} prompt + {req.budget} new) = {p.n * kv} KV "
                              f"tokens, more than the engine's max_kv_tokens={self.max_kv_tokens}: lower max_tokens "
                              f"or n", field="max_tokens")
        fast = p.argmax_only and p.logprobs is None and g is None
        rows = [_Row(request_id, c, dataclasses.replace(req, choice=c), set(req.eos) | set(p.stop_token_ids),
                     one.make_generator(self.device, offset=c), Detokenizer(self.tokenizer, p.stop),
                     g.matcher() if g is not None else None, fast=fast, kv_tokens=kv) for c in range(p.n)]
        return _Waiting(request_id, req.prompt_ids, rows)

    def _enqueue(self, w: _Waiting) -> None:
        self._waiting.append(w)
        self._requests[w.request_id] = list(w.rows)

    def _admit(self) -> list[_Waiting]:
        """Take waiting requests in arrival order while their rows fit the batch and the KV budget."""
        admitted, rows = [], len(self._live)
        while self._waiting:
            w = self._waiting[0]
            kv = sum(r.kv_tokens for r in w.rows)
            if rows + len(w.rows) > self.max_batch:
                break
            if self.max_kv_tokens is not None and self._kv_reserved + kv > self.max_kv_tokens:
                break
            self._waiting.popleft()
            self._kv_reserved += kv
            for r in w.rows:
                r.slot = heapq.heappop(self._free_slots)
            rows += len(w.rows)
            admitted.append(w)
        return admitted

    def _prefill(self, admitted: list[_Waiting], outs: list) -> None:
        model, dev = self.model, self.device
        if not self._live:
            # the batch starts afresh: build the decode step from the model's current weights (training between
            # two runs is picked up); CPU only, where it is measured and tested
            self._fast = FastDecoder(model) if self.fast_path and dev.type == "cpu" and fastpath_usable(model) \
                else None
            self._check_weights()
        # an idle engine's cache becomes the running one: size it for the longest budget at once (no regrowth)
        room = 0 if self._live else max(r.req.budget for w in admitted for r in w.rows) - 1
        # prompts whose start is cached are prefilled together from there; the others together
        fresh, cached = [], []
        for w in admitted:
            hit = self.prefix_cache.lookup(w.prompt_ids) if self.prefix_cache is not None else (0, None, None)
            (cached.append((w, hit)) if hit[0] else fresh.append(w))
        if fresh:
            self._join(fresh, *self._forward_prompts(fresh, room), outs)
        if cached:
            self._join([w for w, _ in cached], *self._forward_cached(cached, room), outs)

    def _forward_prompts(self, admitted: list[_Waiting], room: int):
        """One forward over the prompts, left-padded to the longest, into a fresh cache: (cache, last logits)."""
        model, dev = self.model, self.device
        prompts = [w.prompt_ids for w in admitted]
        lens = [len(p) for p in prompts]
        L = max(lens)
        padded = any(n != L for n in lens)
        cache = model.new_kv_cache(len(prompts), max_len=L + room)
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = True
        ids, mask = ids.to(dev), mask.to(dev)
        logits, _ = model(ids, kv_cache=cache, logits_to_keep=1, **({"attn_mask": mask} if padded else {}))
        if padded:
            cache.lengths = torch.tensor(lens, device=dev)
        self._remember(prompts, cache)
        return cache, logits

    def _forward_cached(self, hits: list[tuple[_Waiting, tuple]], room: int):
        """One forward over prompts whose first tokens' keys/values are in the prefix cache: (cache, last logits).

        Rows stay right-aligned (what the running cache expects): every row runs the same T = the longest uncached
        tail, so a row with a shorter tail also recomputes the last cached tokens before it (c = L - T of its L
        tokens come from the prefix cache); rows shorter than T run whole, left-padded."""
        model, dev = self.model, self.device
        prompts = [w.prompt_ids for w, _ in hits]
        lens = [len(p) for p in prompts]
        T = max(n - hit[0] for n, (_, hit) in zip(lens, hits))
        used = [max(0, n - T) for n in lens]
        C = max(used)
        cache = model.new_kv_cache(len(prompts), max_len=C + T + room)
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        mask = torch.zeros(len(prompts), C + T, dtype=torch.bool)
        for i, (p, c, (_, (_, k, v))) in enumerate(zip(prompts, used, hits)):
            if c:
                cache.k[:, i, :, C - c:C], cache.v[:, i, :, C - c:C] = k[:, :, :c], v[:, :, :c]
                mask[i, C - c:C] = True
            tail = p[c:]
            ids[i, T - len(tail):] = torch.tensor(tail)
            mask[i, C + T - len(tail):] = True
        cache.pos = C
        logits, _ = model(ids.to(dev), kv_cache=cache, logits_to_keep=1, attn_mask=mask.to(dev))
        cache.lengths = torch.tensor(lens, device=dev)
        self._remember(prompts, cache)
        return cache, logits

    def _remember(self, prompts: list[list[int]], cache) -> None:
        """Keep the prompts' full blocks in the prefix cache (row i of `cache` holds prompt i, right-aligned)."""
        if self.prefix_cache is None:
            return
        for i, p in enumerate(prompts):
            cols = slice(cache.pos - len(p), cache.pos)
            self.prefix_cache.store(p, cache.k[:, i, :, cols], cache.v[:, i, :, cols])

    def _check_weights(self) -> None:
        """Empty the prefix cache when the weights changed since it was filled (training between two runs)."""
        if self.prefix_cache is None:
            return
        seen = tuple((id(p), p._version) for p in self.model.parameters())
        if seen != self._weights_seen:
            self.prefix_cache.clear()
            self._weights_seen = seen

    def _join(self, admitted: list[_Waiting], cache, logits, outs: list) -> None:
        """The prefilled prompts' rows sample their first token and join the running batch (fanned out to n)."""
        dev = self.device
        rows = [r for w in admitted for r in w.rows]
        src = torch.tensor([i for i, w in enumerate(admitted) for _ in w.rows], device=dev)
        toks = self._sample(logits[:, -1, :].index_select(0, src), rows, outs)
        keep = [j for j, r in enumerate(rows) if not r.done]
        if not keep:
            return
        if len(keep) != len(admitted) or len(rows) != len(admitted):
            kt = torch.tensor(keep, device=dev)
            cache.select_rows(src.index_select(0, kt))  # fan out, and drop rows that ended on their first token
            toks = toks.index_select(0, kt)
            rows = [rows[j] for j in keep]
        if self._live:
            self._cache.append_rows(cache)
            self._next = torch.cat([self._next, toks])
        else:
            self._cache, self._next = cache, toks
        self._live += rows
        # room for the longest remaining budget: the last sampled token of a row is never fed back
        self._cache.reserve(max(r.req.budget - len(r.out) for r in self._live))

    # ---- decoding ----
    def _decode(self, outs: list) -> None:
        cache, live = self._cache, self._live
        mask = cache.padding_mask(1) if cache.padded() else None
        toks = self._next.view(-1, 1)
        if self._fast is not None:
            last = self._fast.step(toks, cache, mask)
        else:
            logits, _ = self.model(toks, kv_cache=cache, logits_to_keep=1,
                                   **({"attn_mask": mask} if mask is not None else {}))
            last = logits[:, -1, :]
        cache.grow(1)
        self._next = self._sample(last, live, outs)
        keep = [j for j, r in enumerate(live) if not r.done]
        if len(keep) < len(live):
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep live rows `keep` (indices into the live list, in order) in the cache and the batch."""
        if not keep:
            self._live, self._cache, self._next = [], None, None
            return
        kt = torch.tensor(keep, device=self.device)
        self._cache.select_rows(kt)
        self._next = self._next.index_select(0, kt)
        self._live = [self._live[j] for j in keep]

    def _sample(self, logits: torch.Tensor, rows: list[_Row], outs: list) -> torch.Tensor:
        """Sample one token for every row from its last logits [R, V]; record each row's output; return the
        tokens. Rows that end here are marked done and their slots freed (the caller drops them from the cache)."""
        vocab = self.tokenizer.vocab_size
        if all(r.fast for r in rows):
            toks = self._fast.argmax(logits, vocab) if self._fast is not None else logits[:, :vocab].argmax(dim=-1)
            lps = [None] * len(rows)
        else:
            toks, lps = self._sample_processed(logits, rows, vocab)
        for r, tok, lp in zip(rows, toks.tolist(), lps):
            d = self._advance(r, tok, lp)
            outs.append(RequestOutput(r.request_id, r.choice, d.token_ids, d.text, d.finish_reason is not None,
                                      d.finish_reason, d.stop_reason, lp))
            if d.finish_reason is not None:
                r.done = True
                self._release(r)
                rest = [x for x in self._requests.get(r.request_id, []) if x is not r]
                if rest:
                    self._requests[r.request_id] = rest
                else:
                    self._requests.pop(r.request_id, None)
        return toks

    def _sample_processed(self, logits: torch.Tensor, rows: list[_Row], vocab: int):
        raw = logits.float()
        if vocab < raw.shape[-1]:
            raw = raw[:, :vocab]     # the model's padding ids are no tokens
        masked = raw
        if any(r.matcher is not None for r in rows):
            masked = raw.clone()
            for j, r in enumerate(rows):
                if r.matcher is not None:
                    r.matcher.apply(masked[j])
        params = [r.req.params for r in rows]
        processed = process_logits(masked, params, [r.req.prompt_ids for r in rows], [r.out for r in rows],
                                   eos_token_ids=self._eos)
        toks = sample(processed, [r.gen for r in rows])
        lps = [None] * len(rows)
        want = [j for j, r in enumerate(rows) if r.req.params.logprobs is not None]
        if want:
            for mode, source in (("raw", raw), ("processed", processed)):
                js = [j for j in want if rows[j].req.params.logprobs_mode == mode]
                if js:
                    t = torch.tensor(js, device=raw.device)
                    k = max(rows[j].req.params.logprobs for j in js)
                    got = gather_logprobs(log_probs(source.index_select(0, t)), toks.index_select(0, t), k)
                    for j, g in zip(js, got):
                        g.top = g.top[:rows[j].req.params.logprobs]
                        lps[j] = [g]
        return toks, lps

    @staticmethod
    def _advance(r: _Row, tok: int, lp) -> Delta:
        """Append `tok` to row r; decide whether the row ends here (the one stopping rule, detokenize.stop_check)."""
        r.out.append(tok)
        if r.matcher is not None and tok not in r.ends:
            r.matcher.accept(tok)
        done = r.matcher is not None and r.matcher.is_done()
        finish, reason = stop_check(r.detok, tok, r.out, r.req, r.ends, grammar_done=done)
        if finish is None:
            return Delta(r.detok.ready(), [tok], lp)
        return Delta(r.detok.ready(final=True), [tok], lp, finish, reason)

    def _release(self, r: _Row) -> None:
        """Give back a row's slot and KV reservation (once)."""
        if r.slot >= 0:
            heapq.heappush(self._free_slots, r.slot)
            self._kv_reserved -= r.kv_tokens
            r.slot = -1


class Run:
    """A batch queued by `Engine.start`. Iterate for (prompt, choice, Delta); each (prompt, choice) stream ends
    with a Delta whose finish_reason is set. After iterating, `results[p][c]` holds each GenerationResult."""

    def __init__(self, engine: Engine, prompt_ids: list[list[int]], n: list[int], logprobs: list[bool]):
        self.engine, self.prompt_ids, self._logprobs = engine, prompt_ids, logprobs
        self.results: list[list[GenerationResult | None]] = [[None] * k for k in n]
        self._started = False

    def __iter__(self) -> Iterator[tuple[int, int, Delta]]:
        if self._started:
            raise RuntimeError("a Run can be iterated once")
        self._started = True
        acc: dict[tuple[int, int], tuple[list[str], list[int], list]] = {}
        while self.engine.has_unfinished():
            for o in self.engine.step():
                p, c = o.request_id[1], o.index
                text, ids, lps = acc.setdefault((p, c), ([], [], []))
                text.append(o.text)
                ids += o.token_ids
                lps += o.logprobs or []
                d = o.delta()
                if o.finished:
                    self.results[p][c] = GenerationResult("".join(text), list(ids), o.finish_reason, o.stop_reason,
                                                          lps if self._logprobs[p] else None, self.prompt_ids[p])
                yield p, c, d

    def consume(self) -> list[list[GenerationResult]]:
        for _ in self:
            pass
        return self.results


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"got {len(value)} {name} for {n} prompts (give one, or one per prompt)", field=name)
        return list(value)
    return [value] * n



# ---------------------------------------------------------------------------------------------------------------
# one prompt: a batch of one

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


__all__ = ["Engine", "Run", "RequestOutput", "generate", "generate_n"]
