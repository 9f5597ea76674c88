"""The decoder-only Transformer: config, shapes, causality, KV cache, padding, and logits parity with
Hugging Face GPT-2 / Llama / Qwen2 / Qwen3 / Mistral built from small random configs (nothing downloaded)."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.interop.hf import config_from_hf, state_from_hf
from lmforge.model import PRESETS, KVCache, ModelConfig, Transformer, get_preset
from lmforge.model.config import default_d_ff


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def model_for(cfg, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


# ---------------------------------------------------------------------------------------------------------------
# config

def test_config_derives_sizes():
    c = ModelConfig(d_model=768, n_head=12, ffn="swiglu")
    assert (c.n_kv_heads, c.head_dim, c.d_ff) == (12, 64, 2048)  # Llama rule: 8/3 * 768 = 2048
    assert ModelConfig(d_model=384, n_head=6, ffn="swiglu").d_ff == 1024
    assert ModelConfig(d_model=512, n_head=8, ffn="swiglu").d_ff == 1408  # 1365 rounded up to a multiple of 64
    assert ModelConfig(d_model=512, n_head=8, ffn="swiglu", multiple_of=256).d_ff == 1536
    assert ModelConfig(d_model=96, n_head=4, ffn="gelu").d_ff == 384
    assert default_d_ff(100, "relu2") == 400
    assert ModelConfig(d_model=32, n_head=4, head_dim=16).head_dim == 16


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=30, n_head=4), "d_model"),
    (dict(n_head=4, n_kv_heads=3), "n_kv_heads"),
    (dict(n_head=4, n_kv_heads=8), "n_kv_heads"),
    (dict(pos="alibi"), "pos"),
    (dict(norm="batchnorm"), "norm"),
    (dict(ffn="geglu"), "ffn"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(d_ff=0), "d_ff"),
    (dict(dropout=1.0), "dropout"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(d_model=36, n_head=4, pos="rope"), "head_dim"),  # head_dim 9 is odd
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling.rope_type"),
    (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling.factor"),
])
def test_config_validation_names_field(kw, field):
    base = dict(vocab_size=61, n_layer=2, n_head=4, d_model=32)
    base.update(kw)
    with pytest.raises(ConfigError) as e:
        ModelConfig(**base)
    assert e.value.field == field
    assert "\n" not in str(e.value)


def test_config_roundtrip_json_and_unknown_keys():
    c = get_preset("llama", vocab_size=1000, n_layer=2)
    d = json.loads(json.dumps(c.to_dict()))
    assert ModelConfig.from_dict(d) == c
    assert d["d_ff"] == 8192 and d["n_kv_heads"] == 8 and d["rope_scaling"]["rope_type"] == "llama3"
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({**d, "n_heads": 4})
    assert e.value.field == "n_heads" and "n_head" in str(e.value)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({**d, "n_layer": "many"})
    assert e.value.field == "n_layer"


def test_presets():
    with pytest.raises(ConfigError) as e:
        get_preset("gpt5")
    assert all(name in str(e.value) for name in PRESETS)
    # changing the shape derives d_ff again instead of keeping the preset's
    assert get_preset("llama", d_model=256, n_head=4, n_kv_heads=2).d_ff == 704
    assert get_preset("tiny", vocab_size=300).vocab_size == 300
    sizes = {}
    for name in PRESETS:
        with torch.device("meta"):  # shapes only, no memory
            sizes[name] = Transformer(get_preset(name)).num_params()
    # published parameter counts of the checkpoints these presets mirror
    assert sizes["gpt2"]["total"] == 124_439_808
    assert sizes["gpt2-medium"]["total"] == 354_823_168
    assert sizes["llama"]["total"] == 1_235_814_400          # Llama-3.2-1B
    assert sizes["tinyllama"]["total"] == 1_100_048_384      # TinyLlama-1.1B
    assert sizes["qwen2-0.5b"]["total"] == 494_032_768       # Qwen2-0.5B
    assert 0.7e6 < sizes["tiny"]["total"] < 1.5e6
    assert 5e6 <= sizes["cpu-small"]["non_embedding"] <= 10e6
    assert 20e6 <= sizes["cpu-base"]["non_embedding"] <= 30e6
    assert 120e6 < sizes["gpu-124m"]["total"] < 130e6


# ---------------------------------------------------------------------------------------------------------------
# forward, loss, causality

def test_shapes_and_loss():
    cfg = tiny()
    m = model_for(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 11))
    tgt = torch.randint(0, cfg.vocab_size, (3, 11))
    logits, loss = m(idx)
    assert logits.shape == (3, 11, cfg.vocab_size) and loss is None
    logits, loss = m(idx, tgt)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1))
    assert loss.shape == () and torch.allclose(loss, ref, atol=1e-6)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.3  # small init: near-uniform predictions
    # ignore_index=-1, loss_mask and reductions
    tgt2 = tgt.clone()
    tgt2[:, :4] = -1
    _, l_ign = m(idx, tgt2)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, cfg.vocab_size), tgt[:, 4:].reshape(-1))
    assert torch.allclose(l_ign, ref, atol=1e-6)
    mask = torch.zeros(3, 11)
    mask[:, 4:] = 1
    _, l_mask = m(idx, tgt, loss_mask=mask)
    assert torch.allclose(l_mask, ref, atol=1e-6)
    _, per_tok = m(idx, tgt2, reduction="none")
    assert per_tok.shape == (3, 11) and (per_tok[:, :4] == 0).all()
    _, l_sum = m(idx, tgt2, reduction="sum")
    assert torch.allclose(l_sum, per_tok.sum()) and torch.allclose(l_sum / (3 * 7), l_ign, atol=1e-6)
    # only the last position's logits, for inference
    last, _ = m(idx, logits_to_keep=1)
    assert last.shape == (3, 1, cfg.vocab_size) and torch.allclose(last[:, 0], logits[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "none"])
def test_causal(pos):
    cfg = tiny(pos=pos)
    m = model_for(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    a, _ = m(idx)
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % cfg.vocab_size
    b, _ = m(idx2)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)       # the past does not see the future
    assert (a[:, 7:] - b[:, 7:]).abs().amax(-1).min() > 1e-5  # ... while every later position does see it


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_heads):
    cfg = tiny(n_kv_heads=n_kv_heads)
    m = model_for(cfg)
    assert m.blocks[0].attn.k_proj.weight.shape == (n_kv_heads * cfg.head_dim, cfg.d_model)
    mha = Transformer(tiny(n_kv_heads=4)).eval()
    groups = 4 // n_kv_heads
    sd = {}
    for k, v in m.state_dict().items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # query head h reads kv head h // groups
            v = v.view(n_kv_heads, cfg.head_dim, -1).repeat_interleave(groups, 0).reshape(-1, cfg.d_model)
        sd[k] = v
    mha.load_state_dict(sd)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.allclose(m(idx)[0], mha(idx)[0], atol=1e-5)
    _, _, att = m(idx, return_attn=True)
    assert att[0].shape == (2, 4, 9, 9)


def _combos():
    for i, (pos, norm, ffn, qk_norm) in enumerate(itertools.product(
            ["learned", "sinusoidal", "rope", "none"], ["layernorm", "rmsnorm"],
            ["gelu", "relu", "relu2", "swiglu"], [False, True])):
        # the remaining switches vary with the index so each value meets every other option somewhere
        yield dict(pos=pos, norm=norm, ffn=ffn, qk_norm=qk_norm, bias=i % 2 == 0, qkv_bias=i % 3 == 0,
                   tie_embeddings=i % 4 < 2, n_kv_heads=[4, 2, 1][i % 3], gelu_approx=["none", "tanh"][i % 2],
                   final_norm=i % 5 != 0, head_dim=[None, 12][i % 2])


def test_every_option_combination_runs():
    idx = torch.randint(0, 61, (2, 7))
    for kw in _combos():
        cfg = tiny(n_layer=1, d_model=16, **kw)
        m = model_for(cfg)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        logits, loss = m(idx, idx)
        assert logits.shape == (2, 7, 61) and torch.isfinite(loss), kw
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters()), kw
        # incremental decoding agrees with the full forward for every combination
        with torch.no_grad():
            cache = m.new_kv_cache(2, 16)
            inc = torch.cat([m(idx[:, :3], kv_cache=cache)[0]] +
                            [m(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(3, 7)], 1)
        assert torch.allclose(inc, logits, atol=1e-5), kw
        assert (m.lm_head.weight is m.tok_emb.weight) == cfg.tie_embeddings


# ---------------------------------------------------------------------------------------------------------------
# KV cache and padding

@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "none"])
def test_kv_cache_matches_full_forward(pos):
    cfg = tiny(pos=pos, n_layer=3)
    m = model_for(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = m(idx)
        for chunks in ([5] + [1] * 15, [3, 4, 6, 7], [20]):
            cache = KVCache(2, 32, cfg.n_layer, cfg.n_kv_heads, cfg.head_dim, torch.float32, "cpu")
            outs, t = [], 0
            for n in chunks:
                outs.append(m(idx[:, t:t + n], kv_cache=cache)[0])
                t += n
            assert cache.pos == 20
            assert (torch.cat(outs, 1) - full).abs().max() < 1e-5
        # rewinding the cache pointer and decoding again gives the same logits (speculative decoding needs it)
        cache.pos = 12
        again, _ = m(idx[:, 12:13], kv_cache=cache)
        assert (again[:, 0] - full[:, 12]).abs().max() < 1e-5
        with pytest.raises(ValueError, match="full"):
            m(idx, kv_cache=KVCache(2, 8, cfg.n_layer, cfg.n_kv_heads, cfg.head_dim))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_batched_padded_decoding_matches_single_sequences(side, pos):
    cfg = tiny(pos=pos)
    m = model_for(cfg)
    lengths, new = [7, 3, 5], 4
    prompts = [torch.randint(1, cfg.vocab_size, (n,)) for n in lengths]
    cont = torch.randint(1, cfg.vocab_size, (3, new))
    L = max(lengths)
    idx = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        idx[i, sl], mask[i, sl] = p, 1
    with torch.no_grad():
        cache = m.new_kv_cache(3, 16)
        pre, _ = m(idx, attn_mask=mask, kv_cache=cache)  # positions are derived from the mask
        steps = []
        for t in range(new):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            steps.append(m(cont[:, t:t + 1], attn_mask=mask, kv_cache=cache)[0][:, 0])
        for i, p in enumerate(prompts):
            ref, _ = m(torch.cat([p, cont[i]])[None])
            got_prompt = pre[i, L - len(p):] if side == "left" else pre[i, :len(p)]
            assert (got_prompt - ref[0, :len(p)]).abs().max() < 1e-5
            assert (torch.stack([s[i] for s in steps]) - ref[0, len(p):]).abs().max() < 1e-5


def test_padded_batch_without_cache_and_explicit_position_ids():
    cfg = tiny()
    m = model_for(cfg)
    a, b = torch.randint(1, 61, (6,)), torch.randint(1, 61, (3,))
    idx = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    pos_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]])
    with torch.no_grad():
        out, _ = m(idx, attn_mask=mask, position_ids=pos_ids)
        assert torch.isfinite(out).all()  # padding rows must not turn into NaN
        assert (out[0] - m(a[None])[0][0]).abs().max() < 1e-5
        assert (out[1, 3:] - m(b[None])[0][0]).abs().max() < 1e-5
        explicit, _, att = m(idx, attn_mask=mask, position_ids=pos_ids, return_attn=True)
        assert (att[1][1, :, 3:, :3] == 0).all()  # real tokens give no weight to padding
        assert torch.isfinite(explicit).all() and torch.allclose(explicit[1, 3:], out[1, 3:], atol=1e-5)


def test_return_attn_weights():
    cfg = tiny(n_layer=2)
    m = model_for(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        plain, _ = m(idx)
        logits, _, att = m(idx, return_attn=True)
        assert len(att) == cfg.n_layer and att[0].shape == (2, cfg.n_head, 8, 8)
        assert torch.allclose(logits, plain, atol=1e-5)
        assert torch.allclose(att[1].sum(-1), torch.ones(2, cfg.n_head, 8), atol=1e-5)
        lower = torch.ones(8, 8, dtype=torch.bool).tril()
        assert (att[0][..., ~lower] == 0).all() and (att[0][..., lower] > 0).all()
        # with a cache: the new token's weights cover every cached key
        cache = m.new_kv_cache(2, 16)
        m(idx[:, :5], kv_cache=cache)
        _, _, att2 = m(idx[:, 5:6], kv_cache=cache, return_attn=True)
        assert att2[0].shape == (2, cfg.n_head, 1, 6)
        assert torch.allclose(att2[0][:, :, 0], att[0][:, :, 5, :6], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# training-side helpers

def test_learns_a_repeated_sequence():
    torch.manual_seed(0)
    cfg = tiny(n_layer=2, d_model=64, max_seq_len=32)
    m = Transformer(cfg)
    seq = torch.randint(0, cfg.vocab_size, (1, 17)).repeat(4, 1)
    opt = torch.optim.AdamW(m.param_groups(0.1), lr=3e-3)
    losses = []
    for _ in range(50):
        _, loss = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.2 * losses[0]


def test_param_counts_exact():
    # hand count for d=32, L=2, H=4, kv=2 (hd 8), swiglu d_ff=96, rmsnorm, untied, learned positions, qkv bias
    cfg = tiny(pos="learned", tie_embeddings=False, qkv_bias=True)
    assert cfg.d_ff == 128  # int(8/3*32)=85 -> 128 (multiple of 64)
    d, V, f, kv = 32, 61, 128, 2 * 8
    attn = d * d + 2 * d * kv + d * d + (d + 2 * kv)   # q, k, v, o + q/k/v biases
    ffn = 3 * d * f
    block = attn + ffn + 2 * d                          # + two RMSNorm weights
    emb = V * d + 64 * d                                # tokens + learned positions
    total = emb + 2 * block + d + V * d                 # + final norm + untied head
    m = Transformer(cfg)
    assert m.num_params() == {"total": total, "embedding": emb, "non_embedding": total - emb}
    tied = Transformer(tiny(pos="learned", qkv_bias=True)).num_params()
    assert tied["total"] == total - V * d  # the tied head is counted once
    # flops: 6 * (matmul weights incl. head) + 12 * L * H * hd * T
    n_mat = tied["non_embedding"] + V * d
    assert Transformer(tiny()).flops_per_token(50) == 6 * (Transformer(tiny()).num_params()["non_embedding"]
                                                           + V * d) + 12 * 2 * 4 * 8 * 50
    assert n_mat == total - emb  # same matmul count whether the head is tied or not


def test_param_groups_and_init():
    cfg = tiny(bias=True, n_layer=4, d_model=64, d_ff=256)
    m = Transformer(cfg)
    decay, no_decay = m.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) | ids(no_decay["params"]) == ids(m.parameters())
    assert not ids(decay["params"]) & ids(no_decay["params"])
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert id(m.tok_emb.weight) in ids(decay["params"])
    assert len(decay["params"]) == len(list(m.parameters())) - len(no_decay["params"])  # tied head once
    # init: N(0, 0.02), residual projections scaled by 1/sqrt(2L), zero biases
    resid = torch.cat([b.ffn.down_proj.weight.flatten() for b in m.blocks] +
                      [b.attn.o_proj.weight.flatten() for b in m.blocks])
    other = torch.cat([b.ffn.up_proj.weight.flatten() for b in m.blocks])
    assert abs(resid.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(other.std().item() - 0.02) < 0.001
    assert all((b.attn.q_proj.bias == 0).all() for b in m.blocks)
    # same seed, same weights
    torch.manual_seed(3)
    a = Transformer(cfg).state_dict()
    torch.manual_seed(3)
    b = Transformer(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_meta_build_then_load_state_dict(pos):
    # how a checkpoint loader avoids initialising weights it is about to overwrite
    cfg = tiny(pos=pos, rope_scaling={"rope_type": "linear", "factor": 2.0})
    src = model_for(cfg)
    with torch.device("meta"):
        dst = Transformer(cfg)
    dst.to_empty(device="cpu")
    dst.load_state_dict(src.state_dict())
    idx = torch.randint(0, 61, (2, 10))
    assert torch.equal(src(idx)[0], dst.eval()(idx)[0])


def test_dropout_only_in_training():
    m = model_for(tiny(dropout=0.3))
    idx = torch.randint(0, 61, (2, 8))
    assert torch.equal(m(idx)[0], m(idx)[0])
    m.train()
    assert not torch.allclose(m(idx)[0], m(idx)[0])
    logits, _, att = m(idx, return_attn=True)  # explicit path applies attention dropout too
    assert torch.isfinite(logits).all()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_bf16_autocast(device, n_kv_heads):
    cfg = tiny(d_model=64, qk_norm=True, n_kv_heads=n_kv_heads)
    m = model_for(cfg).to(device)
    idx = torch.randint(0, 61, (2, 16), device=device)
    ref_logits, ref = m(idx, idx)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits, loss = m(idx, idx)
        cache = m.new_kv_cache(2, 16, dtype=torch.bfloat16)
        m(idx[:, :8], kv_cache=cache)
        step, _ = m(idx[:, 8:9], kv_cache=cache)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.05
    assert (step[:, 0].float() - ref_logits[:, 8]).abs().max() < 0.05
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


# ---------------------------------------------------------------------------------------------------------------
# parity with Hugging Face implementations (random weights, fp32, eager attention)

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")  # a dev dependency: the reference implementations


def _from_gpt2(hf, cfg):
    """HF GPT2LMHeadModel -> our state dict (transposed Conv1D weights, c_attn split): lmforge.interop.hf."""
    return _with_tied_head(dict(state_from_hf(hf.state_dict(), cfg, "gpt2")), cfg)


def _from_llama(hf, cfg):
    """HF Llama/Qwen2/Qwen3/Mistral -> our state dict: same layout, renamed (RoPE needs no permutation)."""
    return _with_tied_head(dict(state_from_hf(hf.state_dict(), cfg, "llama")), cfg)


def _with_tied_head(sd, cfg):
    if cfg.tie_embeddings:  # a strict load_state_dict wants the tied alias too
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd


def _check_parity(hf, cfg, convert, T=24, pad_left=False):
    torch.manual_seed(1)
    for p in hf.parameters():  # HF zero-inits biases and ones-inits norms: randomize so the mapping is tested
        if p.dim() == 1:
            p.data.normal_(1.0 if p.data.eq(1).all() else 0.0, 0.1)
    assert config_from_hf(hf.config.to_dict())[0] == cfg  # the importer derives the same config
    ours = Transformer(cfg).eval()
    ours.load_state_dict(convert(hf, cfg))
    assert ours.num_params()["total"] == sum(p.numel() for p in hf.parameters())
    hf.eval()
    idx = torch.randint(0, cfg.vocab_size, (3, T))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
        assert (got - ref).abs().max() <= 1e-4
        if pad_left:  # left padding with an attention mask and explicit positions
            mask = torch.ones(3, T, dtype=torch.long)
            mask[1, :5] = 0
            mask[2, :11] = 0
            pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            ref = hf(idx, attention_mask=mask, position_ids=pos_ids).logits
            got, _ = ours(idx, attn_mask=mask, position_ids=pos_ids)
            real = mask.bool()
            assert (got[real] - ref[real]).abs().max() <= 1e-4


def test_parity_gpt2(transformers):
    hc = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hc)
    cfg = get_preset("gpt2", vocab_size=101, max_seq_len=64, d_model=48, n_layer=2, n_head=4)
    assert (cfg.pos, cfg.norm, cfg.ffn, cfg.gelu_approx, cfg.bias, cfg.tie_embeddings) == \
        ("learned", "layernorm", "gelu", "tanh", True, True)
    _check_parity(hf, cfg, _from_gpt2, pad_left=True)


@pytest.mark.parametrize("rope_scaling", [None, "llama3", "linear"])
def test_parity_llama(transformers, rope_scaling):
    # GQA 4/2, a non-default theta, untied head; llama3 scaling with a short original context so that the
    # head's frequencies fall in all three bands (kept, blended, slowed)
    rs = {None: None,
          "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
          "linear": {"rope_type": "linear", "factor": 4.0}}[rope_scaling]
    hc = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0} if rs is None
                                  else {**rs, "rope_theta": 5000.0}, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hc)
    cfg = get_preset("llama", vocab_size=101, d_model=64, d_ff=96, n_layer=2, n_head=4, n_kv_heads=2,
                     max_seq_len=128, rope_theta=5000.0, tie_embeddings=False, rope_scaling=rs)
    _check_parity(hf, cfg, _from_llama, pad_left=True)


def test_parity_qwen2(transformers):
    hc = transformers.Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                  rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                  attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hc)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None and hf.model.layers[0].self_attn.o_proj.bias is None
    cfg = get_preset("qwen2-0.5b", vocab_size=101, d_model=64, d_ff=96, n_layer=2, n_head=4, n_kv_heads=1,
                     max_seq_len=64)
    _check_parity(hf, cfg, _from_llama)


def test_parity_qwen3_qk_norm_and_explicit_head_dim(transformers):
    hc = transformers.Qwen3Config(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                  attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(hc)
    cfg = ModelConfig(vocab_size=101, d_model=48, head_dim=16, d_ff=96, n_layer=2, n_head=4, n_kv_heads=2,
                      max_seq_len=64, rope_theta=1e6, norm_eps=1e-6, qk_norm=True)
    _check_parity(hf, cfg, _from_llama)


def test_parity_mistral_sdpa(transformers):
    hc = transformers.MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                    sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                    attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(hc)
    cfg = ModelConfig(vocab_size=101, d_model=64, d_ff=128, n_layer=2, n_head=8, n_kv_heads=2, max_seq_len=64,
                      rope_theta=hc.rope_parameters["rope_theta"], norm_eps=1e-5, tie_embeddings=False)
    _check_parity(hf, cfg, _from_llama)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cpu_bf16_attention_path_matches_sdpa(n_kv_heads, monkeypatch):
    """Under CPU bf16 autocast attention runs as explicit matmuls (faster there than SDPA's kernel); it must
    give what SDPA gives under the same autocast, for causal training and padded batches, forward and backward."""
    import lmforge.model.transformer as tr
    cfg = tiny(d_model=64, n_kv_heads=n_kv_heads, init_std=0.3)  # large weights: attention really matters
    m = model_for(cfg)
    idx = torch.randint(0, 61, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0   # left padding
    mask[2, 9:] = 0   # right padding

    def run(explicit, **kw):
        monkeypatch.setattr(tr, "CPU_MATMUL_ATTENTION", explicit)
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, loss = m(idx, idx, **kw)
        loss.backward()
        return out.float(), m.tok_emb.weight.grad.clone()

    for kw in ({}, {"attn_mask": mask}):
        (a, ga), (b, gb) = run(True, **kw), run(False, **kw)
        real = mask.bool() if kw else torch.ones_like(mask, dtype=torch.bool)
        # rounding differences only (a leaked future token or padding key moves logits by tens of percent)
        assert (a - b)[real].abs().max() < 0.05 * b[real].abs().max()
        assert (ga - gb).norm() < 0.15 * gb.norm()  # bf16 backward noise is ~6% at this init scale
