"""Logit distillation vs hard labels alone, at equal steps: does the teacher's distribution help a small student?

Two runs of `lmforge distill` that differ only in distill.alpha: alpha = 0 trains on the next token alone (plain
pretraining: the teacher is never consulted), alpha > 0 mixes in the teacher's distribution. Same student config
and initialisation (train.seed), same batches (a pure function of the seed and step), same steps and schedule.
Prints the val bits/byte of both students and of the teacher, on the whole val split of the shards.

    lmforge quickstart --out runs/quickstart            # a teacher and its shards (or any pretrain run)
    python bench/distill.py --teacher runs/quickstart/pretrain --data runs/quickstart/data --out runs/distill-bench

Any further KEY=VALUE goes to both runs (e.g. train.max_steps=300 model.overrides='{d_model: 96}').
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from lmforge.cli import main as lmforge_main

# the student and budget: a 2-layer, d_model-128 llama-style model; 120 steps of 8 x seq_len tokens, one thread
STUDENT = ["model.preset=tiny", "model.overrides={d_model: 128, n_head: 4, n_kv_heads: 2}",
           "train.max_steps=120", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=10",
           "train.log_every=20", "train.max_time=null", "train.seed=0", "train.threads=1", "eval_tokens=16384"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="teacher checkpoint or run directory")
    ap.add_argument("--data", required=True, help="token shards made with the teacher's tokenizer")
    ap.add_argument("--out", required=True, help="directory for the two student runs")
    ap.add_argument("--loss", default="fkl", choices=["fkl", "rkl", "jsd"])
    ap.add_argument("--temperature", type=float, default=2.0,
                    help="softens both distributions (Hinton); at 1.0 this bench measured no gain over hard labels")
    ap.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term in the KD run")
    ap.add_argument("--beta", type=float, default=0.5, help="jsd only")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="passed to both runs")
    args = ap.parse_args()

    out = Path(args.out)
    runs = {"hard labels (alpha=0)": ["distill.alpha=0"],
            f"KD {args.loss} (alpha={args.alpha}, T={args.temperature})":
                [f"distill.alpha={args.alpha}", f"distill.loss={args.loss}",
                 f"distill.temperature={args.temperature}", f"distill.beta={args.beta}"]}
    results = {}
    for i, (name, extra) in enumerate(runs.items()):
        run_dir = out / ("hard" if i == 0 else "kd")
        argv = ["distill", "--teacher", args.teacher, "--data", args.data, "--out", str(run_dir), *STUDENT,
                *extra, *args.overrides]
        print(f"== {name}: lmforge {shlex.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = lmforge_main(argv)
        if rc:
            raise SystemExit(rc)
        s = json.loads((run_dir / "summary.json").read_text())
        results[name] = {"val_bpb": s["val_bpb"], "val_loss": s["val_loss"], "steps": s["step"],
                         "tokens": s["tokens"], "train_time": s["train_time"], "wall": time.perf_counter() - t0,
                         "params": s["params"]["total"], "teacher_val_bpb": s["teacher_val_bpb"],
                         "teacher_params": s["teacher_params"]["total"]}

    first = next(iter(results.values()))
    print(f"\nteacher: {first['teacher_params']:,} parameters, val {first['teacher_val_bpb']:.4f} bits/byte")
    print(f"student: {first['params']:,} parameters, {first['steps']} steps, {first['tokens']:,} tokens\n")
    print(f"{'run':<40} {'val bits/byte':>13} {'val loss':>9} {'train s':>8}")
    for name, r in results.items():
        print(f"{name:<40} {r['val_bpb']:>13.4f} {r['val_loss']:>9.4f} {r['train_time']:>8.1f}")
    hard, kd = (r["val_bpb"] for r in results.values())
    print(f"\nKD - hard labels: {kd - hard:+.4f} bits/byte ({'lower' if kd < hard else 'NOT lower'} with the teacher)")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
