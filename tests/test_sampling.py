"""SamplingParams validation and logits processing, checked against Hugging Face's processors and by statistics."""
import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.errors import ConfigError
from lmforge.infer.sampling import SamplingParams, gather_logprobs, log_probs, process_logits, sample

V = 64


def _hf_list(p: SamplingParams) -> LogitsProcessorList:
    """The processors HF generate() would build for these params, in HF's own order."""
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(p.min_p))
    return LogitsProcessorList(procs)


COMBOS = [
    dict(temperature=0.7),
    dict(temperature=1.6),
    dict(top_k=5),
    dict(top_k=1),
    dict(top_p=0.9),
    dict(top_p=0.3),
    dict(min_p=0.1),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8),
    dict(temperature=0.8, top_k=20, top_p=0.9),
    dict(temperature=1.3, top_p=0.8, min_p=0.05),
    dict(repetition_penalty=1.2, temperature=0.9, top_k=30, top_p=0.95, min_p=0.02),
    dict(repetition_penalty=1.5, temperature=2.0, top_k=10, top_p=0.5),
]


@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_hf_logits_processors(kw):
    g = torch.Generator().manual_seed(0)
    B, L = 4, 12
    logits = torch.randn(B, V, generator=g) * 3
    ids = torch.randint(0, V, (B, L), generator=g)
    p = SamplingParams(**kw)
    # split each row's history into prompt / output: the repetition penalty covers both
    ours = process_logits(logits, p, prompt_ids=ids[:, :7].tolist(), output_ids=ids[:, 7:].tolist())
    ref = _hf_list(p)(ids, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens filtered"
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), atol=1e-6, rtol=0)
    # the filters really did something in the filtering combos (guards against a vacuous comparison)
    if kw.get("top_k") or kw.get("top_p") or kw.get("min_p"):
        assert torch.isinf(ours).any()


@pytest.mark.parametrize("n_out", [3, 6])
def test_bias_and_min_tokens_match_hf_order(n_out):
    """HF's generate() order: SequenceBias -> RepetitionPenalty -> MinNewTokens -> warpers. We mask min_tokens
    before the penalty; the results must agree (the penalty keeps -inf at -inf)."""
    g = torch.Generator().manual_seed(5)
    B, P = 3, 5
    logits = torch.randn(B, V, generator=g) * 2
    ids = torch.randint(0, V, (B, P + n_out), generator=g)
    ids[:, P] = 9  # an EOS / stop id in every history, so the penalty meets the -inf mask
    bias = {9: 3.0, 4: -2.5, int(ids[0, 0]): 1.5}
    p = SamplingParams(logit_bias=bias, min_tokens=5, stop_token_ids=[11], repetition_penalty=1.3,
                       temperature=0.7, top_k=12, top_p=0.9)
    ours = process_logits(logits, p, prompt_ids=ids[:, :P].tolist(), output_ids=ids[:, P:].tolist(),
                          eos_token_ids=[9])
    hf = LogitsProcessorList([
        SequenceBiasLogitsProcessor([[[i], b] for i, b in bias.items()]),
        RepetitionPenaltyLogitsProcessor(1.3),
        MinNewTokensLengthLogitsProcessor(P, 5, [9, 11]),
        TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.9)])
    ref = hf(ids, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.isinf(ours[:, 9]).all() == (n_out < 5)
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), atol=1e-6, rtol=0)


def test_per_row_params_equal_separate_calls():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g)
    rows = [SamplingParams(top_k=3), SamplingParams(temperature=0.5, top_p=0.7),
            SamplingParams(repetition_penalty=1.4, min_p=0.2)]
    hist = [[1, 2, 3], [4, 5], [6, 7, 7]]
    batch = process_logits(logits, rows, prompt_ids=hist, output_ids=[[], [], [9]])
    for b, p in enumerate(rows):
        one = process_logits(logits[b:b + 1], p, prompt_ids=[hist[b]], output_ids=[[9] if b == 2 else []])
        torch.testing.assert_close(batch[b:b + 1], one)


def test_logit_bias_and_presence_frequency_penalties():
    logits = torch.zeros(1, 8)
    p = SamplingParams(logit_bias={2: 5.0, "3": -100}, presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(logits, p, prompt_ids=[[4, 4, 4]], output_ids=[[1, 1, 1, 2]])
    expected = torch.zeros(1, 8)
    expected[0, 2] = 5.0 - 0.5 - 0.25      # bias, then present once in the output
    expected[0, 3] = -100.0
    expected[0, 1] = -0.5 - 3 * 0.25       # three times in the output
    # token 4 appears only in the prompt: OpenAI penalties ignore the prompt
    torch.testing.assert_close(out, expected)


def test_repetition_penalty_counts_once_and_covers_prompt():
    logits = torch.tensor([[2.0, -2.0, 2.0, 0.0]])
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[[0, 0]], output_ids=[[1, 0]])
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 2.0, 0.0]]))


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 6)
    p = SamplingParams(min_tokens=2, stop_token_ids=[4])
    early = process_logits(logits, p, output_ids=[[1]], eos_token_ids=[5])
    assert torch.isinf(early[0, [4, 5]]).all() and torch.isfinite(early[0, :4]).all()
    late = process_logits(logits, p, output_ids=[[1, 2]], eos_token_ids=[5])
    assert torch.isfinite(late).all()
    ignore = process_logits(logits, p.replace(ignore_eos=True), output_ids=[[]], eos_token_ids=[5])
    assert torch.isinf(ignore[0, 4]) and torch.isfinite(ignore[0, 5])


def test_greedy_when_temperature_zero():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, V, generator=g)
    p = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)  # filters are moot for greedy
    out = process_logits(logits, p)
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    states = [gg.get_state() for gg in gens]
    for _ in range(3):
        assert torch.equal(sample(out, gens), logits.argmax(-1))
    # greedy consumes no randomness
    assert all(torch.equal(gg.get_state(), s) for gg, s in zip(gens, states))
    # greedy sees the penalised logits
    logits2 = torch.tensor([[3.0, 2.9, 0.0]])
    pen = process_logits(logits2, SamplingParams(temperature=0, repetition_penalty=1.5), prompt_ids=[[0]])
    assert sample(pen).item() == 1


def _chi2_pvalue(stat: float, df: int) -> float:
    """Upper tail of the chi-square distribution: Q(df/2, stat/2), the regularized upper incomplete gamma."""
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


def test_chi2_pvalue_helper():
    # df = 2 has the closed form exp(-x/2); df = 1 at 3.841 is the textbook 5% point
    for x in (0.5, 2.0, 7.0):
        assert math.isclose(_chi2_pvalue(x, 2), math.exp(-x / 2), rel_tol=1e-9)
    assert math.isclose(_chi2_pvalue(3.841458820694124, 1), 0.05, rel_tol=1e-6)


def _analytic(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The filtered distribution computed the textbook way, independently of process_logits."""
    z = [x / temperature for x in logits]
    m = max(z)
    w = [math.exp(x - m) for x in z]
    p = [x / sum(w) for x in w]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order[:top_k])
    kept_mass, nucleus = 0.0, set()
    for i in order:                       # smallest prefix (in the top-k renormalised mass) reaching top_p
        if i not in keep:
            break
        nucleus.add(i)
        kept_mass += p[i] / sum(p[j] for j in keep)
        if kept_mass >= top_p:
            break
    q = [p[i] if i in nucleus else 0.0 for i in range(len(p))]
    return [x / sum(q) for x in q]


def test_chi_square_against_analytic_distribution():
    logits = [2.0, 1.5, 1.2, 1.0, 0.4, 0.3, -0.5, -1.0, -2.0, 0.9]
    T, K, P = 0.8, 7, 0.9
    expected = _analytic(logits, T, K, P)
    support = [i for i, q in enumerate(expected) if q > 0]
    assert 3 <= len(support) < K  # both filters bite
    N = 40_000
    proc = process_logits(torch.tensor([logits]).expand(N, -1), SamplingParams(temperature=T, top_k=K, top_p=P))
    draws = sample(proc, torch.Generator().manual_seed(1234))
    counts = torch.bincount(draws, minlength=len(logits)).tolist()
    assert all(counts[i] == 0 for i in range(len(logits)) if expected[i] == 0), "a filtered token was sampled"
    stat = sum((counts[i] - N * expected[i]) ** 2 / (N * expected[i]) for i in support)
    assert _chi2_pvalue(stat, len(support) - 1) > 1e-3
    # power check: the same counts clearly reject the unfiltered softmax
    w = torch.tensor(logits).div(T).softmax(-1).tolist()
    stat_bad = sum((counts[i] - N * w[i]) ** 2 / (N * w[i]) for i in range(len(logits)))
    assert _chi2_pvalue(stat_bad, len(logits) - 1) < 1e-6


def test_chi_square_min_p():
    logits = [1.0, 0.8, 0.0, -0.3, -1.0, -3.0]
    p = torch.tensor(logits).softmax(-1)
    keep = p >= 0.3 * p.max()
    expected = torch.where(keep, p, 0.0)
    expected = (expected / expected.sum()).tolist()
    N = 20_000
    proc = process_logits(torch.tensor([logits]).expand(N, -1), SamplingParams(min_p=0.3))
    counts = torch.bincount(sample(proc, torch.Generator().manual_seed(7)), minlength=len(logits)).tolist()
    support = [i for i in range(len(logits)) if expected[i] > 0]
    assert all(counts[i] == 0 for i in range(len(logits)) if expected[i] == 0)
    stat = sum((counts[i] - N * expected[i]) ** 2 / (N * expected[i]) for i in support)
    assert _chi2_pvalue(stat, len(support) - 1) > 1e-3


def test_seed_determinism_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    p = SamplingParams(seed=42, temperature=1.0)

    def draws(row_logits, gen, steps=20):
        return [sample(row_logits, [gen]).item() for _ in range(steps)]

    alone = draws(logits[1:2], p.make_generator())
    # the same request in a batch next to unseeded and differently seeded rows
    gens = [None, p.make_generator(), SamplingParams(seed=7).make_generator(), None]
    batched = [sample(logits, gens)[1].item() for _ in range(20)]
    assert alone == batched
    assert draws(logits[1:2], p.make_generator()) == alone
    assert draws(logits[1:2], SamplingParams(seed=43).make_generator()) != alone


def test_logprobs_helpers():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]], dtype=torch.bfloat16)
    lp = log_probs(logits)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(1))
    (tl,) = gather_logprobs(lp, torch.tensor([2]), k=2)
    assert tl.token_id == 2 and math.isclose(tl.logprob, lp[0, 2].item())
    assert [i for i, _ in tl.top] == [1, 2]
    assert tl.top[0][1] >= tl.top[1][1]


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.1), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={1: 101.0}), "logit_bias.1"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=3, min_tokens=5), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop=5), "stop"),
    (dict(stop_token_ids=[1, -3]), "stop_token_ids"),
    (dict(seed=True), "seed"),
    (dict(n=0), "n"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs_mode="logits"), "logprobs_mode"),
    (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_validation_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError) as ei:
        SamplingParams(**kw)
    assert ei.value.field == field
    assert "\n" not in str(ei.value)


def test_normalisation_and_vocab_check():
    p = SamplingParams(top_k=-1, stop="###", logit_bias={"7": 1}, temperature=1)
    assert p.top_k == 0 and p.stop == ["###"] and p.logit_bias == {7: 1.0} and isinstance(p.temperature, float)
    p.check_vocab(8)
    with pytest.raises(ConfigError, match="outside the vocabulary") as ei:
        SamplingParams(stop_token_ids=[8]).check_vocab(8)
    assert ei.value.field == "stop_token_ids"


def test_per_row_generators_draw_the_processed_distribution():
    """The per-row-generator branch of sample() (the engine's): chi-square against softmax over top-k, and a
    filtered id (probability exactly 0) never drawn, even when a uniform lands on the edge of its interval."""
    logits = [1.2, -0.4, 0.7, 0.0, 2.0, -1.5]
    N = 6000
    proc = process_logits(torch.tensor([logits]).expand(N, -1), SamplingParams(top_k=4))
    gens = [torch.Generator().manual_seed(s) for s in range(N)]
    counts = torch.bincount(sample(proc, gens), minlength=len(logits)).tolist()
    expected = torch.tensor(logits).masked_fill(torch.tensor(logits) < 0.0, float("-inf")).softmax(-1).tolist()
    assert counts[1] == counts[5] == 0
    support = [i for i in range(len(logits)) if expected[i] > 0]
    stat = sum((counts[i] - N * expected[i]) ** 2 / (N * expected[i]) for i in support)
    assert _chi2_pvalue(stat, len(support) - 1) > 1e-3
    # zero-probability ids at the start and end of the row, and a point mass in the middle
    edge = torch.tensor([[float("-inf"), 0.0, 0.0, float("-inf")]] * 2000)
    assert set(sample(edge, torch.Generator().manual_seed(0)).tolist()) == {1, 2}
