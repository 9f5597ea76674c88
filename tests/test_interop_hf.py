"""Hugging Face interop: tokenizer.json import (ids identical to `tokenizers`), model import (logits and greedy
continuations identical to `transformers` for Llama / Qwen2 / GPT-2 / Mistral), export (transformers loads it and
agrees; import(export(x)) == x), lmforge.load, errors. Models are tiny, random, built from configs: no download."""
from __future__ import annotations

import json
import random
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.interop.hf import export_hf, hf_config, import_hf, load_hf
from lmforge.interop.hf_tokenizer import read_hf_tokenizer
from lmforge.model import ModelConfig, Transformer, get_preset
from lmforge.tokenizer.bpe import GPT4_PATTERN
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge import load
from lmforge.checkpoint import read_config, save as save_checkpoint
from test_tokenizer import HF_TEXTS, MULTILINGUAL, corpus_texts, reference

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN2_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# text with NFC-relevant decomposed characters (e + combining acute) next to precomposed ones
TEXTS = HF_TEXTS + ["cafe\u0301 café e\u0301te\u0301 Å Å", "x = [1, 2, 3]\n\n\n    return x  # done\r\n"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# test tokenizers, trained with `tokenizers` the way the real ones are built

@lru_cache(maxsize=None)
def hf_tokenizer(style: str):
    """(tokenizers.Tokenizer, roles, chat template) in the GPT-2, Llama-3 or Qwen2 style."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if style == "gpt2":  # ByteLevel's own regex; the special token comes first (id 0)
        t = tokenizers.Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials_first = ["<|endoftext|>"]
    else:  # Split(regex) + ByteLevel without regex; specials added after the vocabulary (high ids)
        t = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if style == "qwen2":
            t.normalizer = normalizers.NFC()
        specials_first = []
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus_texts(), trainers.BpeTrainer(
        vocab_size=400 if style == "gpt2" else 500, special_tokens=specials_first, initial_alphabet=alphabet,
        show_progress=False))
    if style == "gpt2":
        return t, dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"), None
    if style == "llama3":
        t.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"])
        bos = t.token_to_id("<|begin_of_text|>")
        t.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                         special_tokens=[("<|begin_of_text|>", bos)])
        return t, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), LLAMA3_TEMPLATE
    t.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return t, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), QWEN2_TEMPLATE


def save_hf_tokenizer(style: str, directory) -> None:
    t, roles, template = hf_tokenizer(style)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, chat_template=template, **roles)
    fast.save_pretrained(str(directory))


def reference_ids(t, text):
    t.encode_special_tokens = True  # our encode never turns text into special tokens (documented difference)
    try:
        return t.encode(text, add_special_tokens=False).ids
    finally:
        t.encode_special_tokens = False


# ---------------------------------------------------------------------------------------------------------------
# tokenizer import

@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2"])
def test_tokenizer_import_identical_ids(style, tmp_path):
    save_hf_tokenizer(style, tmp_path)
    ref, roles, template = hf_tokenizer(style)
    tok = read_hf_tokenizer(tmp_path)
    assert tok.vocab_size == ref.get_vocab_size()
    for name, i in tok.special_tokens.items():
        assert ref.token_to_id(name) == i and tok.is_special(i)
    assert tok.role_token("eos") == roles["eos_token"] and tok.eos_id == ref.token_to_id(roles["eos_token"])
    assert tok.role_token("bos") == roles.get("bos_token")
    assert tok.chat_template == template
    assert tok.normalizer == ("NFC" if style == "qwen2" else None)
    for text in TEXTS + list(corpus_texts()):
        ids = tok.encode(text)
        assert ids == reference_ids(ref, text), text[:60]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    # saved as format v2, loaded back identical; exported back to tokenizer.json, `tokenizers` agrees again
    tok.save(tmp_path / "ours")
    back = Tokenizer.load(tmp_path / "ours")
    assert back == tok and back.hash() == tok.hash() and back.chat_template == template
    assert back.special_tokens == tok.special_tokens and back.role_token("eos") == tok.role_token("eos")
    assert json.loads((tmp_path / "ours" / "tokenizer_meta.json").read_text())["version"] == 2
    again = tokenizers.Tokenizer.from_file(str(tmp_path / "ours" / "tokenizer.json"))
    for text in TEXTS:
        assert reference_ids(again, text) == back.encode(text) == tok.encode(text)


def test_tokenizer_import_ids_not_in_merge_order(tmp_path):
    """Shuffle every id of a Llama-3-style tokenizer.json: merge priority no longer follows id order, so ranks
    are mapped back to ids. Ids must still equal `tokenizers`' on every text."""
    save_hf_tokenizer("llama3", tmp_path)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    n = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    perm = list(range(n))
    random.Random(0).shuffle(perm)
    tj["model"]["vocab"] = {s: perm[i] for s, i in tj["model"]["vocab"].items()}
    for t in tj["added_tokens"]:
        t["id"] = perm[t["id"]]
    tj["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = read_hf_tokenizer(tmp_path)
    assert tok._rank_to_id is not None  # the remapping path is the one under test
    assert tok.bos_id == perm[500]
    for text in TEXTS + list(corpus_texts()[:20]):
        assert tok.encode(text) == reference_ids(ref, text), text[:60]
    assert tok.encode_batch(TEXTS) == [reference_ids(ref, t) for t in TEXTS]
    back = Tokenizer.load(tok.save(tmp_path / "ours"))
    assert back == tok and back.encode(TEXTS[5]) == tok.encode(TEXTS[5])


def test_saved_v2_tokenizer_errors_name_the_line(tmp_path):
    save_hf_tokenizer("qwen2", tmp_path / "hf")
    d = read_hf_tokenizer(tmp_path / "hf").save(tmp_path / "tok")
    model = d / "tokenizer.model"
    good = model.read_text().splitlines()
    assert good[:2] == ["lmforge-bpe v2", f"tokens {len(hf_tokenizer('qwen2')[0].get_vocab())}"]
    for line_no, bad, match in ((3, "zz", r"tokenizer\.model:3: expected a token's bytes in hex"),
                                (2, "tokens x", r"tokenizer\.model:2: expected 'tokens N'"),
                                (len(good), "1 x", rf"tokenizer\.model:{len(good)}: expected two token ids")):
        model.write_text("\n".join(good[:line_no - 1] + [bad] + good[line_no:]) + "\n")
        with pytest.raises(LmforgeError, match=match):
            Tokenizer.load(d)
    first_special = next(i for i, t in enumerate(good[2:]) if t == "-")
    model.write_text("\n".join(good[:2 + first_special] + ["41"] + good[3 + first_special:]) + "\n")
    with pytest.raises(LmforgeError, match="corrupt tokenizer"):
        Tokenizer.load(d)  # the specials' ids no longer match
    model.write_text("\n".join(good) + "\n")
    assert Tokenizer.load(d) == read_hf_tokenizer(tmp_path / "hf")


@pytest.mark.parametrize("edit, match", [
    (lambda tj: tj["model"].update(type="WordPiece"), "WordPiece.*byte-level BPE"),
    (lambda tj: tj["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda tj: tj.update(normalizer={"type": "Lowercase"}), "normalizer Lowercase"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "pre-tokenizer.*Metaspace"),
    (lambda tj: tj["model"]["vocab"].update({"▁hello": 10_000}), "not in GPT-2's byte alphabet"),
])
def test_tokenizer_import_refuses_what_it_cannot_reproduce(edit, match, tmp_path):
    save_hf_tokenizer("llama3", tmp_path)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    edit(tj)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConfigError, match=match) as e:
        read_hf_tokenizer(tmp_path)
    assert "tokenizer.json" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# model import: logits and greedy continuations vs transformers

def _randomize(hf):
    torch.manual_seed(1)
    for p in hf.parameters():  # HF inits norms to 1 and biases to 0: randomize so every mapping is tested
        if p.dim() == 1:
            p.data.normal_(1.0 if p.data.eq(1).all() else 0.0, 0.1)
    return hf.eval()


def hf_model(family: str, vocab: int):
    common = dict(initializer_range=0.1, attn_implementation="eager")
    if family == "gpt2":
        hc = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        cls = transformers.GPT2LMHeadModel
    elif family == "llama":  # GQA 4/2, untied head, theta 5e5 with Llama 3 RoPE scaling
        hc = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":  # q/k/v biases, tied, model vocabulary padded beyond the tokenizer's
        hc = transformers.Qwen2Config(vocab_size=vocab + 12, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True, **common)
        cls = transformers.Qwen2ForCausalLM
    else:  # mistral: GQA 8/2, sdpa
        hc = transformers.MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                        max_position_embeddings=128, sliding_window=None,
                                        tie_word_embeddings=False, initializer_range=0.1, attn_implementation="sdpa")
        cls = transformers.MistralForCausalLM
    torch.manual_seed(0)
    return _randomize(cls(hc))


TOKENIZER_STYLE = {"gpt2": "gpt2", "llama": "llama3", "qwen2": "qwen2", "mistral": "llama3"}


def max_logit_diff(ours, hf, vocab, T=24):
    """Max |ours - HF| over a random batch, plain and left-padded (attention mask + explicit positions)."""
    torch.manual_seed(2)
    idx = torch.randint(0, vocab, (3, T))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = (ours(idx)[0] - hf(idx).logits).abs().max()
        got = ours(idx, attn_mask=mask, position_ids=pos)[0]
        ref = hf(idx, attention_mask=mask, position_ids=pos).logits
        padded = (got - ref)[mask.bool()].abs().max()
    return max(plain.item(), padded.item())


def greedy_both(ours, tok, hf, vocab, seed=3):
    torch.manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, 8))
    hf.generation_config.eos_token_id = None  # run the full 32 tokens, as ignore_eos does for ours
    hf.generation_config.pad_token_id = 0
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32)
    res = generate(ours, tok, prompt[0].tolist(), SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    return res.token_ids, ref[0, 8:].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_import_matches_transformers(family, tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_tokenizer(TOKENIZER_STYLE[family], hf_dir)
    vocab = len(hf_tokenizer(TOKENIZER_STYLE[family])[0].get_vocab())
    hf = hf_model(family, vocab)
    # the Llama model is saved in shards (model.safetensors.index.json): the lazy reader follows the index
    hf.save_pretrained(str(hf_dir), max_shard_size="40KB" if family == "llama" else "1GB")
    assert (hf_dir / "model.safetensors.index.json").is_file() == (family == "llama")

    ckpt = import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    (model, tok), config = load(ckpt, device="cpu"), read_config(ckpt)
    assert config["imported_from"]["architecture"] == hf.__class__.__name__
    assert tok == read_hf_tokenizer(hf_dir) and tok.chat_template == hf_tokenizer(TOKENIZER_STYLE[family])[2]
    assert model.num_params()["total"] == sum(p.numel() for p in hf.parameters())
    diff = max_logit_diff(model, hf, vocab)
    print(f"\n{family}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    ours, ref = greedy_both(model, tok, hf, vocab)
    assert ours == ref and len(ours) == 32
    # tokenizer of the checkpoint gives the ids transformers' tokenizer gives
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for text in MULTILINGUAL:
        assert tok.encode(text) == auto(text, add_special_tokens=False)["input_ids"]


def test_load_hf_directory_on_the_fly(tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_tokenizer("qwen2", hf_dir)
    vocab = len(hf_tokenizer("qwen2")[0].get_vocab())
    hf = hf_model("qwen2", vocab)
    hf.config.bos_token_id = vocab - 3  # as in Qwen2's config.json: the model's, not a BOS the tokenizer adds
    hf.save_pretrained(str(hf_dir))
    (hf_dir / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "eos_token_id": [vocab - 1, vocab - 3]}))
    model, tok = lmforge.load(hf_dir)
    assert not any(p.is_meta for p in model.parameters()) and model.lm_head.weight is model.tok_emb.weight
    assert max_logit_diff(model, hf, vocab) <= 1e-4
    assert getattr(tok, "bos_id", None) is None  # Qwen2 has no BOS: generate() must not invent one
    res = generate(model, tok, "Hello 你好", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert res.prompt_token_ids == tok.encode("Hello 你好")
    _, _, gen = load_hf(hf_dir, progress=False)
    assert gen == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "stop_token_ids": [vocab - 3]}
    # bf16 stays bf16 when asked to keep the stored dtype
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    save_hf_tokenizer("qwen2", tmp_path / "bf16")
    model16, _, _ = load_hf(tmp_path / "bf16", dtype=None, progress=False)
    assert model16.tok_emb.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("change, match", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn.*default, linear, llama3"),
    ({"architectures": ["FalconForCausalLM"]}, "FalconForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_import_refuses_unsupported_config(change, match, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    save_hf_tokenizer("llama3", hf_dir)
    hf_model("llama", 505).save_pretrained(str(hf_dir))
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    capsys.readouterr()
    assert main(["import", "hf", "--source", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err and not (tmp_path / "ckpt").exists()


def test_mistral_sliding_window_limits_the_context(tmp_path):
    hf_dir = tmp_path / "hf"
    save_hf_tokenizer("llama3", hf_dir)
    hf = hf_model("mistral", 505)
    hf.config.sliding_window = 64  # < max_position_embeddings = 128: full attention is exact up to 64 tokens
    hf.save_pretrained(str(hf_dir))
    with pytest.warns(UserWarning, match="sliding_window=64"):
        model, tok, _ = load_hf(hf_dir, progress=False)
    assert model.config.max_seq_len == 64
    assert max_logit_diff(model, hf, 505, T=48) <= 1e-4


def test_import_errors_missing_files(tmp_path):
    with pytest.raises(LmforgeError, match="not found"):
        import_hf(tmp_path / "nope", tmp_path / "ckpt")
    hf_dir = tmp_path / "hf"
    save_hf_tokenizer("llama3", hf_dir)
    hf_model("llama", 505).save_pretrained(str(hf_dir), safe_serialization=True)
    for f in hf_dir.glob("model*.safetensors*"):
        f.unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(LmforgeError, match="never loads"):
        import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    hf_model("llama", 505).save_pretrained(str(hf_dir))
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(LmforgeError, match=r"mlp.gate_proj.weight has shape \(96, 64\) but config.json implies"):
        import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(LmforgeError, match="refusing to replace"):  # never delete a directory of other things
        import_hf(hf_dir, tmp_path / "notes")


# ---------------------------------------------------------------------------------------------------------------
# export: transformers loads what we write

@lru_cache(maxsize=None)
def our_tokenizer() -> Tokenizer:
    base = reference()[1]  # BPE trained on pydoc + multilingual text, our id layout and specials
    tok = Tokenizer(base.merges, base.pattern)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    return tok


EXPORT_CONFIGS = {
    "llama": lambda v: ModelConfig(vocab_size=v, n_layer=2, n_head=4, n_kv_heads=2, d_model=64, max_seq_len=128,
                                   rope_theta=20000.0, tie_embeddings=False, init_std=0.1,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gpt2": lambda v: get_preset("gpt2", vocab_size=v, d_model=64, n_layer=2, n_head=4, max_seq_len=128, init_std=0.1),
    "qwen2": lambda v: ModelConfig(vocab_size=v + 8, n_layer=2, n_head=4, n_kv_heads=1, d_model=64, max_seq_len=128,
                                   qkv_bias=True, init_std=0.1),
    "qwen3": lambda v: ModelConfig(vocab_size=v, n_layer=2, n_head=4, n_kv_heads=2, d_model=48, head_dim=16,
                                   max_seq_len=128, qk_norm=True, init_std=0.1),
}


@pytest.mark.parametrize("style", list(EXPORT_CONFIGS))
def test_export_loads_in_transformers(style, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = our_tokenizer()
    cfg = EXPORT_CONFIGS[style](tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():
        if p.dim() == 1:
            p.data.normal_(1.0 if p.data.eq(1).all() else 0.0, 0.1)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, model_config=cfg.to_dict(), tokenizer=tok,
                           generation_config={"temperature": 0.8, "top_k": 50, "max_new_tokens": 64})
    out = export_hf(ckpt, tmp_path / "hf", progress=False)
    hc = json.loads((out / "config.json").read_text())
    # q/k/v biases with a tokenizer that does not split like Qwen2's: Llama with attention_bias (transformers
    # would tokenize a "qwen2" model with Qwen2's own regex); zero o_proj biases
    assert hc["architectures"] == [{"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                                    "qwen2": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[style]]
    assert hc.get("attention_bias", False) == (style == "qwen2")

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert hf.dtype == torch.float32
    diff = max_logit_diff(model.eval(), hf, tok.vocab_size)
    print(f"\nexport {style}: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    assert (hf.generation_config.eos_token_id, hf.generation_config.bos_token_id) == (tok.eos_id, tok.bos_id)
    assert hf.generation_config.do_sample and hf.generation_config.top_k == 50

    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in MULTILINGUAL + [t for t in TEXTS if "<|" not in t]:
        assert auto(text)["input_ids"] == tok.encode(text), text[:60]
        assert auto.decode(tok.encode(text)) == text
    chat = auto.apply_chat_template([{"role": "user", "content": "hi 你好"}], tokenize=False)
    assert chat == "<|user|>hi 你好<|end|>"

    # import(export(x)) == x: weights bit for bit, same config, same tokenizer (hash included)
    back = import_hf(out, tmp_path / "back", progress=False)
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (_, tok2), config2 = load(back, device="cpu"), read_config(back)
    assert ModelConfig.from_dict(config2["model"]) == cfg
    assert tok2.hash() == tok.hash() and tok2.chat_template == tok.chat_template
    assert json.loads((back / "tokenizer" / "tokenizer_meta.json").read_text())["version"] == 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_imported_vocabulary(family, tmp_path, monkeypatch):
    """A model imported with a Llama-3 / Qwen2-style vocabulary exports again as the same architecture, with that
    vocabulary's ids, roles and chat template, and the same tensors."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir = tmp_path / "hf"
    style = TOKENIZER_STYLE[family]
    save_hf_tokenizer(style, hf_dir)
    hf_model(family, len(hf_tokenizer(style)[0].get_vocab())).save_pretrained(str(hf_dir))
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", progress=False)
    out = export_hf(ckpt, tmp_path / "again", progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == \
        json.loads((hf_dir / "config.json").read_text())["architectures"]
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    orig = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    for text in MULTILINGUAL + TEXTS[-2:]:
        assert auto(text, add_special_tokens=False)["input_ids"] == orig(text, add_special_tokens=False)["input_ids"]
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == (orig.bos_token, orig.eos_token, orig.pad_token)
    assert auto.chat_template == orig.chat_template == hf_tokenizer(style)[2]
    a, b = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw, field", [
    (dict(pos="sinusoidal"), "pos"),
    (dict(pos="none"), "pos"),
    (dict(ffn="relu"), "ffn"),
    (dict(norm="layernorm"), "norm"),
    (dict(qkv_bias=True, qk_norm=True), "qk_norm"),
    (dict(pos="learned", norm="layernorm", ffn="gelu", bias=True, n_kv_heads=2), "n_kv_heads"),
    (dict(final_norm=False), "final_norm"),
])
def test_export_refuses_configs_without_hf_equivalent(kw, field, tmp_path, capsys):
    cfg = ModelConfig(**{**dict(vocab_size=300, n_layer=1, n_head=4, d_model=32, max_seq_len=32), **kw})
    with pytest.raises(ConfigError) as e:
        hf_config(cfg)
    assert e.value.field == field and field in str(e.value)
    save_checkpoint(tmp_path / "ckpt", model=Transformer(cfg), model_config=cfg.to_dict(),
                    tokenizer=Tokenizer([], GPT4_PATTERN))
    capsys.readouterr()
    assert main(["export", "hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and not (tmp_path / "hf").exists()


def test_cli_import_export_and_load(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    save_hf_tokenizer("gpt2", hf_dir)
    hf_model("gpt2", 400).save_pretrained(str(hf_dir))
    assert main(["import", "hf", "--source", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--dtype", "bfloat16"]) == 0
    assert load_file(str(tmp_path / "ckpt" / "model.safetensors"))["tok_emb.weight"].dtype == torch.bfloat16
    model, tok = lmforge.load(tmp_path / "ckpt", device="auto")
    assert model.tok_emb.weight.dtype == torch.float32 and tok.eos_id == 0
    assert main(["export", "hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
