"""The decode fast path (lmforge.infer.fastpath): the same logits as the model's forward step by step (GQA and
MHA, tied and untied heads, left-padded batches with the engine's masks), the same greedy tokens through the
engine, weight updates picked up, unsupported models left on the module path."""
from __future__ import annotations

import pytest
import torch

from lmforge.infer import fastpath
from lmforge.infer.engine import Engine
from lmforge.infer.fastpath import FastDecoder, supports, usable
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"
# Multi-row native steps sum each dot product in another order than MKL (packed-panel kernel): fp32 rounding of
# ~1e-5 on these deliberately large logits (init_std 0.3); a wrong formula is off by O(1).
TOL = dict(atol=5e-5, rtol=1e-4)
PROMPTS = ["In the", "And the earth was without form, and void; and darkness", "d", "the heaven"]


def llama(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=64, init_std=0.3,
               tie_embeddings=False)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 30], vocab_size=272 + 40, progress=False)


def left_padded(lens, vocab, seed=0):
    """Token ids (B, L) left-padded to the longest row, and the engine's (B, L) padding mask."""
    g = torch.Generator().manual_seed(seed)
    L = max(lens)
    ids = torch.zeros(len(lens), L, dtype=torch.long)
    mask = torch.zeros(len(lens), L, dtype=torch.bool)
    for i, n in enumerate(lens):
        ids[i, L - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[i, L - n:] = True
    return ids, mask


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("n_kv_heads,tie", [(2, False), (4, True), (1, False)])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("lens", [[7], [5, 9, 2], [6, 6]])
def test_steps_match_the_module_path(n_kv_heads, tie, transposed, lens, native):
    """Prefill with the model, then 6 decode steps twice over: model(...) and FastDecoder.step on copies of the
    same cache, feeding the same tokens; logits and cache contents must agree. Both step implementations: the
    C++ one (lmforge.infer.native; this machine has a compiler, so it must build) and the PyTorch one."""
    model = llama(n_kv_heads=n_kv_heads, tie_embeddings=tie)
    model.use_transposed_weights(transposed)
    V, steps = model.config.vocab_size, 6
    ids, mask = left_padded(lens, V)
    B, L = ids.shape
    padded = not bool(mask.all())
    full = torch.cat([mask, torch.ones(B, steps, dtype=torch.bool)], dim=1)   # generated tokens are real
    with torch.inference_mode():
        ref_cache = model.new_kv_cache(B, L + steps)
        logits, _ = model(ids, kv_cache=ref_cache, logits_to_keep=1, **({"attn_mask": mask} if padded else {}))
        cache = model.new_kv_cache(B, L + steps)
        cache.k.copy_(ref_cache.k), cache.v.copy_(ref_cache.v)
        cache.pos = ref_cache.pos
        dec = FastDecoder(model, native=native)
        assert dec.native == native
        g = torch.Generator().manual_seed(1)
        for t in range(steps):
            toks = torch.randint(0, V, (B, 1), generator=g)   # not argmax: every step sees new tokens
            S = L + t + 1
            m = full[:, :S] if padded else None
            ref, _ = model(toks, kv_cache=ref_cache, logits_to_keep=1, **({"attn_mask": m} if padded else {}))
            got = dec.step(toks, cache, m)
            assert got.shape == (B, V) and cache.pos == ref_cache.pos == S
            torch.testing.assert_close(got, ref[:, -1], **TOL)
        torch.testing.assert_close(cache.k, ref_cache.k, **TOL)
        torch.testing.assert_close(cache.v, ref_cache.v, **TOL)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_explicit_position_ids_and_a_full_cache(native):
    model = llama()
    with torch.inference_mode():
        ref_cache, cache = model.new_kv_cache(1, 4), model.new_kv_cache(1, 4)
        model(torch.tensor([[1, 2, 3]]), kv_cache=ref_cache)
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
        pos = torch.tensor([[7]])                 # e.g. a caller that numbers positions itself
        ref, _ = model(torch.tensor([[4]]), kv_cache=ref_cache, position_ids=pos)
        got = FastDecoder(model, native=native).step(torch.tensor([[4]]), cache, position_ids=pos)
        torch.testing.assert_close(got, ref[:, -1], **TOL)
        with pytest.raises(ValueError, match="full"):
            FastDecoder(model, native=native).step(torch.tensor([[4]]), cache)


def test_native_step_at_larger_sizes_with_two_threads():
    """Head size 64, 12 query heads on 4 KV heads, 4 rows over ~100 cached slots: big enough that the C++ step
    splits attention and SiLU across threads (2 here); still the module path's logits."""
    model = llama(n_layer=2, n_head=12, n_kv_heads=4, d_model=768, max_seq_len=256, init_std=0.02)
    ids, mask = left_padded([90, 97, 60, 75], model.config.vocab_size, seed=3)
    B, L = ids.shape
    full = torch.cat([mask, torch.ones(B, 4, dtype=torch.bool)], dim=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            ref_cache, cache = model.new_kv_cache(B, L + 4), model.new_kv_cache(B, L + 4)
            model(ids, kv_cache=ref_cache, attn_mask=mask)
            model(ids, kv_cache=cache, attn_mask=mask)
            dec = FastDecoder(model, native=True)
            for t in range(4):
                toks = torch.randint(0, model.config.vocab_size, (B, 1))
                m = full[:, :L + t + 1]
                ref, _ = model(toks, kv_cache=ref_cache, logits_to_keep=1, attn_mask=m)
                torch.testing.assert_close(dec.step(toks, cache, m), ref[:, -1], **TOL)
    finally:
        torch.set_num_threads(threads)


def test_native_step_runs_on_every_thread_torch_has():
    """at::parallel_for is an inline template: compiled without OpenMP it runs serially without a word (the
    native step once used one core of two). The module must fan out to torch's thread count."""
    from lmforge.infer import native
    ext = native.load()
    if ext is None:
        pytest.skip(native.why_not())
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert ext.parallel_width() == n
    finally:
        torch.set_num_threads(threads)


def test_the_build_name_is_stable_across_builds():
    """torch appends to the flag lists it is given; the cache name (which hashes the flags) must not move."""
    from lmforge.infer import native
    name = native.module_name()
    native.load()
    assert native.module_name() == name


def test_native_step_rejects_a_cache_of_the_wrong_shape():
    model = llama()
    with torch.inference_mode():
        dec = FastDecoder(model, native=True)
        cache = model.new_kv_cache(2, 8)
        with pytest.raises(RuntimeError, match="KV cache"):
            dec.step(torch.tensor([[1]]), cache)           # 1 token for a 2-row cache


def test_native_off_switch(monkeypatch):
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    model = llama()
    with torch.inference_mode():
        assert not FastDecoder(model).native
        with pytest.raises(RuntimeError, match="LMFORGE_NATIVE"):
            FastDecoder(model, native=True)


def count_steps(monkeypatch) -> list[int]:
    calls = []
    orig = FastDecoder.step

    def step(self, tokens, *a, **kw):
        calls.append(tokens.size(0))
        return orig(self, tokens, *a, **kw)
    monkeypatch.setattr(FastDecoder, "step", step)
    return calls


@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "torch"])
@pytest.mark.parametrize("tie", [True, False])
def test_engine_greedy_is_the_same_with_and_without_the_fast_path(tok, monkeypatch, tie, native):
    monkeypatch.setenv("LMFORGE_NATIVE", native)
    model = llama(vocab_size=tok.vocab_size + 5, tie_embeddings=tie)
    # different prompt lengths (padding masks), n=2 (fan-out), rows ending at different steps (the batch shrinks)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, n=n) for m, n in ((12, 1), (5, 2),
                                                                                              (20, 1), (9, 2))]
    slow = Engine(model, tok, fast_path=False).generate(PROMPTS, params)
    calls = count_steps(monkeypatch)
    fast = Engine(model, tok).generate(PROMPTS, params)
    assert calls and max(calls) == 6 and min(calls) == 1          # the fast path really ran, on a shrinking batch
    assert [[c.token_ids for c in r] for r in fast] == [[c.token_ids for c in r] for r in slow]
    assert [[c.text for c in r] for r in fast] == [[c.text for c in r] for r in slow]


def test_weight_updates_are_picked_up(tok):
    """An optimizer step between two runs of the same engine: the second run decodes with the new weights."""
    model = llama(vocab_size=tok.vocab_size + 5)
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    engine, slow = Engine(model, tok), Engine(model, tok, fast_path=False)
    before = engine.generate(PROMPTS, params)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    opt.step()
    model.eval()
    after, ref = engine.generate(PROMPTS, params), slow.generate(PROMPTS, params)
    assert [r[0].token_ids for r in after] == [r[0].token_ids for r in ref]
    assert [r[0].token_ids for r in after] != [r[0].token_ids for r in before]


def test_unsupported_models_stay_on_the_module_path(tok, monkeypatch):
    gpt2 = dict(pos="learned", norm="layernorm", ffn="gelu", bias=True, tie_embeddings=True)
    assert supports(llama().config) and not supports(llama(**gpt2).config)
    assert not supports(llama(qk_norm=True).config) and not supports(llama(qkv_bias=True).config)
    assert not supports(llama(ffn="relu2").config)
    model = llama(vocab_size=tok.vocab_size + 5)
    assert usable(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not usable(model)                 # bf16 autocast: the module path (its matmul precision)
    assert not usable(llama().to(torch.bfloat16))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    calls = count_steps(monkeypatch)
    g = llama(vocab_size=tok.vocab_size + 5, **gpt2)
    assert not usable(g)
    res = Engine(g, tok).generate(PROMPTS[:2], params)
    assert calls == [] and all(len(r[0].token_ids) == 4 for r in res)
    Engine(model, tok, precision="bf16").generate(PROMPTS[:2], params)
    assert calls == []
    with pytest.raises(ValueError, match="RoPE"):
        FastDecoder(g)
    assert fastpath.__all__ == ["FastDecoder", "supports", "usable"]


def test_native_argmax_is_torch_argmax():
    """The greedy pick the engine uses with the C++ step: torch.argmax's answer, ties (first), a NaN (taken as
    the maximum), a vocabulary cut below the logits width, strided rows."""
    model = llama()
    with torch.inference_mode():
        dec = FastDecoder(model, native=True)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 300, generator=g)
        x[1, 7] = x[1, 250] = 50.0                 # a tie: the first one
        x[2, 40] = float("nan")                    # NaN wins, as in torch
        x[3, 299] = 99.0                           # beyond the vocabulary cut below
        x[4, 0] = 99.0
        for vocab in (300, 290, 1):
            assert dec.argmax(x, vocab).tolist() == x[:, :vocab].argmax(-1).tolist()
        wide = torch.randn(3, 600, generator=g)[:, ::1][:, :300]   # rows with stride 600
        assert dec.argmax(wide, 300).tolist() == wide.argmax(-1).tolist()


def _native_build_dir():
    from torch.utils import cpp_extension

    from lmforge.infer import native
    if not cpp_extension.is_ninja_available() or native.build_dir() is None:
        pytest.skip("no native build here (ninja / torch's build directory)")
    return native, native.build_dir()


def _within(seconds: int):
    """Fail instead of hanging (the bug: waiting forever on a lock)."""
    import signal

    def boom(*_):
        raise TimeoutError(f"still waiting after {seconds} s")
    signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)


def test_a_build_lock_of_a_dead_builder_is_cleared(capfd):
    """A build killed mid-compile leaves torch's lock file (and our lock.pid naming it); the next build must
    clear it rather than wait forever."""
    import signal
    import subprocess
    import sys

    native, d = _native_build_dir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                         # reaped: its pid names no process now
    d.mkdir(parents=True, exist_ok=True)
    (d / "lock").write_text("")
    (d / "lock.pid").write_text(str(dead.pid))
    try:
        _within(240)
        ext, why = native.build()
    finally:
        signal.alarm(0)
        for f in ("lock", "lock.pid"):
            (d / f).unlink(missing_ok=True)
    assert ext is not None and why is None, why
    assert not (d / "lock").exists() and not (d / "lock.pid").exists()   # released after the build


def test_a_build_lock_held_too_long_falls_back(capfd):
    """A live holder (here: this very process) that keeps the lock past the timeout: one line, no native step."""
    import os
    import signal

    native, d = _native_build_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "lock.pid").write_text(str(os.getpid()))
    try:
        _within(60)
        ext, why = native.build(lock_timeout=0.3)
    finally:
        signal.alarm(0)
        (d / "lock.pid").unlink(missing_ok=True)
    err = capfd.readouterr().err.strip().splitlines()
    assert ext is None and f"locked by process {os.getpid()}" in why
    assert len(err) == 1 and err[0].startswith("lmforge: native decode step unavailable") and "PyTorch" in err[0]


def test_the_build_cache_is_per_python_environment(monkeypatch):
    import sys

    from lmforge.infer import native
    name = native.module_name()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other-venv")
    assert native.module_name() != name


def test_the_build_lock_is_taken_and_released(tmp_path):
    import os

    from lmforge.infer import native
    (tmp_path / "lock").write_text("")                 # torch's lock, with no lmforge holder: stale
    assert native.acquire_build_lock(tmp_path, timeout=1) is None
    assert (tmp_path / "lock.pid").read_text() == str(os.getpid()) and not (tmp_path / "lock").exists()
    assert "locked by process" in native.acquire_build_lock(tmp_path, timeout=0.1)   # held: by us, alive
    native.release_build_lock(tmp_path)
    assert not (tmp_path / "lock.pid").exists()


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_extend_matches_the_module_path(n_kv_heads):
    """A T-token native pass (the speculative verify) gives the model's logits at every position and the same
    cache, causal among the new tokens; and it equals T single steps."""
    model = llama(n_kv_heads=n_kv_heads)
    dec = FastDecoder(model)
    if not dec.native:
        pytest.skip(f"native step unavailable: {fastpath.native.why_not() if hasattr(fastpath, 'native') else ''}")
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompt, new = torch.randint(0, V, (2, 7), generator=g), torch.randint(0, V, (2, 5), generator=g)
    with torch.inference_mode():
        ref_cache = model.new_kv_cache(2, 16)
        model(prompt, kv_cache=ref_cache, logits_to_keep=1)
        cache = model.new_kv_cache(2, 16)
        cache.k.copy_(ref_cache.k), cache.v.copy_(ref_cache.v)
        cache.pos = ref_cache.pos
        ref, _ = model(new, kv_cache=ref_cache)
        got = dec.extend(new, cache)
        assert got.shape == (2, 5, V) and cache.pos == ref_cache.pos == 12
        torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(cache.k[..., :12, :], ref_cache.k[..., :12, :], **TOL)
        cache.pos = 7                                    # roll back (as a rejected proposal does) and step one by one
        for t in range(5):
            torch.testing.assert_close(dec.step(new[:, t:t + 1], cache), got[:, t], **TOL)
