"""Does llama.cpp run what `lmforge export gguf` writes, and compute what we compute?

Needs llama-cpp-python (not a dependency: it compiles llama.cpp; e.g.
`pip install --target /tmp/lcpp llama-cpp-python diskcache` then PYTHONPATH=/tmp/lcpp). For tiny random
llama-style models (GQA, Llama 3 / linear RoPE scaling, q/k/v biases, tied and untied heads) it exports f32 and
q8_0 GGUF files, loads them in llama.cpp, and prints
  - token ids: llama.cpp's tokenizer vs ours on multi-script text (GGUF vocabulary, merges, pre-tokenizer name),
  - max |logits llama.cpp - logits ours| on 40 random tokens, and the same with the Q/K permutation switched off
    (which must be far worse: it is what makes llama.cpp's pairwise RoPE agree with our rotate_half RoPE).

    PYTHONPATH=/tmp/lcpp python bench/gguf_llama_cpp.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import lmforge.interop.gguf as gg
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.checkpoint import save as save_checkpoint

TEXTS = ["Hello world! It's a test, isn't it?", "你好世界，这是一个测试。", "Привет, мир! 123456789",
         "def f(x):\n    return x ** 2  # square\n\n\tpass\r\n", "Emoji: 😀🎉👍🏽 🇫🇷 done.   spaces   \n\n",
         "مرحبا بالعالم! नमस्ते दुनिया! こんにちは世界！"]


def corpus() -> list[str]:
    import pydoc_data.topics
    return [v for _, v in sorted(pydoc_data.topics.topics.items())][:40] + TEXTS * 20


def logits_diff(llama_cpp, path: Path, model, tok, ids):
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    return float(np.abs(theirs[:, :ours.shape[1]] - ours).max()), llm


def main() -> None:
    import llama_cpp
    torch.set_num_threads(1)
    tok = Tokenizer.train(corpus(), 1024, progress=False)
    tmp = Path(tempfile.mkdtemp())
    rope3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 32}
    cases = {"GQA 4/2, untied, llama3 RoPE": dict(rope_scaling=rope3),
             "q/k/v biases, tied, linear RoPE": dict(qkv_bias=True, tie_embeddings=True,
                                                     rope_scaling={"rope_type": "linear", "factor": 2.0}),
             "MHA, plain RoPE": dict(n_kv_heads=4)}
    print(f"{'model':34s} {'type':5s} {'token ids equal':>16s} {'max|dlogit|':>12s} {'no permutation':>15s}")
    permute = gg.permute_for_llama_cpp
    for name, kw in cases.items():
        cfg = ModelConfig(**{**dict(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=64,
                                    max_seq_len=128, rope_theta=50000.0, tie_embeddings=False, init_std=0.1), **kw})
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        ckpt = save_checkpoint(tmp / name.replace(" ", "_"), model=model, model_config=cfg.to_dict(), tokenizer=tok)
        ids = torch.randint(0, tok.vocab_size, (40,), generator=torch.Generator().manual_seed(5)).tolist()
        for qtype in ("f32", "q8_0"):
            gg.permute_for_llama_cpp = permute
            d, llm = logits_diff(llama_cpp, gg.export_gguf(ckpt, tmp / "m.gguf", qtype, progress=False), model, tok,
                                 ids)
            same = sum(llm.tokenize(t.encode(), add_bos=False, special=False) == tok.encode(t) for t in TEXTS)
            gg.permute_for_llama_cpp = lambda w, n: w
            bad, _ = logits_diff(llama_cpp, gg.export_gguf(ckpt, tmp / "x.gguf", qtype, progress=False), model,
                                 tok, ids)
            print(f"{name:34s} {qtype:5s} {f'{same}/{len(TEXTS)}':>16s} {d:12.2e} {bad:15.2e}")
    gg.permute_for_llama_cpp = permute


if __name__ == "__main__":
    main()
