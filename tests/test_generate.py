"""The generation loop: KV-cache decoding equals full recompute, stop strings, UTF-8-safe streaming, finish reasons,
and the `lmforge generate` verb on a tiny checkpoint."""
from __future__ import annotations

import torch
import pytest
from hypothesis import given, settings, strategies as st

from lmforge.cli import main
from lmforge.errors import ConfigError, LmforgeError
from lmforge import load
from lmforge.infer.detokenize import Detokenizer
from lmforge.infer.engine import generate, generate_n
from lmforge.infer.sampling import SamplingParams, process_logits, sample
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.tokenizer.bpe import resolve_pattern
from lmforge.tokenizer.tokenizer import Tokenizer

TEXT = "Hello world! héllo wörld. 你好，世界。 Emoji: 🙂🚀👩‍💻 done. "


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    # a few merges, so some tokens hold parts of a multi-byte character and some hold several characters
    return Tokenizer.train([TEXT * 20], vocab_size=272 + 40, progress=False)


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer([], resolve_pattern("gpt4"))  # one byte per token: every UTF-8 char spans tokens


def tiny_model(vocab: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    # init_std 0.3: at the default 0.02 a tied random model just repeats its last token
    cfg = dict(vocab_size=vocab, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=64, init_std=0.3)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


class Scripted(torch.nn.Module):
    """A stand-in model whose logits at output step k are script[k]: token ids (one-hot) or rows of logits."""

    def __init__(self, vocab: int, script, max_seq_len: int = 256):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, n_layer=1, n_head=1, d_model=2, max_seq_len=max_seq_len)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script = [self._row(s, vocab) for s in script]
        self.prompt_len = None

    @staticmethod
    def _row(s, vocab):
        if isinstance(s, int):
            r = torch.full((vocab,), -10.0)
            r[s] = 10.0
            return r
        return torch.as_tensor(s, dtype=torch.float32)

    def new_kv_cache(self, batch, max_len=None):
        return KVCache(batch, max_len or self.config.max_seq_len, 1, 1, 2)

    def forward(self, idx, kv_cache=None, logits_to_keep=0):
        if kv_cache.pos == 0:
            self.prompt_len = idx.shape[1]
        kv_cache.update(0, torch.zeros(1, 1, idx.shape[1], 2), torch.zeros(1, 1, idx.shape[1], 2))
        kv_cache.pos += idx.shape[1]
        step = kv_cache.pos - self.prompt_len
        return self.script[step].view(1, 1, -1), None


def byte_script(tok, text: str) -> list[int]:
    return list(text.encode("utf-8"))  # ids 0..255 are the raw bytes


def run_stream(model, tok, params, prompt="x"):
    s = generate(model, tok, prompt, params, stream=True)
    deltas = list(s)
    return deltas, s.result


# ---------------------------------------------------------------------------------------------------------------
# the loop against full recompute

def test_greedy_with_cache_equals_full_recompute(tok):
    model = tiny_model(tok.vocab_size)
    prompt = [tok.bos_id] + tok.encode("Hello wörld")
    res = generate(model, tok, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert res.token_ids == ids[len(prompt):]
    assert res.finish_reason == "length" and res.prompt_token_ids == prompt
    assert len(set(res.token_ids)) > 3  # a non-degenerate sequence, so the comparison means something


def test_sampling_with_cache_equals_full_recompute(tok):
    model = tiny_model(tok.vocab_size, seed=1, pos="learned", norm="layernorm", ffn="gelu")
    p = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, frequency_penalty=0.3,
                       seed=5, max_tokens=25, ignore_eos=True)
    prompt = tok.encode("你好", bos=True)
    res = generate(model, tok, prompt, p)
    g, ids, out = p.make_generator(), list(prompt), []
    with torch.no_grad():
        for _ in range(25):
            logits, _ = model(torch.tensor([ids]))
            x = process_logits(logits[:, -1], p, [prompt], [out])
            t = int(sample(x, [g])[0])
            ids.append(t)
            out.append(t)
    assert res.token_ids == out
    assert generate(model, tok, prompt, p).token_ids == out  # same seed, same output


def test_seeds_and_n(tok):
    model = tiny_model(tok.vocab_size)
    p = SamplingParams(seed=3, max_tokens=12, ignore_eos=True, n=3)
    outs = generate_n(model, tok, "Hi", p)
    assert [o.token_ids for o in outs] == [o.token_ids for o in generate_n(model, tok, "Hi", p)]
    assert len({tuple(o.token_ids) for o in outs}) == 3
    assert outs[0].token_ids == generate(model, tok, "Hi", p.replace(n=1)).token_ids
    with pytest.raises(ConfigError) as ei:
        generate(model, tok, "Hi", p)
    assert ei.value.field == "n"


def test_model_mode_restored_and_text_prompt_gets_bos(tok):
    model = tiny_model(tok.vocab_size).train()
    res = generate(model, tok, "Hi", SamplingParams(max_tokens=2, temperature=0))
    assert model.training
    assert res.prompt_token_ids == [tok.bos_id] + tok.encode("Hi")
    assert generate(model, tok, "Hi", SamplingParams(max_tokens=2), add_bos=False).prompt_token_ids == tok.encode("Hi")


# ---------------------------------------------------------------------------------------------------------------
# finish reasons and limits

def test_eos_stops_and_is_not_text(byte_tok):
    script = byte_script(byte_tok, "ab") + [byte_tok.eos_id, ord("z")]
    res = generate(Scripted(byte_tok.vocab_size, script), byte_tok, "x", SamplingParams(temperature=0))
    assert (res.text, res.finish_reason, res.stop_reason) == ("ab", "stop", byte_tok.eos_id)
    assert res.token_ids == [97, 98, byte_tok.eos_id]
    # a base model "ends" a document by starting the next: BOS stops too
    res = generate(Scripted(byte_tok.vocab_size, [97, byte_tok.bos_id, 98]), byte_tok, "x",
                   SamplingParams(temperature=0))
    assert (res.text, res.stop_reason) == ("a", byte_tok.bos_id)
    # ignore_eos goes on
    res = generate(Scripted(byte_tok.vocab_size, script), byte_tok, "x",
                   SamplingParams(temperature=0, ignore_eos=True, max_tokens=4))
    assert (res.text, res.finish_reason) == ("abz", "length")  # EOS is special: no text


def test_max_tokens_gives_length(byte_tok):
    res = generate(Scripted(byte_tok.vocab_size, byte_script(byte_tok, "abcdefgh")), byte_tok, "x",
                   SamplingParams(temperature=0, max_tokens=5))
    assert (res.text, res.finish_reason, len(res.token_ids)) == ("abcde", "length", 5)


def test_stop_token_ids_and_min_tokens(byte_tok):
    V, eos = byte_tok.vocab_size, byte_tok.eos_id

    def prefer(top, second):  # EOS (or a stop id) ranked first, something else second
        r = torch.full((V,), -10.0)
        r[top], r[second] = 10.0, 5.0
        return r
    script = [prefer(eos, ord("a")), prefer(eos, ord("b")), prefer(eos, ord("c"))]
    res = generate(Scripted(V, script), byte_tok, "x", SamplingParams(temperature=0, min_tokens=2))
    assert (res.text, res.token_ids, res.finish_reason) == ("ab", [97, 98, eos], "stop")
    res = generate(Scripted(V, byte_script(byte_tok, "ab;c")), byte_tok, "x",
                   SamplingParams(temperature=0, stop_token_ids=[ord(";")]))
    assert (res.text, res.stop_reason) == ("ab", ord(";"))


def test_prompt_too_long_is_a_clear_error(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=16)
    with pytest.raises(LmforgeError, match="more than the model's context of 16") as ei:
        generate(model, tok, list(range(17)), SamplingParams())
    assert ei.value.field == "prompt"
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        generate(model, tok, [tok.vocab_size + 5], SamplingParams())
    # exactly full: one token is still possible (the last token is never fed back)
    res = generate(model, tok, list(range(16)), SamplingParams(max_tokens=10, ignore_eos=True))
    assert (len(res.token_ids), res.finish_reason) == (1, "length")
    # max_tokens=None runs to the end of the context
    res = generate(model, tok, list(range(10)), SamplingParams(ignore_eos=True))
    assert (len(res.token_ids), res.finish_reason) == (7, "length")


def test_logprobs_raw_and_processed(tok):
    model = tiny_model(tok.vocab_size)
    prompt = tok.encode("Hello", bos=True)
    raw = generate(model, tok, prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True))
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt]))
    ref = torch.log_softmax(logits[0, -1].float(), -1)
    first = raw.logprobs[0]
    assert len(raw.logprobs) == 3 and first.token_id == raw.token_ids[0]
    assert abs(first.logprob - ref[first.token_id].item()) < 1e-5
    assert [i for i, _ in first.top] == ref.topk(2).indices.tolist()
    proc = generate(model, tok, prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=0,
                                                       logprobs_mode="processed", ignore_eos=True))
    assert [lp.logprob for lp in proc.logprobs] == [0.0, 0.0, 0.0]  # greedy: a point mass
    assert generate(model, tok, prompt, SamplingParams(max_tokens=2)).logprobs is None


# ---------------------------------------------------------------------------------------------------------------
# stop strings and streaming

def test_stop_string_spanning_tokens_is_cut_and_never_streamed(byte_tok):
    script = byte_script(byte_tok, "Hello<END>world")
    deltas, res = run_stream(Scripted(byte_tok.vocab_size, script), byte_tok,
                             SamplingParams(temperature=0, stop=["<END>"]))
    assert (res.text, res.finish_reason, res.stop_reason) == ("Hello", "stop", "<END>")
    assert "".join(d.text for d in deltas) == "Hello"
    assert not any("<" in d.text for d in deltas)
    assert res.token_ids == script[:len("Hello<END>")]  # generation stopped right there


def test_stop_string_across_streamed_chunks_and_false_alarm(byte_tok):
    # "<E" looks like the start of "<END>" and is held back, then released when "<Ex" cannot match
    script = byte_script(byte_tok, "ab<Ex cd<END>ef")
    deltas, res = run_stream(Scripted(byte_tok.vocab_size, script), byte_tok,
                             SamplingParams(temperature=0, stop=["<END>", "zz"]))
    texts = [d.text for d in deltas]
    assert res.text == "ab<Ex cd"
    assert texts[:6] == ["a", "b", "", "", "<Ex", " "]  # held while ambiguous, released at once after
    assert "".join(texts) == res.text


def test_min_tokens_defers_stop_strings(byte_tok):
    script = byte_script(byte_tok, "ab##cd##e")
    res = generate(Scripted(byte_tok.vocab_size, script), byte_tok, "x",
                   SamplingParams(temperature=0, stop=["##"], min_tokens=5))
    assert res.text == "ab##cd"


def test_utf8_streaming_never_splits_characters(tok, byte_tok):
    for t in (tok, byte_tok):
        ids = t.encode(TEXT)
        assert any(len(t.id_to_bytes(i)) and t.id_to_bytes(i)[0] >= 0x80 for i in ids)
        deltas, res = run_stream(Scripted(t.vocab_size, ids + [t.eos_id]), t, SamplingParams(temperature=0))
        assert res.text == TEXT and res.finish_reason == "stop"
        assert all("\ufffd" not in d.text for d in deltas)
        assert "".join(d.text for d in deltas) == TEXT
    # with byte tokens the 4-byte emoji arrives as 3 empty deltas, then the character
    deltas, _ = run_stream(Scripted(byte_tok.vocab_size, list("🙂".encode()) + [byte_tok.eos_id]), byte_tok,
                           SamplingParams(temperature=0))
    assert [d.text for d in deltas] == ["", "", "", "🙂", ""]


def test_invalid_bytes_become_replacement_chars(byte_tok):
    # a truncated character at max_tokens is flushed as U+FFFD instead of being silently dropped
    res = generate(Scripted(byte_tok.vocab_size, list("a🙂".encode())), byte_tok, "x",
                   SamplingParams(temperature=0, max_tokens=3))
    assert res.text == "a\ufffd"


def _valid_prefix(data: bytes) -> str:
    for j in range(len(data), -1, -1):
        try:
            return data[:j].decode("utf-8")
        except UnicodeDecodeError:
            continue


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab<>/ é世🙂")), max_size=30),
       stops=st.lists(st.text(alphabet=st.sampled_from(list("ab<>/é世🙂")), min_size=1, max_size=4),
                      max_size=3))
def test_detokenizer_properties(byte_tok, text, stops):
    """Byte tokens in: output = text cut at the first stop completed; nothing held back beyond what could match."""
    det = Detokenizer(byte_tok, stops)
    data, shown = text.encode(), ""
    matched = None
    for n, b in enumerate(data, 1):
        matched = det.add(b)
        if matched is not None:
            break
        shown += det.ready()
        so_far = _valid_prefix(data[:n])
        held = max((k for k in range(1, len(so_far) + 1)
                    if any(s.startswith(so_far[-k:]) and s != so_far[-k:] for s in stops)), default=0)
        assert shown == so_far[:len(so_far) - held]
        assert not any(s in shown for s in stops)
    if matched is None:
        det.finish()
    shown += det.ready(final=True)
    # reference: scan end positions; the first end at which some stop matches wins, the longest such stop
    expected = text
    for e in range(1, len(text) + 1):
        hits = [s for s in stops if text[:e].endswith(s)]
        if hits:
            expected = text[:e - max(map(len, hits))]
            break
    assert shown == expected
    assert "\ufffd" not in shown


# ---------------------------------------------------------------------------------------------------------------
# checkpoint loading and the CLI

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    from lmforge.checkpoint import save as save_checkpoint
    model = tiny_model(tok.vocab_size)
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    save_checkpoint(path, model=model, model_config=model.config.to_dict(), tokenizer=tok)
    return path


def test_load_round_trip(ckpt, tok):
    model, t = load(ckpt, device="cpu")
    assert t == tok and not model.training
    ref = tiny_model(tok.vocab_size)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert generate(model, t, "Hello", p).token_ids == generate(ref, tok, "Hello", p).token_ids


def test_cli_generate_matches_library(ckpt, tok, capsys):
    model, _ = load(ckpt, device="cpu")
    p = SamplingParams(temperature=0.8, top_k=20, seed=0, max_tokens=12, ignore_eos=False)
    expected = generate(model, tok, "Hello", p)
    rc = main(["generate", "--checkpoint", str(ckpt), "--prompt", "Hello", "--temperature", "0.8",
               "--top-k", "20", "--seed", "0", "--max-new-tokens", "12", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == expected.text + "\n"
    assert f"finish: {expected.finish_reason}" in err and "tok/s" in err
    rc = main(["generate", "--checkpoint", str(ckpt), "--prompt", "Hello", "--temperature", "0.8",
               "--top-k", "20", "--seed", "0", "--max-tokens", "12", "--no-stream", "--logprobs", "2",
               "--device", "cpu"])
    out2, err2 = capsys.readouterr()
    assert rc == 0 and out2 == out
    assert len([ln for ln in err2.splitlines() if "|" in ln]) == len(expected.token_ids)


def test_cli_errors_are_one_line(tmp_path, ckpt, capsys):
    rc = main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "checkpoint not found" in err
    rc = main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi", "--top-p", "1.5", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "top_p" in err


def test_cli_defaults_come_from_generation_config(tmp_path, tok, capsys):
    from lmforge.checkpoint import save as save_checkpoint
    model = tiny_model(tok.vocab_size)
    path = save_checkpoint(tmp_path / "c", model=model, model_config=model.config.to_dict(), tokenizer=tok,
                           generation_config={"max_new_tokens": 3, "temperature": 0, "eos_token_id": 1})
    greedy = generate(model, tok, "Hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert greedy.finish_reason == "length"  # this tiny model does not stop by itself in 5 tokens
    base = ["generate", "--checkpoint", str(path), "--prompt", "Hi", "--device", "cpu"]
    assert main(base) == 0
    out, err = capsys.readouterr()
    assert out == tok.decode(greedy.token_ids[:3]) + "\n" and "[3 tokens" in err
    assert main(base + ["--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == greedy.text + "\n" and "[5 tokens" in err
    (path / "generation_config.json").write_text('{"top_p": 7}')
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "generation_config.json" in err and "top_p" in err
