"""Test-time compute: beam search against Hugging Face generate(num_beams=K), beam width 1 == greedy, best-of-N
picks the best-scoring sample (raw mean logprob or a scorer), self-consistency the plurality answer."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.engine import generate, generate_n
from lmforge.infer.outputs import GenerationResult
from lmforge.infer.sampling import SamplingParams, TokenLogprob
from lmforge.infer.search import beam_search, best_of_n, last_number, self_consistency
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.bpe import resolve_pattern
from lmforge.tokenizer.tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer([], resolve_pattern("gpt4"))  # bytes + specials: instant to build


def tiny_model(vocab: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    # init_std 0.3: peaked distributions (at 0.02 a random model is near-uniform and repeats itself)
    cfg = dict(vocab_size=vocab, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=64, init_std=0.3)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def teacher_forced_logprobs(model, prompt_ids, ids) -> list[float]:
    """Raw log_softmax of one full forward (no cache), gathered at the given continuation ids."""
    full = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logits, _ = model(full)
    lp = torch.log_softmax(logits[0, len(prompt_ids) - 1:-1].float(), -1)
    return lp.gather(1, torch.tensor(ids)[:, None]).squeeze(1).tolist()


# ---------------------------------------------------------------------------------------------------------------
# beam search vs Hugging Face

def _llama_pair(transformers, tok, seed=0):
    """A random-weight HF LlamaForCausalLM and the same weights in our Transformer."""
    V = tok.vocab_size
    hc = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.3,
                                  attn_implementation="eager", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                  pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hc).eval()
    cfg = ModelConfig(vocab_size=V, d_model=32, d_ff=64, n_layer=2, n_head=4, n_kv_heads=2, max_seq_len=64,
                      norm_eps=1e-6, tie_embeddings=False, rope_theta=hc.rope_parameters["rope_theta"])
    # HF Llama -> ours: the same tensors under other names
    sd = hf.state_dict()
    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for k, v in sd.items():
            for theirs, ours in (("self_attn.", "attn."), ("mlp.", "ffn.")):
                if k.startswith(p + theirs):
                    out[q + ours + k[len(p + theirs):]] = v
    model = Transformer(cfg).eval()
    model.load_state_dict(out)
    return hf, model


# (n_beams, length_penalty, early_stopping, number of extra stop ids, max_tokens): stop ids make hypotheses end
# early (a random model rarely picks EOS); none = every hypothesis runs to max_tokens
BEAM_CONFIGS = [(3, 1.0, False, 30, 16), (4, 0.5, True, 30, 16), (2, 2.0, "never", 30, 16),
                (4, -1.0, False, 30, 16), (3, 1.0, False, 0, 12), (5, 0.0, "never", 12, 20),
                # these two stop at a different step if the early-stopping rules are not HF's
                (4, 1.0, True, 10, 16), (3, 1.5, False, 10, 16)]


@pytest.mark.parametrize("K,length_penalty,early_stopping,n_stop,max_tokens", BEAM_CONFIGS)
def test_beam_search_matches_hf(tok, K, length_penalty, early_stopping, n_stop, max_tokens):
    transformers = pytest.importorskip("transformers")
    hf, model = _llama_pair(transformers, tok)
    prompt = [tok.bos_id] + tok.encode("Hello there")
    stops = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:n_stop].tolist()
    ends = [tok.eos_id, tok.bos_id] + stops  # generate()'s end ids (EOS and BOS) plus the stop ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), num_beams=K, num_return_sequences=K, do_sample=False,
                          max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                          eos_token_id=ends, pad_token_id=tok.pad_id, output_scores=True,
                          return_dict_in_generate=True)
    res = beam_search(model, tok, prompt, n_beams=K, max_tokens=max_tokens, length_penalty=length_penalty,
                      early_stopping=early_stopping, stop_token_ids=stops, progress=False)
    lengths = (ref.beam_indices >= 0).sum(1).tolist()  # HF pads shorter hypotheses
    ref_seqs = [s[len(prompt):len(prompt) + n].tolist() for s, n in zip(ref.sequences, lengths)]
    assert [c.token_ids for c in res.candidates] == ref_seqs
    assert res.best is res.candidates[0]
    for c, s in zip(res.candidates, ref.sequences_scores.tolist()):
        assert abs(c.score - s) <= 1e-4
        # the score is what the docstring says, from logprobs a full forward gives too
        lps = teacher_forced_logprobs(model, prompt, c.token_ids)
        assert c.logprobs == pytest.approx(lps, abs=1e-4)
        assert c.score == pytest.approx(math.fsum(lps) / len(lps) ** length_penalty, abs=1e-4)
        assert c.finish_reason == ("stop" if c.token_ids[-1] in ends else "length")
        assert c.text == tok.decode([i for i in c.token_ids if i not in ends and i < 256])
    if n_stop and length_penalty <= 1.0:  # early ends are exercised (a penalty of 2 favours running on)
        assert any(c.finish_reason == "stop" for c in res.candidates)


def test_beam_width_one_is_greedy(tok):
    model = tiny_model(tok.vocab_size, seed=3)
    prompt = "Once upon"
    free = generate(model, tok, prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0))
    beam = beam_search(model, tok, prompt, n_beams=1, max_tokens=20, ignore_eos=True, progress=False)
    assert [c.token_ids for c in beam.candidates] == [free.token_ids]
    assert beam.best.logprobs == pytest.approx([lp.logprob for lp in free.logprobs], abs=1e-5)
    assert beam.best.finish_reason == "length" and beam.best.text == free.text
    # and with a stop id the greedy path reaches mid-way: both end there, the stop token kept in the ids
    stop = next(t for i, t in enumerate(free.token_ids) if i >= 4 and t not in free.token_ids[:i])
    greedy = generate(model, tok, prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]))
    beam = beam_search(model, tok, prompt, n_beams=1, max_tokens=20, stop_token_ids=[stop], progress=False)
    assert beam.best.token_ids == greedy.token_ids and greedy.token_ids[-1] == stop
    assert beam.best.finish_reason == "stop" and beam.best.text == greedy.text


def test_wider_beam_finds_a_sequence_at_least_as_likely(tok):
    model = tiny_model(tok.vocab_size, seed=4)
    kw = dict(max_tokens=8, ignore_eos=True, length_penalty=0.0, progress=False, early_stopping="never")
    scores = [beam_search(model, tok, "ab", n_beams=k, **kw).best.score for k in (1, 4)]
    assert scores[1] >= scores[0] - 1e-6
    res = beam_search(model, tok, "ab", n_beams=4, **kw)
    assert [c.score for c in res.candidates] == sorted((c.score for c in res.candidates), reverse=True)
    assert len({tuple(c.token_ids) for c in res.candidates}) == 4  # distinct hypotheses


def test_beam_search_errors(tok):
    model = tiny_model(tok.vocab_size)
    with pytest.raises(ConfigError, match="n_beams"):
        beam_search(model, tok, "hi", n_beams=0)
    with pytest.raises(ConfigError, match="early_stopping"):
        beam_search(model, tok, "hi", early_stopping="sometimes")
    with pytest.raises(ConfigError, match="early_stopping"):
        beam_search(model, tok, "hi", early_stopping=1.0)
    with pytest.raises(ConfigError, match="length_penalty"):
        beam_search(model, tok, "hi", length_penalty=float("nan"))
    with pytest.raises(LmforgeError, match="prompt"):
        beam_search(model, tok, "x" * 100)  # longer than the 64-token context
    with pytest.raises(ConfigError, match="max_tokens"):
        beam_search(model, tok, "hi", max_tokens=0)


# ---------------------------------------------------------------------------------------------------------------
# best-of-N

def test_best_of_n_ranks_by_raw_mean_logprob(tok):
    model = tiny_model(tok.vocab_size, seed=1)
    # top_k and temperature change the sampling distribution; the score must still be the RAW mean logprob
    params = SamplingParams(n=6, temperature=1.3, top_k=20, max_tokens=10, seed=7)
    res = best_of_n(model, tok, "Hi", params, progress=False)
    prompt_ids = [tok.bos_id] + tok.encode("Hi")
    ref = generate_n(model, tok, "Hi", params)
    assert [c.token_ids for c in res.candidates] == [r.token_ids for r in ref]
    means = []
    for c in res.candidates:
        lps = teacher_forced_logprobs(model, prompt_ids, c.token_ids)
        means.append(sum(lps) / len(lps))
        assert c.mean_logprob == pytest.approx(means[-1], abs=1e-4) and c.score == c.mean_logprob
    assert len(set(round(m, 6) for m in means)) > 1  # distinct samples, so picking the max means something
    assert res.best is res.candidates[max(range(6), key=lambda i: means[i])]
    # one call per sample (progress) gives the very same candidates
    again = best_of_n(model, tok, "Hi", params, progress=True)
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in res.candidates]


def test_best_of_n_with_a_scorer(tok):
    model = tiny_model(tok.vocab_size, seed=2)
    seen = []

    def scorer(prompt_text, completion):  # e.g. a reward model; here: how many vowels
        seen.append(prompt_text)
        return sum(completion.count(v) for v in "aeiou") - 0.01 * len(completion)

    params = SamplingParams(n=8, temperature=1.0, max_tokens=12, seed=3)
    res = best_of_n(model, tok, "Hello", params, scorer=scorer, progress=False)
    values = [scorer("Hello", c.text) for c in res.candidates]
    assert [c.score for c in res.candidates] == values and len(set(values)) > 1
    assert res.best.score == max(values) and res.best is res.candidates[values.index(max(values))]
    assert set(seen) == {"Hello"}
    # ties go to the earliest sample
    assert best_of_n(model, tok, "Hello", params, scorer=lambda p, c: 1.0, progress=False).best.token_ids == \
        res.candidates[0].token_ids
    with pytest.raises(LmforgeError, match="scorer"):
        best_of_n(model, tok, "Hello", params, scorer=lambda p, c: "good", progress=False)
    with pytest.raises(LmforgeError, match="scorer"):
        best_of_n(model, tok, "Hello", params, scorer=lambda p, c: float("nan"), progress=False)


# ---------------------------------------------------------------------------------------------------------------
# self-consistency

def fake_sampler(texts_and_logprobs):
    """A sample_fn returning scripted completions: (text, per-token logprobs)."""
    def sample_fn(model, tokenizer, prompt, params, **kw):
        assert params.n == len(texts_and_logprobs) and params.logprobs is not None and params.logprobs_mode == "raw"
        out = []
        for text, lps in texts_and_logprobs:
            ids = list(range(len(lps)))
            out.append(GenerationResult(text, ids, "stop", logprobs=[TokenLogprob(i, lp) for i, lp in zip(ids, lps)]))
        return out
    return sample_fn


@pytest.mark.parametrize("text,expected", [
    ("so the answer is 42", "42"), ("1,234.50 dollars.", "1234.5"), ("5-3 = 2, not 3", "3"),
    ("it is -4 degrees", "-4"), ("x = -0.0", "0"), ("ends with 3.", "3"), ("12 apples, 7 pears", "7"),
    ("no numbers here", None), ("100", "100")])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_self_consistency_plurality_and_ties():
    samples = [("so 12 apples", [-1.0]), ("It is 7.", [-0.5]), ("answer: 12.0", [-2.0, -2.0]),
               ("no idea", [-0.1]), ("7", [-3.0]), ("1,000 or 12", [-1.5])]
    res = self_consistency(None, None, "q", SamplingParams(n=6), sample_fn=fake_sampler(samples), progress=False)
    assert res.votes == {"12": 3, "7": 2} and list(res.votes) == ["12", "7"]
    assert [c.answer for c in res.candidates] == ["12", "7", "12", None, "7", "12"]
    assert [c.score for c in res.candidates] == [0.5, 2 / 6, 0.5, 0.0, 2 / 6, 0.5]
    assert res.best.text == "so 12 apples"  # the winning answer's most likely candidate (-1.0 > -1.5 > -2.0)
    assert res.candidates[2].mean_logprob == -2.0 and res.candidates[2].sum_logprob == -4.0
    table = res.table().splitlines()
    assert len(table) == 1 + 6 + 1 and table[1].startswith("*") and "'so 12 apples'" in table[1]
    assert table[-1] == "votes: 12: 3, 7: 2" and sum(ln.startswith("*") for ln in table) == 1

    # a tie: the answer whose best candidate is more likely wins, although it came second
    tie = [("3", [-2.0]), ("4", [-0.2]), ("3", [-1.0]), ("4", [-5.0])]
    res = self_consistency(None, None, "q", SamplingParams(n=4), sample_fn=fake_sampler(tie), progress=False)
    assert res.best.answer == "4" and res.best.text == "4" and res.best.mean_logprob == -0.2
    assert list(res.votes) == ["4", "3"]
    # a full tie (same counts, same best logprob): the answer seen first
    tie = [("9", [-1.0]), ("8", [-1.0])]
    res = self_consistency(None, None, "q", SamplingParams(n=2), sample_fn=fake_sampler(tie), progress=False)
    assert res.best.answer == "9" and list(res.votes) == ["9", "8"]
    # no answer anywhere: the most likely candidate, no votes
    none = [("a", [-3.0]), ("b", [-0.3]), ("c", [-0.3])]
    res = self_consistency(None, None, "q", SamplingParams(n=3), sample_fn=fake_sampler(none), progress=False)
    assert res.votes == {} and res.best.text == "b" and res.best.answer is None


def test_self_consistency_with_a_custom_extractor_on_a_model(tok):
    model = tiny_model(tok.vocab_size, seed=5)
    first_char = lambda text: text[:1] or None  # noqa: E731
    params = SamplingParams(n=10, temperature=1.0, top_k=3, max_tokens=4, seed=13)  # a seed with >1 answer
    res = self_consistency(model, tok, "x", params, extract=first_char, progress=False)
    expected = Counter(first_char(r.text) for r in generate_n(model, tok, "x", params) if first_char(r.text))
    assert res.votes == dict(expected) and len(expected) > 1
    top = max(expected.values())
    assert res.best.answer in {a for a, n in expected.items() if n == top} and expected[res.best.answer] == top
    assert res.best.mean_logprob == max(c.mean_logprob for c in res.candidates if c.answer == res.best.answer)
