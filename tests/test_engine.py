"""The batched engine: prompts of different lengths in one batch give what batch-1 runs give (greedy and seeded
sampling), n completions share one prefill, finished rows leave the batch, logprobs and grammars per row."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.engine import generate, generate_n
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

TEXT = "In the beginning God created the heaven and the earth. Héllo wörld, 你好. def f(x): return x\n"
PROMPTS = ["In the", "And the earth was without form, and void; and darkness", "d", "你好 wörld"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 30], vocab_size=272 + 60, progress=False)


def model_for(tok, pos="rope", seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size + 5, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=64,
               init_std=0.3, pos=pos)   # vocab padded past the tokenizer: padding ids must never come out
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


class Recorder:
    """Wraps a model and records (batch, new tokens) of every forward call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, idx, **kw):
        self.calls.append(tuple(idx.shape))
        return self.model(idx, **kw)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_batched_greedy_equals_batch_of_one(tok, pos):
    model = model_for(tok, pos)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 5, 20, 9)]
    batched = Engine(model, tok).generate(PROMPTS, params)
    for prompt, p, (res,) in zip(PROMPTS, params, batched):
        solo = generate(model, tok, prompt, p)
        assert res.token_ids == solo.token_ids and res.text == solo.text
        assert res.finish_reason == solo.finish_reason == "length" and len(res.token_ids) == p.max_tokens
        assert res.prompt_token_ids == solo.prompt_token_ids


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(tok):
    model = model_for(tok)
    params = [SamplingParams(temperature=1.0, top_k=20, max_tokens=15, seed=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6),
              SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.5,
                             max_tokens=15, seed=3, stop=["e "]),
              SamplingParams(temperature=1.2, max_tokens=10, seed=11, logprobs=3)]
    batched = Engine(model, tok).generate(PROMPTS, params)
    for prompt, p, (res,) in zip(PROMPTS, params, batched):
        solo = generate(model, tok, prompt, p)
        assert (res.token_ids, res.text, res.finish_reason, res.stop_reason) == \
            (solo.token_ids, solo.text, solo.finish_reason, solo.stop_reason)
        if p.logprobs is not None:
            assert [lp.token_id for lp in res.logprobs] == res.token_ids
            for a, b in zip(res.logprobs, solo.logprobs):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
                assert [i for i, _ in a.top] == [i for i, _ in b.top] and len(a.top) == 3


def test_n_completions_share_one_prefill(tok):
    model = model_for(tok)
    rec = Recorder(model)
    p = SamplingParams(temperature=1.0, max_tokens=8, n=4, seed=5, ignore_eos=True)
    results = generate_n(rec, tok, PROMPTS[1], p)
    prefills = [c for c in rec.calls if c[1] > 1]
    assert prefills == [(1, len(results[0].prompt_token_ids))]           # the prompt was computed once
    assert all(c == (4, 1) for c in rec.calls[1:])                      # then 4 rows per decode step
    for i, res in enumerate(results):                                    # completion i = seed + i, alone
        assert res.token_ids == generate(model, tok, PROMPTS[1], p.replace(n=1, seed=5 + i)).token_ids
    assert len({tuple(r.token_ids) for r in results}) > 1


def test_finished_rows_leave_the_batch(tok):
    model = model_for(tok)
    rec = Recorder(model)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 6, 6, 10)]
    Engine(rec, tok).generate(PROMPTS, params)
    batches = [b for b, t in rec.calls[1:]]
    # prefill yields token 1; decode steps 2..10: 4 rows until 3 tokens, 3 until 6, then 1
    assert rec.calls[0][0] == 4 and batches == [4, 4, 3, 3, 3, 1, 1, 1, 1]


def test_mixed_prompts_and_n_stream(tok):
    model = model_for(tok)
    params = [SamplingParams(temperature=0.9, max_tokens=7, n=2, seed=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, n=3)]
    run = Engine(model, tok).start(PROMPTS[:2], params)
    texts, ends = {}, {}
    for p, c, d in run:
        assert (p, c) not in ends, "nothing after a stream's final delta"
        texts[(p, c)] = texts.get((p, c), "") + d.text
        if d.finish_reason is not None:
            ends[(p, c)] = d.finish_reason
    assert sorted(ends) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    for (p, c), text in texts.items():
        assert run.results[p][c].text == text
    greedy = [r.token_ids for r in run.results[1]]
    assert greedy[0] == greedy[1] == greedy[2]      # greedy completions agree


def test_padding_does_not_count_against_the_context(tok):
    # the short prompt is left-padded to the long one: slots exceed max_seq_len, positions do not
    model = model_for(tok, max_seq_len=32)
    long_ids = [tok.bos_id] + tok.encode(TEXT)[:27]          # 28 tokens: room for 5 more
    short = "d"
    params = [SamplingParams(temperature=0, ignore_eos=True), SamplingParams(temperature=0, ignore_eos=True)]
    (a,), (b,) = Engine(model, tok).generate([long_ids, short], params)
    assert len(a.token_ids) == 32 - 28 + 1 and a.finish_reason == "length"
    assert b.token_ids == generate(model, tok, short, params[1]).token_ids
    assert len(b.token_ids) == 32 - len(b.prompt_token_ids) + 1


def test_bad_batches_are_clear_errors(tok):
    model = model_for(tok, max_seq_len=16)
    eng = Engine(model, tok)
    with pytest.raises(LmforgeError, match="more than the model's context"):
        eng.start(["ok", TEXT * 3])
    with pytest.raises(ConfigError, match="2 params for 3 prompts"):
        eng.start(["a", "b", "c"], [SamplingParams(), SamplingParams()])
    with pytest.raises(ConfigError, match="non-empty list"):
        eng.start([])
    with pytest.raises(ConfigError, match="wrap one prompt"):
        eng.start([1, 2, 3])


def test_grammar_per_row(tok):
    pytest.importorskip("llguidance")
    from lmforge.infer.constrained import Grammar
    model = model_for(tok)
    options = ["heaven", "earth", "void"]
    g = Grammar.choices(tok, options)
    params = SamplingParams(temperature=1.0, max_tokens=20, seed=0, n=6)
    results = Engine(model, tok).generate(["In the", "d"], params, constraint=[g, None])
    assert all(r.text in options and r.finish_reason == "stop" for r in results[0])
    assert any(r.text not in options for r in results[1])   # the unconstrained prompt is free


@pytest.mark.parametrize("ffn, bias", [("swiglu", False), ("gelu", True)])
def test_inference_weights_match_training_path_and_follow_updates(tok, ffn, bias):
    model = model_for(tok, ffn=ffn, bias=bias, n_kv_heads=4)
    ids = torch.randint(0, tok.vocab_size, (2, 9))
    with torch.enable_grad():
        ref, _ = model(ids)                      # the modules themselves
    for transposed in (False, True):
        model.use_transposed_weights(transposed)
        with torch.inference_mode():
            fast, _ = model(ids)                 # fused q/k/v and gate/up, cached (in, out) copies
        torch.testing.assert_close(fast, ref.detach(), atol=1e-5, rtol=1e-5)
    # an in-place update (what an optimizer step does) must reach the cached copies
    with torch.no_grad():
        model.blocks[0].attn.k_proj.weight.mul_(1.5)
        model.blocks[1].ffn.down_proj.weight.add_(0.01)
        model.lm_head.weight.mul_(0.9)
    with torch.enable_grad():
        ref2, _ = model(ids)
    with torch.inference_mode():
        fast2, _ = model(ids)
    assert not torch.allclose(ref2, ref, atol=1e-3)
    torch.testing.assert_close(fast2, ref2.detach(), atol=1e-5, rtol=1e-5)
