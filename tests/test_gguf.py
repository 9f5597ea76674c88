"""GGUF export: our Q8_0 / Q4_0 blocks byte-identical to gguf.quants.quantize; GGUFReader round trip of the
metadata (llama architecture, byte-level BPE vocabulary, merges, token types, special ids, chat template) and of
the (dequantized) tensors; the Q/K row permutation checked against a llama.cpp-style RoPE (adjacent pairs);
a model rebuilt from the file gives our logits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.interop.gguf import export_gguf, quantize_q4_0, quantize_q8_0
from lmforge.model import ModelConfig, Transformer
from lmforge.model.transformer import apply_rope, rope_cos_sin, rope_inv_freq
from lmforge.tokenizer.tokenizer import Tokenizer, bytes_to_unicode
from lmforge.checkpoint import save as save_checkpoint
from test_tokenizer import reference

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

T = gguf.GGMLQuantizationType


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# quantizers vs the reference

def hard_values(rows=48, cols=256, seed=0) -> np.ndarray:
    """Gaussian rows at scales from 1e-4 to 1e3, plus blocks made to hit the edge cases: all zero, exact ties of
    the largest magnitude with both signs, values that land exactly on .5 after scaling, one outlier."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-4, 3, (rows, 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = 2.0
    x[1, [3, 9]] = -2.0                                     # Q4_0 takes the first largest magnitude, with its sign
    x[2, :32] = (np.arange(32, dtype=np.float32) - 16) * np.float32(127 / 16) / 127 * 0.5  # halves for Q8_0
    x[3, :32] = np.linspace(-1, 1, 32, dtype=np.float32)
    x[4, 40] = 1e4                                          # one outlier flattens its block
    x[5, :32] = -np.float32(1e-30)                          # tiny (subnormal scale in fp16)
    return x


@pytest.mark.parametrize("ours, qtype", [(quantize_q8_0, T.Q8_0), (quantize_q4_0, T.Q4_0)], ids=["q8_0", "q4_0"])
def test_quantizers_byte_identical_to_gguf(ours, qtype):
    for seed in range(3):
        x = hard_values(seed=seed)
        got, ref = ours(x), quantize(x, qtype)
        assert got.dtype == np.uint8 and got.shape == ref.shape
        assert np.array_equal(got, ref)
    x = hard_values()
    back = dequantize(ours(x), qtype)
    scale = np.abs(x.reshape(-1, 32)).max(1, keepdims=True)
    err = np.abs(back.reshape(-1, 32) - x.reshape(-1, 32))
    # Q8_0 rounds to 1/254 of the block's range, Q4_0 to 1/16 (plus the fp16 scale's rounding), where the scale
    # is a normal fp16 number (tiny blocks lose precision in the format itself)
    bound = {T.Q8_0: 0.5 / 127 + 2e-3, T.Q4_0: 1 / 8 + 2e-3}[qtype]
    normal = scale[:, 0] >= 0.01
    assert normal.sum() > 200 and (err[normal] <= bound * scale[normal]).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        ours(np.zeros((2, 40), np.float32))


# ---------------------------------------------------------------------------------------------------------------
# export + GGUFReader round trip

def field(reader, key):
    return reader.fields[key].contents()


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of the export's Q/K permutation: pairs order back to halves order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_checkpoint(tmp_path, **kw):
    base = reference()[1]  # a BPE trained on pydoc text + many scripts: our id layout, 16 specials
    tok = Tokenizer(base.merges, base.pattern)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    cfg = ModelConfig(**{**dict(vocab_size=tok.vocab_size + 8, n_layer=2, n_head=4, n_kv_heads=2, d_model=64,
                                d_ff=144, max_seq_len=128, rope_theta=50000.0, tie_embeddings=False, init_std=0.1,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
                         **kw})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for p in model.parameters():
        if p.dim() == 1:
            p.data.normal_(1.0 if p.data.eq(1).all() else 0.0, 0.1)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, model_config=cfg.to_dict(), tokenizer=tok)
    return ckpt, model, tok, cfg


def model_from_gguf(reader, cfg) -> Transformer:
    """Our Transformer from a GGUF file: dequantize, undo the Q/K permutation, rename."""
    names = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
                 "attn_output": "attn.o_proj", "ffn_norm": "ffn_norm", "ffn_gate": "ffn.gate_proj",
                 "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        if t.name.startswith("blk."):
            _, i, kind, suffix = t.name.split(".")
            if kind in ("attn_q", "attn_k"):
                w = unpermute(w, cfg.n_head if kind == "attn_q" else cfg.n_kv_heads)
            state[f"blocks.{i}.{per_layer[kind]}.{suffix}"] = torch.from_numpy(w.copy())
        else:
            state[names[t.name]] = torch.from_numpy(w.copy())
    model = Transformer(cfg).eval()
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_export_reader_roundtrip(qtype, tmp_path):
    ckpt, model, tok, cfg = make_checkpoint(tmp_path)
    out = export_gguf(ckpt, tmp_path / "m.gguf", qtype, progress=False)
    r = gguf.GGUFReader(str(out))

    # metadata: architecture and sizes
    assert field(r, "general.architecture") == "llama"
    for key, want in (("llama.block_count", 2), ("llama.context_length", 128), ("llama.embedding_length", 64),
                      ("llama.feed_forward_length", 144), ("llama.attention.head_count", 4),
                      ("llama.attention.head_count_kv", 2), ("llama.rope.dimension_count", 16),
                      ("llama.vocab_size", cfg.vocab_size)):
        assert field(r, key) == want, key
    assert field(r, "llama.rope.freq_base") == 50000.0
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[qtype]

    # the vocabulary: GPT-2 byte alphabet, specials CONTROL, model padding UNUSED, merges in order, ids, template
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "llama-bpe"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    b2u = bytes_to_unicode()
    for i in range(tok.vocab_size):
        if tok.is_special(i):
            assert (tokens[i], types[i]) == (tok.token_str(i), gguf.TokenType.CONTROL)
        else:
            assert (tokens[i], types[i]) == ("".join(b2u[b] for b in tok.id_to_bytes(i)), gguf.TokenType.NORMAL)
    assert tokens[32] == "Ġ" and tokens[tok.bos_id] == "<|bos|>"
    assert set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED}
    merges = field(r, "tokenizer.ggml.merges")
    assert len(merges) == tok.n_merges
    assert all(m == f"{tokens[a]} {tokens[b]}" for m, (a, b) in zip(merges, tok.merges))
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id"),
            field(r, "tokenizer.ggml.padding_token_id")) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.chat_template") == tok.chat_template

    # tensors: the types asked for, bytes equal to the reference quantizer, values back after dequantization
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 1 + 2 + 9 * 2 + 1  # rope_freqs, token_embd + output(+norm), 9 per block
    sd = model.state_dict()
    for name, ours, heads in [("token_embd.weight", "tok_emb.weight", None), ("output.weight", "lm_head.weight", None),
                              ("blk.1.attn_q.weight", "blocks.1.attn.q_proj.weight", 4),
                              ("blk.0.attn_k.weight", "blocks.0.attn.k_proj.weight", 2),
                              ("blk.1.ffn_down.weight", "blocks.1.ffn.down_proj.weight", None),
                              ("blk.0.attn_norm.weight", "blocks.0.attn_norm.weight", None)]:
        t = tensors[name]
        want = sd[ours].numpy()
        assert tuple(int(n) for n in reversed(t.shape)) == want.shape
        if want.ndim == 1:
            assert t.tensor_type == T.F32 and np.array_equal(t.data, want)
            continue
        from lmforge.interop.gguf import permute_for_llama_cpp
        src = permute_for_llama_cpp(sd[ours], heads).numpy() if heads else want
        expect_type = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
        if name == "blk.1.ffn_down.weight" and qtype.startswith("q"):
            expect_type = T.F16  # rows of d_ff=144 values: not a multiple of 32 -> f16, as llama.cpp's converter
        assert t.tensor_type == expect_type, name
        if expect_type in (T.Q8_0, T.Q4_0):
            assert np.array_equal(np.asarray(t.data).reshape(-1), quantize(src, expect_type).reshape(-1)), name
        back = dequantize(t.data, t.tensor_type).reshape(want.shape)
        if heads:
            back = unpermute(back, heads)
        tol = {"f32": 0, "f16": 1e-3, "q8_0": 1e-2, "q4_0": 0.15}[qtype] * np.abs(want).max()
        assert np.abs(back - want).max() <= tol, name
    freqs = tensors["rope_freqs.weight"]
    plain, scaled = rope_inv_freq(16, 50000.0), rope_inv_freq(16, 50000.0, cfg.rope_scaling)
    assert np.allclose(freqs.data, (plain / scaled).numpy(), rtol=1e-6)
    assert freqs.data.min() == pytest.approx(1.0) and freqs.data.max() == pytest.approx(8.0)  # all three bands

    # the whole model back from the file: same logits (exactly for f32)
    back = model_from_gguf(r, cfg)
    idx = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        ref, got = model(idx)[0], back(idx)[0]
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"\n{qtype}: max |logits(from gguf) - logits| / max |logits| = {rel:.2e}, "
          f"file {out.stat().st_size / 1e3:.0f} kB")
    assert rel <= {"f32": 0.0, "f16": 2e-3, "q8_0": 4e-2, "q4_0": 0.5}[qtype]


def llama_cpp_rope(x: torch.Tensor, pos: torch.Tensor, base: float, factors: np.ndarray) -> torch.Tensor:
    """RoPE as llama.cpp applies it for the llama architecture: channel pairs (2i, 2i+1) rotated by angle
    pos * base^(-2i/d) / factor_i."""
    d = x.shape[-1]
    theta = pos[:, None].double() * (base ** (-torch.arange(0, d, 2).double() / d)) / torch.from_numpy(factors).double()
    cos, sin = theta.cos().float(), theta.sin().float()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def test_qk_permutation_gives_llama_cpp_the_same_attention_scores(tmp_path):
    """With the permuted rows, llama.cpp's pairwise RoPE yields exactly the q.k scores our rotate_half RoPE yields
    (GQA: query head h reads key head h // 2). Without the permutation it does not."""
    ckpt, model, tok, cfg = make_checkpoint(tmp_path)
    r = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "m.gguf", "f32", progress=False)))
    tensors = {t.name: t for t in r.tensors}
    factors = np.array(tensors["rope_freqs.weight"].data)
    hd, T_ = cfg.head_dim, 40
    x = torch.randn(T_, cfg.d_model)
    pos = torch.arange(T_)
    attn = model.blocks[0].attn
    with torch.no_grad():
        q = attn.q_proj(x).view(T_, cfg.n_head, hd).transpose(0, 1)[None]       # (1, H, T, hd)
        k = attn.k_proj(x).view(T_, cfg.n_kv_heads, hd).transpose(0, 1)[None]
        cos, sin = rope_cos_sin(pos[None], rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling))
        ours = apply_rope(q, cos, sin)[0] @ apply_rope(k, cos, sin)[0].repeat_interleave(2, 0).transpose(1, 2)
        for wq, wk in ((torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data)),
                        torch.from_numpy(np.array(tensors["blk.0.attn_k.weight"].data))),
                       (attn.q_proj.weight, attn.k_proj.weight)):
            qc = llama_cpp_rope((x @ wq.T).view(T_, cfg.n_head, hd).transpose(0, 1), pos, cfg.rope_theta, factors)
            kc = llama_cpp_rope((x @ wk.T).view(T_, cfg.n_kv_heads, hd).transpose(0, 1), pos, cfg.rope_theta, factors)
            theirs = qc @ kc.repeat_interleave(2, 0).transpose(1, 2)
            if wq is attn.q_proj.weight:  # unpermuted weights: llama.cpp would compute something else
                assert (theirs - ours).abs().max() > 0.1 * ours.abs().max()
            else:
                assert (theirs - ours).abs().max() <= 1e-4 * ours.abs().max()
    assert math.isclose(float(field(r, "llama.rope.freq_base")), cfg.rope_theta)


def test_qkv_bias_and_tied_export(tmp_path):
    """Q/K biases are permuted like their rows; a tied head is written once (llama.cpp reuses token_embd)."""
    ckpt, model, tok, cfg = make_checkpoint(tmp_path, qkv_bias=True, tie_embeddings=True, d_ff=192, rope_scaling=None)
    r = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "m.gguf", "f32", progress=False)))
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "rope_freqs.weight" not in names
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    back = model_from_gguf(r, cfg)
    assert torch.equal(back.blocks[0].attn.q_proj.bias, model.blocks[0].attn.q_proj.bias)
    assert torch.equal(back.blocks[1].attn.k_proj.bias, model.blocks[1].attn.k_proj.bias)
    idx = torch.randint(0, tok.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])  # permuting and un-permuting is exact


@pytest.mark.parametrize("kw, field_name", [
    (dict(pos="learned", norm="layernorm", ffn="gelu", bias=True), "pos"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(ffn="relu2"), "ffn"),
])
def test_export_refuses_what_llama_cannot_run(kw, field_name, tmp_path, capsys):
    ckpt, *_ = make_checkpoint(tmp_path, **kw)
    with pytest.raises(ConfigError) as e:
        export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    assert e.value.field == field_name
    capsys.readouterr()
    assert main(["export", "gguf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field_name in err and not (tmp_path / "m.gguf").exists()


def test_export_refuses_unknown_split_regex_and_cli_writes(tmp_path, capsys):
    ckpt, *_ = make_checkpoint(tmp_path)
    assert main(["export", "gguf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ok.gguf"),
                 "--type", "q4_0"]) == 0
    assert "q4_0" in capsys.readouterr().out and (tmp_path / "ok.gguf").is_file()
    tok = Tokenizer([], r"\w+|\s+")
    tok.save(ckpt / "tokenizer")
    with pytest.raises(ConfigError, match="pre-tokenizer.*llama-bpe"):
        export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.tmp").exists()


def test_a_model_trained_here_exports_lmforge_chat_template(tmp_path):
    """No template of its own + lmforge's chat tokens: the GGUF carries our template as Jinja (the one the HF
    export writes, which transformers renders to our ids)."""
    from lmforge.tokenizer.chat import LMFORGE_CHAT_TEMPLATE
    ckpt, model, tok, cfg = make_checkpoint(tmp_path)
    tok.chat_template = None
    tok.save(ckpt / "tokenizer")
    r = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "m.gguf", "f32", progress=False)))
    assert field(r, "tokenizer.chat_template") == LMFORGE_CHAT_TEMPLATE
