"""Speculative decoding: greedy output identical to generate() (draft = the same model, a different model, prompt
lookup; budgets, stop strings/ids, EOS, min_tokens, logprobs, streaming), the accept/reject rule's output
distribution against the target's processed distribution (chi-square, tiny vocab), and the acceptance bookkeeping."""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingParams, log_probs, process_logits
from lmforge.infer.speculative import SpecResult, ngram_proposal, speculative_generate, verify
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

TEXT = "Hello world! héllo wörld. 你好，世界。 Emoji: 🙂🚀👩‍💻 done. "
PROMPTS = ["Hello world", "abc abc abc abc", "你好"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 20], vocab_size=272 + 40, progress=False)


def tiny_model(vocab: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=96, init_std=0.3)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def models(tok):
    return {
        "target": tiny_model(tok.vocab_size, 0),
        "other": tiny_model(tok.vocab_size, 1, n_layer=1, d_model=16, n_head=2, n_kv_heads=1),  # a real draft shape
        # init_std 0.2: output that partly repeats, so prompt lookup is accepted some of the time, not always
        "loopy": tiny_model(tok.vocab_size, 1, init_std=0.2),
    }


def assert_same(a, b):
    for name in ("token_ids", "text", "finish_reason", "stop_reason"):
        assert getattr(a, name) == getattr(b, name), name


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


# ---------------------------------------------------------------------------------------------------------------
# greedy: identical to generate()

@pytest.mark.parametrize("lookahead", [1, 3, 5])
def test_greedy_draft_is_target_accepts_everything(tok, models, lookahead):
    m = models["target"]
    for prompt in PROMPTS:
        ref = generate(m, tok, prompt, GREEDY)
        res = speculative_generate(m, tok, prompt, GREEDY, draft_model=m, lookahead=lookahead, adaptive=False)
        assert isinstance(res, SpecResult)
        assert_same(res, ref)
        st = res.spec_stats
        assert st.acceptance_rate == 1.0
        # every step but the last emits lookahead + 1 tokens; the budget caps the last one's proposal
        assert st.steps == math.ceil(40 / (lookahead + 1))
        assert st.proposed == st.accepted == 40 - st.steps
        assert st.target_forwards == st.steps + 1  # + the prompt's prefill
        assert st.emitted == len(res.token_ids) == 40
        # adaptive K grows while everything is accepted (1 -> 3 -> 5 ...): the same tokens in fewer passes
        ada = speculative_generate(m, tok, prompt, GREEDY, draft_model=m, lookahead=lookahead)
        assert_same(ada, ref)
        assert ada.spec_stats.acceptance_rate == 1.0 and ada.spec_stats.steps < st.steps


@pytest.mark.parametrize("lookahead", [2, 4])
def test_greedy_with_a_different_draft(tok, models, lookahead):
    for prompt in PROMPTS:
        ref = generate(models["target"], tok, prompt, GREEDY)
        res = speculative_generate(models["target"], tok, prompt, GREEDY, draft_model=models["other"],
                                   lookahead=lookahead)
        assert_same(res, ref)
        st = res.spec_stats
        assert st.proposed > 0 and st.acceptance_rate < 0.5  # random models rarely agree
        assert st.draft_forwards >= st.proposed


@pytest.mark.parametrize("lookahead", [1, 4, 7])
@pytest.mark.parametrize("ngram", [1, 3])
def test_greedy_prompt_lookup(tok, models, lookahead, ngram):
    m = models["loopy"]
    accepted = 0
    for prompt in PROMPTS + ["Hello world! Hello world! Hello"]:
        ref = generate(m, tok, prompt, GREEDY)
        res = speculative_generate(m, tok, prompt, GREEDY, lookahead=lookahead, ngram=ngram)
        assert_same(res, ref)
        st = res.spec_stats
        assert st.draft_forwards == 0 and st.accepted <= st.proposed
        accepted += st.accepted
    assert accepted > 0


def test_greedy_budget_and_context_limits(tok, models):
    m = models["target"]
    for max_tokens in (1, 2, 3, 7):
        p = GREEDY.replace(max_tokens=max_tokens)
        for draft in (m, models["other"], None):
            assert_same(speculative_generate(m, tok, "Hello", p, draft_model=draft, lookahead=4),
                        generate(m, tok, "Hello", p))
    # no max_tokens: run until the target's context is full; a draft with a shorter context stops proposing
    short = tiny_model(tok.vocab_size, 0, max_seq_len=40)  # the target's weights, less context
    p = SamplingParams(temperature=0, ignore_eos=True)
    ref = generate(m, tok, "Hello", p)
    assert len(ref.token_ids) == 96 - len(ref.prompt_token_ids) + 1 and ref.finish_reason == "length"
    res = speculative_generate(m, tok, "Hello", p, draft_model=short, lookahead=3)
    assert_same(res, ref)
    assert 0 < res.spec_stats.proposed < 90


def test_stops_eos_min_tokens_and_streaming_match_generate(tok, models):
    m = models["loopy"]
    base = generate(m, tok, "Hello", GREEDY)
    text, ids = base.text, base.token_ids
    cases = [
        dict(stop=[text[10:13]]),                              # a stop string inside the output
        dict(stop=[text[10:13], text[20:22]], min_tokens=12),  # ... deferred by min_tokens
        dict(stop_token_ids=[ids[9]]),                         # a stop id
        dict(stop_token_ids=[ids[9]], min_tokens=15),
        dict(ignore_eos=False, logit_bias={tok.eos_id: 4.0}),  # EOS made likely enough to appear
        dict(max_tokens=5, stop=["no such text"]),
    ]
    for case in cases:
        p = GREEDY.replace(**case)
        ref = generate(m, tok, "Hello", p)
        ref_stream = [d.text for d in generate(m, tok, "Hello", p, stream=True)]
        for draft in (m, models["other"], None):
            res = speculative_generate(m, tok, "Hello", p, draft_model=draft, lookahead=4)
            assert_same(res, ref)
            s = speculative_generate(m, tok, "Hello", p, draft_model=draft, lookahead=4, stream=True)
            deltas = list(s)
            assert "".join(d.text for d in deltas) == "".join(ref_stream) == ref.text
            assert [t for d in deltas for t in d.token_ids] == ref.token_ids
            assert deltas[-1].finish_reason == ref.finish_reason and all(d.finish_reason is None for d in deltas[:-1])
            assert isinstance(s.result, SpecResult) and s.result.spec_stats is s.spec_stats
            assert s.spec_stats.emitted == len(ref.token_ids)
    assert any(generate(m, tok, "Hello", GREEDY.replace(**c)).finish_reason == "stop" for c in cases[:5])
    eos = generate(m, tok, "Hello", GREEDY.replace(**cases[4]))
    assert eos.stop_reason == tok.eos_id  # the EOS case really ended on EOS


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_greedy_logprobs_match_generate(tok, models, mode):
    m = models["target"]
    p = GREEDY.replace(logprobs=3, logprobs_mode=mode, max_tokens=20, top_k=5)
    ref = generate(m, tok, "Hello world", p)
    for draft in (m, models["other"], None):
        res = speculative_generate(m, tok, "Hello world", p, draft_model=draft, lookahead=3)
        assert_same(res, ref)
        assert len(res.logprobs) == len(res.token_ids)
        for a, b in zip(res.logprobs, ref.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [i for i, _ in a.top] == [i for i, _ in b.top]
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)


def test_sampled_distribution_each_step_is_the_processed_one(tok, models):
    """With penalties and min_tokens, position i of a verify pass must be processed with the accepted draft
    tokens before it counted as output: compare every emitted token's processed distribution (all V logprobs)
    with process_logits on a full recompute of the same sequence."""
    m = models["target"]
    V = tok.vocab_size
    p = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.4, min_tokens=6, max_tokens=24, seed=3, logprobs=V,
                       logprobs_mode="processed")
    for draft in (m, models["other"], None):
        res = speculative_generate(m, tok, "abc abc abc", p, draft_model=draft, lookahead=4)
        prompt, out = res.prompt_token_ids, res.token_ids
        with torch.no_grad():
            logits, _ = m(torch.tensor([prompt + out[:-1]]))
        raw = logits[0, len(prompt) - 1:].float()
        want = log_probs(process_logits(raw, p, [prompt] * len(out), [out[:i] for i in range(len(out))],
                                        eos_token_ids=[tok.eos_id, tok.bos_id]))
        for i, lp in enumerate(res.logprobs):
            got = torch.full((V,), float("-inf"))
            ids, vals = zip(*lp.top)
            got[list(ids)] = torch.tensor(vals)
            finite = want[i] > float("-inf")
            assert torch.equal(finite, got > float("-inf")), f"token {i}: a different support"
            assert torch.allclose(got[finite], want[i][finite], atol=1e-4)
            assert lp.logprob == pytest.approx(want[i][out[i]].item(), abs=1e-4)


def test_verify_gets_the_drafts_processed_distributions(tok, models, monkeypatch):
    """The q handed to the accept/reject rule is the draft model's processed distribution at each proposed
    position (what the proposal was drawn from), and p is the target's, both in the right context."""
    import lmforge.infer.speculative as spec
    calls = []

    def spy(p_logits, draft, q_probs=None, generator=None):
        n, nxt = verify(p_logits, draft, q_probs, generator)
        calls.append((p_logits[0], draft[0].tolist(), q_probs[0] if q_probs is not None else None, int(n), int(nxt)))
        return n, nxt

    monkeypatch.setattr(spec, "verify", spy)
    m, d = models["target"], models["other"]
    p = SamplingParams(temperature=1.2, top_k=30, repetition_penalty=1.2, frequency_penalty=0.3, min_tokens=4,
                       max_tokens=20, seed=5)
    res = speculative_generate(m, tok, "Hello", p, draft_model=d, lookahead=3)
    prompt, out = res.prompt_token_ids, []
    assert sum(len(c[1]) for c in calls) == res.spec_stats.proposed and len(calls) == res.spec_stats.steps
    eos = [tok.eos_id, tok.bos_id]
    for p_logits, draft, q, n, nxt in calls:
        K = len(draft)
        with torch.no_grad():
            ctx = torch.tensor([prompt + out + draft])
            dl, _ = d(ctx)
            tl, _ = m(ctx)
        start = len(prompt) + len(out) - 1
        outs = [out + draft[:i] for i in range(K + 1)]
        want_p = process_logits(tl[0, start:start + K + 1], p, [prompt] * (K + 1), outs, eos_token_ids=eos)
        assert torch.equal(want_p.isinf(), p_logits.isinf())
        assert torch.allclose(want_p[~want_p.isinf()], p_logits[~p_logits.isinf()], atol=1e-4)
        if K:
            want_q = process_logits(dl[0, start:start + K], p, [prompt] * K, outs[:K], eos_token_ids=eos).softmax(-1)
            assert torch.allclose(q, want_q, atol=1e-5)
            assert all(q[i, t] > 0 for i, t in enumerate(draft))
        out += draft[:n] + [nxt]
    assert out[:len(res.token_ids)] == res.token_ids and len(out) >= len(res.token_ids)


def test_seeded_sampling_is_reproducible_and_self_draft_accepts_nearly_all(tok, models):
    m = models["target"]
    p = SamplingParams(temperature=0.8, top_k=20, max_tokens=30, seed=11, ignore_eos=True)
    a = speculative_generate(m, tok, "Hello", p, draft_model=m, lookahead=4)
    b = speculative_generate(m, tok, "Hello", p, draft_model=m, lookahead=4)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    # p == q up to float rounding: min(1, p/q) ~ 1
    assert a.spec_stats.acceptance_rate > 0.9
    c = speculative_generate(m, tok, "Hello", p.replace(seed=12), draft_model=m, lookahead=4)
    assert c.token_ids != a.token_ids


# ---------------------------------------------------------------------------------------------------------------
# the accept/reject rule: its output distribution is the target's

CHI2_999 = {10: 29.588, 20: 45.315, 30: 59.703, 50: 86.661}  # chi2.ppf(0.999, df) (scipy 1.17)


def chi2_critical(df: int, z: float = 3.090232) -> float:
    """Wilson-Hilferty approximation of the 0.999 quantile of chi-square(df); slightly conservative."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_chi2_critical_matches_table():
    for df, ref in CHI2_999.items():
        assert ref <= chi2_critical(df) <= ref * 1.01


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count < 5 pooled into one; (statistic, degrees of freedom).
    Cells of probability 0 must be empty (checked by the caller)."""
    n = counts.sum().item()
    exp = probs.double() * n
    big = exp >= 5
    obs_c = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp_c = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    return float(((obs_c - exp_c) ** 2 / exp_c).sum()), int(keep.sum()) - 1


def bigram_tables(V: int, params: SamplingParams, seed: int):
    """A target and a draft 'model' whose next-token logits depend on the last token only: processed [V, V]."""
    g = torch.Generator().manual_seed(seed)
    target_raw = torch.randn(V, V, generator=g) * 2
    draft_raw = target_raw + torch.randn(V, V, generator=g) * 1.5  # related, but clearly different
    return process_logits(target_raw, params), process_logits(draft_raw, params)


def simulate(P: torch.Tensor, Q: torch.Tensor | None, start: torch.Tensor, K: int, g: torch.Generator):
    """One speculative step for every row of `start` (the last token): emitted tokens as [B, K+1], -1 padded."""
    B = start.shape[0]
    draft, qs, cur = [], [], start
    for _ in range(K):
        if Q is None:  # a deterministic proposer (as prompt lookup): the target's first or second choice
            top2 = P[cur].topk(2, dim=-1).indices
            cur = top2[torch.arange(B), cur % 2]
        else:
            qs.append(Q[cur].softmax(-1))
            cur = torch.multinomial(qs[-1], 1, generator=g).squeeze(1)
        draft.append(cur)
    draft = torch.stack(draft, 1)
    ctx = torch.cat([start[:, None], draft], 1)  # the last token before each position
    n, nxt = verify(P[ctx], draft, torch.stack(qs, 1) if Q is not None else None, g)
    out = torch.full((B, K + 1), -1, dtype=torch.long)
    out[:, :K] = torch.where(torch.arange(K)[None, :] < n[:, None], draft, -1)  # the accepted prefix
    out[torch.arange(B), n] = nxt
    return out


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_verify_first_two_tokens_follow_the_target(proposer):
    """20k..40k runs of two speculative steps on a bigram pair with V = 8: the first two emitted tokens must be
    distributed as P[s](a) * P[a](b), P = the target's PROCESSED distribution (temperature + top-k)."""
    V, N, K, s0 = 8, 40000, 2, 6
    params = SamplingParams(temperature=0.7, top_k=5)
    P, Q = bigram_tables(V, params, seed=0)
    Q = Q if proposer == "draft" else None
    g = torch.Generator().manual_seed(1)
    start = torch.full((N,), s0)
    first = simulate(P, Q, start, K, g)
    second = simulate(P, Q, first[:, 0], K, g)  # used where the first step emitted only one token
    t1 = first[:, 0]
    t2 = torch.where(first[:, 1] >= 0, first[:, 1], second[:, 0])
    assert 0.2 < (first[:, 1] >= 0).float().mean() < 0.95  # both accepted and rejected proposals are common
    counts = torch.bincount(t1 * V + t2, minlength=V * V)
    probs = P.softmax(-1)
    expected = (probs[s0][:, None] * probs).flatten()  # joint of (t1, t2)
    assert counts[expected == 0].sum() == 0, "a token the target's top-k filtered out was emitted"
    stat, df = chi_square(counts, expected)
    assert df >= 15
    assert stat < chi2_critical(df), (stat, df)
    if Q is not None:  # the test has power: the draft's own distribution is rejected by it
        q_counts = torch.bincount(torch.multinomial(Q[s0].softmax(-1), N, replacement=True, generator=g),
                                  minlength=V)
        stat_q, df_q = chi_square(q_counts, probs[s0])
        assert stat_q > chi2_critical(df_q) or q_counts[probs[s0] == 0].sum() > 0


def test_verify_deterministic_cases():
    V = 6
    point = lambda ids: torch.full((len(ids), V), float("-inf")).scatter_(1, torch.tensor(ids)[:, None], 0.0)
    draft = torch.tensor([[1, 2, 3, 4]])
    # target agrees on the first two proposals, then wants 5: n = 2, replacement 5, no randomness needed
    n, nxt = verify(point([1, 2, 5, 0, 0])[None], draft)
    assert (n.item(), nxt.item()) == (2, 5)
    # agrees on all: n = K and the bonus token comes from the last position
    n, nxt = verify(point([1, 2, 3, 4, 0])[None], draft)
    assert (n.item(), nxt.item()) == (4, 0)
    # with a draft distribution: q puts all mass on the proposal, p none -> rejected, replacement from p - q
    q = torch.nn.functional.one_hot(draft, V).float()
    n, nxt = verify(point([3, 2, 3, 4, 0])[None], draft, q)
    assert (n.item(), nxt.item()) == (0, 3)
    # K = 0: a plain sample from p
    n, nxt = verify(point([4])[None], torch.zeros(1, 0, dtype=torch.long))
    assert (n.item(), nxt.item()) == (0, 4)
    # acceptance probability is min(1, p/q): p(x) = 0.25, q(x) = 1 -> accepted a quarter of the time
    logits = torch.log(torch.tensor([[0.25, 0.75, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0.]]))
    n, nxt = verify(logits.expand(20000, 2, V), torch.zeros(20000, 1, dtype=torch.long),
                    generator=torch.Generator().manual_seed(0))
    assert n.float().mean().item() == pytest.approx(0.25, abs=0.015)
    assert (nxt[n == 0] == 1).all() and (nxt[n == 1] == 0).all()  # residual of a point mass at 0: token 1


# ---------------------------------------------------------------------------------------------------------------
# prompt lookup and errors

def test_ngram_proposal():
    assert ngram_proposal([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 3, ngram=3) == [7, 1, 2]   # the most recent match
    assert ngram_proposal([5, 1, 2, 8, 8, 2], 2, ngram=3) == [8, 8]                      # fallback to n = 1
    assert ngram_proposal([1, 2, 1, 2, 1], 5, ngram=2) == [2, 1, 2, 1, 2]                # periodic continuation
    assert ngram_proposal([7, 7], 3, ngram=3) == [7, 7, 7]
    assert ngram_proposal([1, 2, 3, 4], 3, ngram=3) == []                                # nothing repeats
    assert ngram_proposal([1, 2, 1], 0) == [] and ngram_proposal([4], 3) == []


def test_errors(tok, models):
    m = models["target"]
    with pytest.raises(ConfigError, match="lookahead"):
        speculative_generate(m, tok, "Hi", GREEDY, lookahead=0)
    with pytest.raises(ConfigError, match="ngram"):
        speculative_generate(m, tok, "Hi", GREEDY, ngram=0)
    with pytest.raises(ConfigError, match="'n'"):
        speculative_generate(m, tok, "Hi", GREEDY.replace(n=2))
    small_vocab = tiny_model(100)
    with pytest.raises(LmforgeError, match="share one tokenizer"):
        speculative_generate(m, tok, "Hi", GREEDY, draft_model=small_vocab)
    other_tok = Tokenizer.train(["something else entirely " * 30], vocab_size=272 + 5, progress=False)
    with pytest.raises(LmforgeError, match="tokenizer differs"):
        speculative_generate(m, tok, "Hi", GREEDY, draft_model=m, draft_tokenizer=other_tok)
    speculative_generate(m, tok, "Hi", GREEDY.replace(max_tokens=2), draft_model=m, draft_tokenizer=tok)
