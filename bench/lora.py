"""LoRA vs full fine-tuning on the ≈125M llama-shaped model: trainable parameters and peak training memory.

    python bench/lora.py                          # full, LoRA r=8 on q,v, LoRA r=8 on every projection
    python bench/lora.py --steps 3 --batch 4 --seq-len 256

Model: the 125M shape of bench/decode.py (d_model 768, 12 layers, 12 heads / 4 KV heads, SwiGLU FFN 2048, vocab
32000, untied head: 124.7 M parameters), random weights (seed 0), fp32. Each configuration trains `--steps` AdamW
steps on the same batch (random token ids, seed 1): the optimizer is the trainer's own `build_optimizer` over the
parameters that require grad — every one for full fine-tuning, only the adapters after `apply_lora` (which
freezes the rest), as `train.lora.rank=8` does in any stage.

Memory: each configuration runs in a fresh process, which reports
  peak        its peak resident set size (getrusage ru_maxrss) over the whole run, and
  overhead    that peak minus the RSS measured right after the model was built: what training added on top of
              the weights (gradients, AdamW's two moments, activations kept for the backward pass).
RSS is what the OS actually had to give the process, so it is the honest number for CPU training: tracemalloc does
not see torch's allocator, and torch keeps no peak counter for CPU memory. LoRA still keeps the activations (the
gradient flows back through the frozen layers to earlier adapters); it saves the weight gradients and the optimizer
state of the frozen weights. Time per step: the median of the steps after the first (the first allocates AdamW's
state).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {   # name -> LoRA targets (None = full fine-tuning)
    "full": None,
    "lora-qv": "q_proj,v_proj",
    "lora-all": "*_proj",        # every projection of every block (q, k, v, o, gate, up, down)
}
RANK, ALPHA = 8, 16.0


def model_config():
    from lmforge.model.config import ModelConfig
    return ModelConfig(vocab_size=32000, n_layer=12, n_head=12, n_kv_heads=4, d_model=768, d_ff=2048,
                       max_seq_len=1024, tie_embeddings=False)


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def child(name: str, steps: int, batch: int, seq_len: int, threads: int) -> dict:
    import torch

    from lmforge.model.lora import apply_lora
    from lmforge.model.transformer import Transformer
    from lmforge.train.trainer import TrainConfig, build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(model_config())
    weights_rss = rss()
    total = sum(p.numel() for p in model.parameters())
    if CONFIGS[name] is not None:
        apply_lora(model, RANK, ALPHA, 0.0, CONFIGS[name])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 32000, (batch, seq_len + 1), generator=g)
    x, y = rows[:, :-1], rows[:, 1:]
    model.train()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        _, loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux
    return {"name": name, "total_params": total, "trainable_params": trainable, "weights_rss": weights_rss,
            "peak_rss": peak, "overhead": peak - weights_rss, "losses": losses,
            "step_s": statistics.median(times[1:] or times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq_len, args.threads)))
        return

    print(f"125M llama shape, fp32, AdamW, batch {args.batch} x {args.seq_len} tokens, {args.steps} steps, "
          f"{args.threads} threads; LoRA rank {RANK}, alpha {ALPHA:g}", flush=True)
    results = {}
    for name in args.configs:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch",
                            str(args.batch), "--seq-len", str(args.seq_len), "--threads", str(args.threads)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            sys.exit(p.returncode)
        results[name] = r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    mib = 2 ** 20
    print(f"{'config':<10} {'trainable params':>17} {'% of total':>10} {'peak RSS':>10} {'overhead':>10} "
          f"{'s/step':>7}  losses")
    for name, r in results.items():
        print(f"{name:<10} {r['trainable_params']:>17,} {100 * r['trainable_params'] / r['total_params']:>9.3f}% "
              f"{r['peak_rss'] / mib:>7.0f} MiB {r['overhead'] / mib:>6.0f} MiB {r['step_s']:>7.2f}  "
              + " ".join(f"{x:.4f}" for x in r["losses"]))
    if "full" in results:
        full = results["full"]
        for name, r in results.items():
            if name != "full":
                print(f"{name} / full: trainable params {r['trainable_params'] / full['trainable_params']:.5f} "
                      f"({full['trainable_params'] / r['trainable_params']:,.0f}x fewer), peak RSS "
                      f"{r['peak_rss'] / full['peak_rss']:.2f}, training overhead "
                      f"{r['overhead'] / full['overhead']:.2f}, time per step {r['step_s'] / full['step_s']:.2f}")


if __name__ == "__main__":
    main()
