"""Prefix caching: a prompt that starts like one computed before reuses its keys/values and gives the same tokens
(greedy and seeded sampling) as without the cache; LRU eviction under the budget; a hash collision cannot give wrong
keys; weights that change empty the cache."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.prefix_cache import BLOCK, PrefixCache
from lmforge.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=256, init_std=0.3)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    from lmforge.tokenizer.tokenizer import Tokenizer
    return Tokenizer.train(["In the beginning God created the heaven and the earth. " * 40], vocab_size=300,
                           progress=False)


def run(engine, prompts, params):
    return [r[0].token_ids for r in engine.generate(prompts, params, add_bos=False)]


def conversation(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 250, (n,), generator=g).tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=7, ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_the_second_turn_reuses_the_first_and_gives_the_same_tokens(model, tok, params):
    first = conversation(70, 0)
    second = first + conversation(30, 1)          # the next turn: the whole first one, then more
    plain = Engine(model, tok, prefix_cache_mb=0)
    cached = Engine(model, tok)
    assert run(cached, [first], params) == run(plain, [first], params)
    assert cached.prefix_cache.stats()["hit_tokens"] == 0
    assert len(cached.prefix_cache) == 70 // BLOCK
    assert run(cached, [second], params) == run(plain, [second], params)
    # the first turn's 4 full blocks came from the cache; the new turn computed only the rest
    assert cached.prefix_cache.stats()["hit_tokens"] == 4 * BLOCK


def test_cached_logprobs_match_a_full_prefill(model, tok):
    first = conversation(64, 2)
    second = first + conversation(20, 3)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    plain = Engine(model, tok, prefix_cache_mb=0).generate([second], params, add_bos=False)[0][0]
    cached = Engine(model, tok)
    cached.generate([first], params, add_bos=False)
    got = cached.generate([second], params, add_bos=False)[0][0]
    assert cached.prefix_cache.hit_tokens > 0
    assert got.token_ids == plain.token_ids
    for a, b in zip(got.logprobs, plain.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_a_batch_mixes_cached_and_fresh_prompts(model, tok):
    base = conversation(40, 4)
    prompts = [base + conversation(9, 5), conversation(23, 6), base + conversation(3, 7), conversation(50, 8)]
    plain = Engine(model, tok, prefix_cache_mb=0)
    cached = Engine(model, tok, max_batch=8)
    run(cached, [base], GREEDY)
    params = SamplingParams(temperature=0.8, max_tokens=10, seed=3, n=2, ignore_eos=True)
    want = [[c.token_ids for c in r] for r in plain.generate(prompts, params, add_bos=False)]
    got = [[c.token_ids for c in r] for r in cached.generate(prompts, params, add_bos=False)]
    assert got == want
    assert cached.prefix_cache.hit_tokens == 2 * 2 * BLOCK       # two prompts start with base's 2 full blocks


def test_cached_prompts_are_prefilled_together(model, tok, monkeypatch):
    """Prompts with cached starts and tails of different lengths (one tail longer than a whole other prompt) run in
    ONE forward, right-aligned, and give what a full prefill gives: tokens, and log-probs within 1e-4."""
    base = conversation(48, 9)
    other = conversation(33, 10)
    prompts = [base + conversation(5, 11), base + conversation(29, 12), other + conversation(2, 13),
               base[:20] + conversation(40, 14), base + conversation(1, 15)]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)
    plain = Engine(model, tok, prefix_cache_mb=0).generate(prompts, params, add_bos=False)
    cached = Engine(model, tok, max_batch=8)
    run(cached, [base, other], GREEDY)
    calls = []
    forward = cached._forward_cached
    monkeypatch.setattr(cached, "_forward_cached", lambda hits, room: calls.append(len(hits)) or forward(hits, room))
    got = cached.generate(prompts, params, add_bos=False)
    assert calls == [5]                                          # every prompt had a cached start: one forward
    assert cached.prefix_cache.hit_tokens == 3 * 3 * BLOCK + 2 * BLOCK + 1 * BLOCK
    for g, w in zip(got, plain):
        assert g[0].token_ids == w[0].token_ids
        for a, b in zip(g[0].logprobs, w[0].logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_least_recently_used_blocks_leave_first():
    c = PrefixCache(bytes_per_token=1, budget_bytes=4 * BLOCK)   # room for 4 blocks
    kv = lambda n: torch.arange(n, dtype=torch.float32).view(1, 1, n, 1)  # noqa: E731
    a, b = list(range(2 * BLOCK)), list(range(1000, 1000 + 2 * BLOCK))
    c.store(a, kv(len(a)), kv(len(a)))
    c.store(b, kv(len(b)), kv(len(b)))
    assert len(c) == 4
    assert c.lookup(a + [1])[0] == 2 * BLOCK                      # a is used again: b is now the oldest
    c.store(list(range(2000, 2000 + BLOCK)), kv(BLOCK), kv(BLOCK))
    assert len(c) == 4
    assert c.lookup(a + [1])[0] == 2 * BLOCK
    assert c.lookup(b + [1])[0] == 0                              # b's first block was evicted
    n, k, v = c.lookup(a + [1])
    assert torch.equal(k, kv(2 * BLOCK)) and torch.equal(v, kv(2 * BLOCK))


def test_the_last_prompt_token_is_always_computed():
    c = PrefixCache(bytes_per_token=1, budget_bytes=10 ** 6)
    ids = list(range(2 * BLOCK))
    t = torch.zeros(1, 1, len(ids), 1)
    c.store(ids, t, t)
    assert c.lookup(ids)[0] == BLOCK                   # not 2 blocks: the logits of the last token are needed
    assert c.lookup(ids + [5])[0] == 2 * BLOCK


def test_a_name_collision_is_not_a_hit(monkeypatch):
    import lmforge.infer.prefix_cache as pc
    monkeypatch.setattr(pc, "hash", lambda x: 42, raising=False)   # every block gets the same name
    c = PrefixCache(bytes_per_token=1, budget_bytes=10 ** 6)
    t = torch.ones(1, 1, BLOCK, 1)
    c.store(list(range(BLOCK)), t, t)
    assert c.lookup(list(range(BLOCK)) + [0])[0] == BLOCK
    assert c.lookup(list(range(1, BLOCK + 1)) + [0])[0] == 0      # same name, other tokens: a miss


def test_changed_weights_empty_the_cache(tok):
    torch.manual_seed(1)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=128, init_std=0.3)).eval()
    p = conversation(48, 9)
    engine = Engine(m, tok)
    run(engine, [p], GREEDY)
    with torch.no_grad():                               # what an optimizer step does between two runs
        for w in m.parameters():
            w.add_(torch.randn_like(w) * 0.2)
    got = run(engine, [p + [7, 8]], GREEDY)
    assert engine.prefix_cache.hit_tokens == 0          # nothing stale was reused
    assert got == run(Engine(m, tok, prefix_cache_mb=0), [p + [7, 8]], GREEDY)


def test_bad_budget_is_refused(model, tok):
    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        Engine(model, tok, prefix_cache_mb=-1)
