"""Muon vs AdamW at equal steps on the trainer test driver's synthetic task (tests/train_driver.py).

Same model init, same batches, same schedule (warmup 5, cosine to 0.1x); only the optimizer differs. With
optimizer=muon, `lr` is AdamW's (embeddings, head, norms) and `muon_lr` Muon's (hidden matrices). Prints final
train loss (mean of the last 5 steps), val loss, and seconds per step. Tiny by design (~1 minute on 1 thread):

    OMP_NUM_THREADS=1 python bench/muon.py [--d-model 256] [--steps 50]

The task: successor rule x -> 7x+3 mod 60 with 10% uniform noise, so the best achievable loss is ≈ 0.75 nats.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.synthetic import BOS, VOCAB, successor_stream
from lmforge.model.config import get_preset
from lmforge.model.transformer import Transformer
from lmforge.stages.pretrain import PretrainTask
from lmforge.train.metrics import read_metrics
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train


def run(d_model: int, steps: int, **opt) -> dict:
    torch.manual_seed(0)
    n_head = max(4, d_model // 64)
    mcfg = get_preset("tiny", vocab_size=VOCAB, n_layer=2, d_model=d_model, n_head=n_head, n_kv_heads=n_head // 2,
                      max_seq_len=32)
    model = Transformer(mcfg)
    token_bytes = np.ones(VOCAB, dtype=np.int64)
    token_bytes[BOS] = 0
    task = PretrainTask(successor_stream(200, 1), successor_stream(20, 2), seq_len=32, batch_size=8, bos_id=BOS,
                        token_bytes=token_bytes, seed=0, mode="packed", eval_tokens=1024, progress=False)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=steps, batch_size=8, warmup_steps=5, precision="fp32",
                          progress=False, log_every=1, seed=0, **opt)
        t0 = time.perf_counter()
        summary = train(model, task, cfg, checkpoint=CheckpointSpec(model_config=mcfg.to_dict()))
        dt = time.perf_counter() - t0
        losses = [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]
    return {"train": sum(losses[-5:]) / 5, "val": summary["val_loss"], "s_per_step": summary["train_time"] / steps,
            "wall": dt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, nargs="+", default=[256])
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    grid = [("adamw", dict(lr=3e-3)), ("adamw", dict(lr=1e-2)),
            ("muon", dict(lr=3e-3, muon_lr=0.02)), ("muon", dict(lr=1e-2, muon_lr=0.02)),
            ("muon", dict(lr=1e-2, muon_lr=0.05))]
    print(f"{'d_model':>7} {'optimizer':<9} {'lr':>7} {'muon_lr':>7} {'train':>7} {'val':>7} {'s/step':>7}")
    for d in args.d_model:
        best = {}
        for name, hp in grid:
            r = run(d, args.steps, optimizer=name, **hp)
            best[name] = min(best.get(name, float("inf")), r["val"])
            print(f"{d:>7} {name:<9} {hp['lr']:>7.0e} {hp.get('muon_lr', float('nan')):>7.2f} {r['train']:>7.3f} "
                  f"{r['val']:>7.3f} {r['s_per_step']:>7.3f}", flush=True)
        print(f"{d:>7} best val: adamw {best['adamw']:.3f}, muon {best['muon']:.3f}")


if __name__ == "__main__":
    main()
