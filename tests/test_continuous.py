"""Continuous batching: requests join a running batch between steps and leave it as they end.

A request gives exactly the tokens it gives alone (greedy, and seeded sampling), whenever it joins and whoever
it decodes with; abort frees its slot for the next request; the KV-token budget bounds admission; a long random
soak of arrivals and aborts ends with nothing live and nothing held."""
from __future__ import annotations

import random

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer import Engine, SamplingParams, generate, generate_n
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

TEXT = "In the beginning God created the heaven and the earth. Héllo wörld, 你好. def f(x): return x\n"
PROMPTS = ["In the", "And the earth was without form, and void; and darkness was upon the face of the deep",
           "d", "你好 wörld", "God created", "def f(x): return x + 1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 30], vocab_size=272 + 60, progress=False)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=96,
                      init_std=0.3)
    return Transformer(cfg).eval()


def drive(engine, arrivals, aborts=None, max_steps=10_000):
    """Run the engine; arrivals: {step: [(id, prompt, params)]} added before that step; aborts: {step: [id]}.
    Returns {(id, index): (token_ids, text, finish_reason)} and the steps each request was seen in."""
    got, text, ends, seen = {}, {}, {}, {}
    aborts = aborts or {}
    step = 0
    while step <= max(arrivals, default=0) or engine.has_unfinished():
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
        for rid in aborts.get(step, []):
            engine.abort(rid)
        for o in engine.step():
            key = (o.request_id, o.index)
            got.setdefault(key, []).extend(o.token_ids)
            text[key] = text.get(key, "") + o.text
            seen.setdefault(o.request_id, []).append(step)
            assert len(o.token_ids) <= 1                     # one token per row per step
            if o.finished:
                assert key not in ends, "a completion finished twice"
                ends[key] = o.finish_reason
        step += 1
        assert step < max_steps
    return {k: (got[k], text[k], ends.get(k)) for k in got}, seen


@pytest.mark.parametrize("fast_path", [True, False])
def test_staggered_arrivals_give_the_batch_of_one_tokens(tok, model, fast_path):
    # short and long prompts joining at different steps: left padding in the shared cache grows on both sides
    # (a long prompt arriving after short rows moved the write column) and is compacted as rows leave
    greedy = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (14, 6, 20, 9, 3, 11)]
    arrivals = {0: [("a", PROMPTS[0], greedy[0])], 2: [("b", PROMPTS[1], greedy[1]), ("c", PROMPTS[2], greedy[2])],
                5: [("d", PROMPTS[3], greedy[3])], 7: [("e", PROMPTS[4], greedy[4])],
                16: [("f", PROMPTS[5], greedy[5])]}
    out, seen = drive(Engine(model, tok, fast_path=fast_path), arrivals)
    for rid, prompt, p in (x for xs in arrivals.values() for x in xs):
        solo = generate(model, tok, prompt, p)
        ids, text, reason = out[(rid, 0)]
        assert ids == solo.token_ids and text == solo.text and reason == "length"
    assert seen["a"][0] == 0 and seen["d"][0] == 5 and seen["f"][0] == 16     # joined when they arrived
    assert len(set(seen["b"]) & set(seen["a"])) > 0                          # ... and decoded together


def test_staggered_seeded_sampling_and_fan_out_equal_their_solo_runs(tok, model):
    sampled = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_tokens=12, seed=7, ignore_eos=True)
    fanned = SamplingParams(temperature=1.2, min_p=0.05, max_tokens=8, seed=3, n=3, ignore_eos=True,
                            repetition_penalty=1.3)
    arrivals = {0: [("s", PROMPTS[1], sampled)], 3: [("n", PROMPTS[3], fanned)],
                4: [("g", PROMPTS[0], SamplingParams(temperature=0, max_tokens=10))]}
    out, _ = drive(Engine(model, tok), arrivals)
    assert out[("s", 0)][0] == generate(model, tok, PROMPTS[1], sampled).token_ids
    for i, res in enumerate(generate_n(model, tok, PROMPTS[3], fanned)):
        assert out[("n", i)][0] == res.token_ids
    assert out[("g", 0)][0] == generate(model, tok, PROMPTS[0], SamplingParams(temperature=0, max_tokens=10)).token_ids


def test_abort_frees_the_slot_and_the_next_request_reuses_it(tok, model):
    engine = Engine(model, tok, max_batch=2)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], long)
    engine.add_request("b", PROMPTS[2], long)
    engine.add_request("c", PROMPTS[4], long)          # waits: the batch is full
    engine.step()
    engine.step()
    assert engine.num_live() == 2 and engine.num_waiting() == 1 and engine.used_slots() == 2
    assert engine.abort("a") is True and engine.abort("a") is False
    assert engine.num_live() == 1 and engine.used_slots() == 1            # freed at once, not at the next step
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [("a", "abort")]
    assert engine.num_live() == 2 and engine.num_waiting() == 0            # "c" took the freed slot
    res = {}
    for o in outs:
        res.setdefault(o.request_id, []).extend(o.token_ids)
    assert len(res["c"]) == 1                                              # its prefill token, in the same step
    while engine.has_unfinished():
        for o in engine.step():
            res.setdefault(o.request_id, []).extend(o.token_ids)
    assert res["c"] == generate(model, tok, PROMPTS[4], long).token_ids
    assert engine.used_slots() == 0 and engine.num_live() == 0


def test_abort_of_a_waiting_request_and_unknown_ids(tok, model):
    engine = Engine(model, tok, max_batch=1)
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request(1, PROMPTS[0], p)
    engine.add_request(2, PROMPTS[1], p)
    engine.step()
    assert engine.abort(2) and not engine.abort(99)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [(2, "abort"), (1, "length")]
    with pytest.raises(ConfigError, match="already in use"):
        engine.add_request(3, PROMPTS[0], p)
        engine.add_request(3, PROMPTS[0], p)


def test_kv_budget_bounds_admission_and_refuses_what_can_never_fit(tok, model):
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    n_prompt = len(tok.encode(PROMPTS[1])) + 1                     # + BOS
    need = n_prompt + 20
    engine = Engine(model, tok, max_kv_tokens=need + need // 2)    # room for one such request, not two
    engine.add_request("x", PROMPTS[1], p)
    engine.add_request("y", PROMPTS[1], p)
    engine.step()
    assert engine.num_live() == 1 and engine.num_waiting() == 1
    done = []
    while engine.has_unfinished():
        done += [o.request_id for o in engine.step() if o.finished]
    assert done == ["x", "y"]
    with pytest.raises(ConfigError, match="max_kv_tokens"):
        Engine(model, tok, max_kv_tokens=need - 1).add_request("z", PROMPTS[1], p)
    with pytest.raises(ConfigError, match="max_batch"):
        Engine(model, tok, max_batch=2).add_request("z", PROMPTS[1], p.replace(n=3))
    with pytest.raises(ConfigError, match="max_batch"):
        Engine(model, tok, max_batch=0)


def test_random_arrival_and_abort_soak_leaves_nothing_behind(tok, model):
    rng = random.Random(0)
    engine = Engine(model, tok, max_batch=6, max_kv_tokens=400)
    solo_cache = {}
    arrivals, aborts = {}, {}
    for i in range(200):
        step = rng.randrange(0, 150)
        prompt = rng.choice(PROMPTS)
        if rng.random() < 0.5:
            p = SamplingParams(temperature=0, max_tokens=rng.randint(1, 8), ignore_eos=rng.random() < 0.5)
        else:
            p = SamplingParams(temperature=1.0, top_k=20, max_tokens=rng.randint(1, 8), seed=i,
                               n=rng.choice([1, 1, 2]), stop=["e"] if rng.random() < 0.3 else [])
        arrivals.setdefault(step, []).append((i, prompt, p))
        if rng.random() < 0.2:
            aborts.setdefault(step + rng.randrange(0, 6), []).append(i)
    out, _ = drive(engine, arrivals, aborts)
    assert not engine.has_unfinished() and engine.num_live() == 0 and engine.num_waiting() == 0
    assert engine.used_slots() == 0 and engine.reserved_kv_tokens() == 0
    specs = {rid: (prompt, p) for xs in arrivals.values() for rid, prompt, p in xs}
    finished = 0
    for (rid, idx), (ids, text, reason) in out.items():
        assert reason in ("stop", "length", "abort")
        if reason == "abort":
            continue
        finished += 1
        prompt, p = specs[rid]
        if rid not in solo_cache:
            solo_cache[rid] = generate_n(model, tok, prompt, p)
        solo = solo_cache[rid][idx]
        assert (ids, text, reason) == (solo.token_ids, solo.text, solo.finish_reason)
    assert finished > 150


def test_kv_cache_rows_of_different_lengths_match_recomputation(tok, model):
    """KVCache.append_rows / compact / select_rows: the logits of the next token stay those of a full forward."""
    a = torch.tensor([tok.encode(PROMPTS[1])])
    b = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        ca = model.new_kv_cache(1, max_len=a.size(1))
        model(a, kv_cache=ca)
        cb = model.new_kv_cache(1, max_len=b.size(1))
        model(b, kv_cache=cb)
        cb.append_rows(ca)                      # longer rows join: b's row gets left padding
        assert cb.padded() and cb.lengths.tolist() == [b.size(1), a.size(1)]
        cb.reserve(4)
        nxt = torch.tensor([[5], [9]])
        logits, _ = model(nxt, kv_cache=cb, attn_mask=cb.padding_mask(1), logits_to_keep=1)
        cb.grow(1)
        ref_a, _ = model(torch.cat([a, nxt[1:]], 1))
        ref_b, _ = model(torch.cat([b, nxt[:1]], 1))
        torch.testing.assert_close(logits[0, -1], ref_b[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1, -1], ref_a[0, -1], atol=1e-5, rtol=1e-5)
        cb.select_rows(torch.tensor([0]))       # the long row leaves: b's leading padding is compacted away
        cb.compact()
        assert cb.pos == b.size(1) + 1 and not cb.padded()
        logits, _ = model(torch.tensor([[7]]), kv_cache=cb, logits_to_keep=1)
        ref, _ = model(torch.cat([b, nxt[:1], torch.tensor([[7]])], 1))
        torch.testing.assert_close(logits[0, -1], ref[0, -1], atol=1e-5, rtol=1e-5)
