"""Seeing inside: attention maps (vs Hugging Face's output_attentions), the PNG they are drawn to, top-k next tokens
and continuation logprobs (vs a manual full forward), and the `lmforge attention` / `lmforge inspect` verbs."""
from __future__ import annotations

import re
import struct
import subprocess
import sys

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.inspect import (GRID_LABEL_MAX_T, attention_maps, continuation_logprobs, figure_size,
                                   next_token_topk, plot_attention)
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.bpe import resolve_pattern
from lmforge.tokenizer.tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer([], resolve_pattern("gpt4"))


def tiny_model(vocab: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, n_layer=2, n_head=4, n_kv_heads=2, d_model=32, max_seq_len=48, init_std=0.3)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_px(T, rows, cols, dpi=100):
    w, h = figure_size(T, rows, cols)
    return round(w * dpi), round(h * dpi)


# ---------------------------------------------------------------------------------------------------------------
# attention

def test_attention_maps_match_hf_output_attentions(tok):
    transformers = pytest.importorskip("transformers")
    from test_search import _llama_pair  # tests/ is on sys.path under pytest
    hf, model = _llama_pair(transformers, tok)
    tokens, attn = attention_maps(model, tok, "Hi there, you!")
    ids = [tok.bos_id] + tok.encode("Hi there, you!")
    assert tokens[0] == "<|bos|>" and tokens[3] == "·" and len(tokens) == len(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_attentions=True).attentions
    ref = torch.stack([a[0] for a in ref])
    assert attn.shape == ref.shape == (2, 4, len(ids), len(ids))
    assert (attn - ref).abs().max() <= 1e-5
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, len(ids)), atol=1e-5)
    assert (attn.triu(1) == 0).all()  # causal


def test_plot_attention_grid_and_single(tok, tmp_path):
    import matplotlib.image
    model = tiny_model(tok.vocab_size)
    tokens, attn = attention_maps(model, tok, "The cat 你好")
    T = len(tokens)
    assert T <= GRID_LABEL_MAX_T
    grid = plot_attention(tokens, attn, tmp_path / "grid.png", title="t $x$")  # '$' must not start mathtext
    single = plot_attention(tokens, attn, tmp_path / "sub" / "one.png", layer=1, head=3)
    row = plot_attention(tokens, attn, tmp_path / "row.png", layer=0)
    assert png_size(grid) == expected_px(T, 2, 4)
    assert png_size(single) == expected_px(T, 1, 1)
    assert png_size(row) == expected_px(T, 1, 4)
    assert len({png_size(grid), png_size(single), png_size(row)}) == 3
    for p in (grid, single):
        img = matplotlib.image.imread(p)
        assert img[..., :3].std() > 0.05  # something was drawn
    # a long prompt: the single map grows, grid cells keep a bounded size
    assert figure_size(200, 1, 1)[0] > figure_size(20, 1, 1)[0]
    assert max(figure_size(64, 32, 32)) <= 40
    with pytest.raises(LmforgeError, match="layer"):
        plot_attention(tokens, attn, tmp_path / "x.png", layer=2)
    with pytest.raises(LmforgeError, match="head"):
        plot_attention(tokens, attn, tmp_path / "x.png", head=-1)
    with pytest.raises(LmforgeError, match="out"):
        plot_attention(tokens, attn, tmp_path / "x.bmp")


# ---------------------------------------------------------------------------------------------------------------
# probabilities

def test_next_token_topk_is_the_softmax(tok):
    model = tiny_model(tok.vocab_size, seed=1)
    top = next_token_topk(model, tok, "Hello", k=7)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[tok.bos_id] + tok.encode("Hello")]))
    probs = torch.softmax(logits[0, -1].double(), -1)
    ref_p, ref_i = probs.topk(7)
    assert [t.token_id for t in top] == ref_i.tolist()
    assert [t.prob for t in top] == pytest.approx(ref_p.tolist(), abs=1e-6)
    assert [t.logprob for t in top] == pytest.approx(ref_p.log().tolist(), abs=1e-5)
    assert top[0].prob > top[-1].prob and top[0].token == tok.token_str(top[0].token_id).replace(" ", "·")
    assert len(next_token_topk(model, tok, "Hello", k=10_000)) == tok.vocab_size
    with pytest.raises(ConfigError, match="top_k"):
        next_token_topk(model, tok, "Hello", k=0)
    with pytest.raises(LmforgeError, match="prompt"):
        next_token_topk(model, tok, "")
    with pytest.raises(LmforgeError, match="prompt"):
        next_token_topk(model, tok, "x" * 60)  # past the 48-token context


def test_padded_vocabulary_is_never_a_token(tok):
    model = tiny_model(tok.vocab_size + 8, seed=2)
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] *= 50  # padding rows with huge logits, were they not masked
    top = next_token_topk(model, tok, "Hello", k=5)
    assert all(t.token_id < tok.vocab_size for t in top)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[tok.bos_id] + tok.encode("Hello")]))
    ref = torch.softmax(logits[0, -1, :tok.vocab_size].double(), -1).topk(5)
    assert [t.prob for t in top] == pytest.approx(ref.values.tolist(), abs=1e-6)


def test_continuation_logprobs_equal_a_full_forward_gather(tok):
    model = tiny_model(tok.vocab_size, seed=3)
    res = continuation_logprobs(model, tok, "The cat", " sat on the mat")
    p_ids, c_ids = [tok.bos_id] + tok.encode("The cat"), tok.encode(" sat on the mat")
    assert res.prompt_ids == p_ids and res.token_ids == c_ids
    with torch.no_grad():
        logits, _ = model(torch.tensor([p_ids + c_ids]))
    lp = torch.log_softmax(logits[0].double(), -1)
    ref = [lp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(c_ids)]
    assert res.logprobs == pytest.approx(ref, abs=1e-5)
    assert res.total == pytest.approx(sum(ref), abs=1e-4) and res.mean == pytest.approx(sum(ref) / len(ref), abs=1e-5)
    assert res.perplexity == pytest.approx(torch.tensor(-sum(ref) / len(ref)).exp().item(), rel=1e-4)
    assert res.tokens == [tok.token_str(i).replace(" ", "·") for i in c_ids]
    with pytest.raises(LmforgeError, match="continuation"):
        continuation_logprobs(model, tok, "The cat", "")
    with pytest.raises(LmforgeError, match="continuation"):
        continuation_logprobs(model, tok, "The cat", "y" * 45)  # the prompt fits, prompt + continuation does not
    with pytest.raises(LmforgeError, match="prompt"):
        continuation_logprobs(model, tok, "", "x")


# ---------------------------------------------------------------------------------------------------------------
# CLI

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    from lmforge.checkpoint import save as save_checkpoint
    model = tiny_model(tok.vocab_size, seed=4)
    path = tmp_path_factory.mktemp("inspect") / "ckpt"
    save_checkpoint(path, model=model, model_config=model.config.to_dict(), tokenizer=tok)
    return path


def test_cli_inspect_prints_the_library_numbers(ckpt, tok, capsys):
    model = tiny_model(tok.vocab_size, seed=4)
    rc = main(["inspect", "--checkpoint", str(ckpt), "--prompt", "Hi you", "--continuation", " there",
               "--top-k", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    top = next_token_topk(model, tok, "Hi you", k=3)
    printed = [float(x) for x in re.findall(r"p=([\d.]+)  logprob", out)]
    assert printed == pytest.approx([t.prob for t in top], abs=1e-4)
    cont = continuation_logprobs(model, tok, "Hi you", " there")
    per_tok = [float(x) for x in re.findall(r"id=\d+\s+logprob=(-?[\d.]+)", out)]
    assert per_tok == pytest.approx(cont.logprobs, abs=1e-4) and len(per_tok) == len(tok.encode(" there"))
    total, mean = map(float, re.search(r"total logprob (-?[\d.]+), mean (-?[\d.]+)", out).groups())
    assert total == pytest.approx(cont.total, abs=1e-4) and mean == pytest.approx(cont.mean, abs=1e-4)


def test_cli_attention_writes_the_png(ckpt, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["attention", "--checkpoint", str(ckpt), "--prompt", "Hi you", "--out", str(out),
                 "--device", "cpu"]) == 0
    T = 1 + len("Hi you")  # BOS + one byte per token
    assert png_size(out) == expected_px(T, 2, 4) and "wrote" in capsys.readouterr().out
    assert main(["attention", "--checkpoint", str(ckpt), "--prompt", "Hi you", "--layer", "1", "--head", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert png_size(out) == expected_px(T, 1, 1)


@pytest.mark.parametrize("argv,field", [
    (["attention", "--layer", "2"], "layer"), (["attention", "--head", "4"], "head"),
    (["attention", "--head", "-1"], "head"), (["attention", "--prompt", ""], "prompt"),
    (["attention", "--prompt", "z" * 80], "prompt"), (["inspect", "--top-k", "0"], "top_k"),
    (["inspect", "--prompt", ""], "prompt"), (["inspect", "--continuation", ""], "continuation"),
    (["inspect", "--continuation", "w" * 60], "continuation"), (["attention", "--out", "{tmp}/a.bmp"], "out")])
def test_cli_bad_input_is_one_line_exit_2(ckpt, tmp_path, capsys, argv, field):
    verb, extra = argv[0], [a.replace("{tmp}", str(tmp_path)) for a in argv[1:]]
    base = [verb, "--checkpoint", str(ckpt), "--prompt", "Hi", "--device", "cpu"]
    if verb == "attention" and "--out" not in extra:
        base += ["--out", str(tmp_path / "a.png")]
    rc = main(base + extra)  # later flags win in argparse
    err = capsys.readouterr().err
    # a range declared on the argument (argparse) names the flag; a check in the verb names the field
    flag = f"argument --{field.replace('_', '-')}:"
    assert rc == 2 and err.count("\n") == 1 and (f"field '{field}'" in err or flag in err)
    assert not (tmp_path / "a.png").exists()


def test_cli_missing_checkpoint_exits_2(tmp_path):
    # a real process: the exit status and the one-line message as a user sees them
    r = subprocess.run([sys.executable, "-m", "lmforge", "inspect", "--checkpoint", str(tmp_path / "nope"),
                        "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "checkpoint not found" in r.stderr
