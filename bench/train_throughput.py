"""P3 — training throughput (protocol: docs/bench.md): tokens/s and MFU, lmforge vs nanoGPT's model, same shapes.

    python bench/train_throughput.py --nanogpt /path/to/nanoGPT    # a clone of github.com/karpathy/nanoGPT

Both sides build the same GPT-2-style shape (learned positions, LayerNorm, exact GELU, MHA, tied embeddings, no
biases), train with fused AdamW under the same precision (bf16 autocast where the CPU has AMX/AVX512-BF16), the
same batch, 2 threads. Timed: forward + backward + optimizer step, median over the measured steps, the two models
interleaved step by step so machine drift hits both alike. MFU = (6·N + 12·L·d·T) · tokens/s ÷ the bf16 matmul
peak measured in this same run. A second row per size runs lmforge's llama-style block (RMSNorm, SwiGLU, RoPE, GQA)
at the same width and depth, which is what the CPU recipes use.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

SIZES = {  # name: (d_model, n_layer, n_head, vocab, seq_len, batch)
    "10M": (384, 6, 6, 8192, 256, 8),
    "50M": (768, 7, 12, 8192, 256, 4),
}


def step_fn(model, opt, x, y, precision):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)

    def step():
        with ctx:
            loss = model(x, y)[1]  # both models: forward(idx, targets) -> (logits, loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", help="path to a nanoGPT clone")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args()
    if not (args.nanogpt and (Path(args.nanogpt) / "model.py").is_file()):
        print("nanoGPT not found: git clone https://github.com/karpathy/nanoGPT and pass --nanogpt DIR", file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, args.nanogpt)
    from model import GPT, GPTConfig  # nanoGPT's model.py

    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.runtime import measured_peak_flops, resolve_precision

    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    precision = resolve_precision(args.precision, cpu)
    peak = measured_peak_flops(cpu, precision)
    print(f"measured {precision} matmul peak: {peak / 1e9:.0f} GFLOP/s (2 threads)")
    print(f"{'size':5s} {'model':28s} {'params':>8s} {'tok/s':>8s} {'MFU':>6s}")
    for name, (d, L, H, V, T, B) in SIZES.items():
        torch.manual_seed(0)
        ours = Transformer(ModelConfig(vocab_size=V, n_layer=L, n_head=H, d_model=d, max_seq_len=T, pos="learned",
                                       norm="layernorm", ffn="gelu", bias=False, tie_embeddings=True))
        llama = Transformer(ModelConfig(vocab_size=V, n_layer=L, n_head=H, n_kv_heads=max(1, H // 3), d_model=d,
                                        max_seq_len=T))
        peer = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=H, n_embd=d, dropout=0.0, bias=False))
        n_ours = sum(p.numel() for p in ours.parameters())
        n_peer = sum(p.numel() for p in peer.parameters())
        assert n_ours == n_peer, (n_ours, n_peer)  # same shape, same parameter count
        x = torch.randint(0, V, (B, T))
        y = torch.randint(0, V, (B, T))
        runs = {}
        for label, m in (("lmforge (gpt2-style)", ours), ("nanoGPT", peer), ("lmforge (llama-style)", llama)):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
            runs[label] = (step_fn(m, opt, x, y, precision), [])
        for s in range(args.steps + 2):
            for label, (fn, times) in runs.items():
                t0 = time.perf_counter()
                fn()
                if s >= 2:  # first steps build oneDNN kernels
                    times.append(time.perf_counter() - t0)
        fpt = {"lmforge (gpt2-style)": ours.flops_per_token(T), "nanoGPT": ours.flops_per_token(T),
               "lmforge (llama-style)": llama.flops_per_token(T)}
        tps = {}
        for label, (_, times) in runs.items():
            tps[label] = B * T / statistics.median(times)
            params = sum(p.numel() for p in (ours if "gpt2" in label else peer if label == "nanoGPT" else llama).parameters())
            print(f"{name:5s} {label:28s} {params / 1e6:7.1f}M {tps[label]:8.0f} {fpt[label] * tps[label] / peak:6.1%}")
        print(f"{name:5s} ratio lmforge/nanoGPT tokens/s (same shape): "
              f"{tps['lmforge (gpt2-style)'] / tps['nanoGPT']:.2f}x")


if __name__ == "__main__":
    main()
