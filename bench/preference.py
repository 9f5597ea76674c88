"""Preference and RL stages from one SFT checkpoint, on a task with a verifier: every number of the README's table.

    python bench/preference.py --checkpoint runs/quickstart/sft [--work DIR]

The task is the calculator task of the quickstart's SFT data (`arithmetic:digits=3,tools=true`: the model answers
"What is 687 + 945?" by calling the calculator and reading its result); its mistakes are operands copied wrong into
the call. From the SFT checkpoint, each through its own CLI verb:

  1. reward model   `lmforge reward train` on built-in pairs (a demonstration's turn vs the same turn with an
                    operand miscopied): held-out pair accuracy on pairs from the eval split;
  2. DPO            `lmforge dpo` on built-in pairs, half of them the SFT model's OWN turns (a right one vs a
                    wrong one of the same problem): held-out implicit-reward accuracy and greedy accuracy;
  3. GRPO           `lmforge grpo --reward verifier` (tool-using episodes) for a fixed number of steps: its
                    wall time, and greedy accuracy before/after (the curve from its periodic evaluation);
  4. PPO            `lmforge ppo --reward-model RM`: the reward model's mean score of greedy held-out answers
                    before/after, the KL it ended at, the verifier's accuracy;
  5. best-of-8      8 sampled turns per held-out problem, one picked by: the first sample (best-of-1), the
                    reward model, the verifier (pass@8), mean log-prob, self-consistency.

Held-out problems are the task's eval split (problems are split by a hash of their text, so no training problem is
among them), the same problems for every model. Timings are wall-clock on the machine at hand.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TASK = "arithmetic:digits=3,tools=true"
THREADS = 2
# each stage's settings (KEY=VALUE as on the command line), chosen by measuring on a 2-core CPU
REWARD = ["pairs_n=4000", "train.max_steps=300", "train.lr=3e-4", "train.eval_every=100"]
DPO = ["own_fraction=0.5", "own_samples=4", "own_max_tokens=48", "pairs_n=1000", "val_n=200",
       "train.max_steps=100", "train.lr=1e-5", "train.eval_every=50"]
GRPO = ["prompts_per_step=16", "group_size=8", "max_new_tokens=48", "temperature=1.2", "train.lr=1e-4",
        "train.max_steps=30", "train.eval_every=10", "val_n=200"]
PPO = ["prompts_per_step=32", "max_new_tokens=48", "ppo_epochs=2", "num_mini_batches=2", "kl_coef=0.05",
       "train.lr=3e-5", "train.max_steps=40", "train.eval_every=20", "val_n=100"]
BEST_OF = 8


def run_verb(argv: list[str]) -> float:
    """Run an lmforge verb in this process; its wall time. A failure stops the bench."""
    from lmforge.cli import main
    t0 = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"lmforge {' '.join(argv)} exited {rc}")
    return time.perf_counter() - t0


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def greedy_turns(model, tok, fam, problems, max_tokens: int = 48) -> list[list[dict]]:
    from lmforge.infer.assistant import run_chat_turns
    from lmforge.infer.sampling import SamplingParams
    names = [t["function"]["name"] for t in fam.tools]
    return run_chat_turns(model, tok, [p.messages for p in problems], names,
                          SamplingParams(temperature=0.0, max_tokens=max_tokens), max_batch=64)


def judge(path, fam, problems, rm) -> dict:
    """Greedy held-out accuracy (the verifier) and the reward model's mean score of the same answers."""
    import lmforge
    model, tok = lmforge.load(path, device="cpu")
    turns = greedy_turns(model, tok, fam, problems)
    acc = sum(fam.score(p, t[-1].get("content") or "") >= 1.0 for p, t in zip(problems, turns)) / len(problems)
    scores = rm.rewards([p.messages for p in problems], turns, fam.tools)
    return {"accuracy": acc, "rm_score": sum(scores) / len(scores)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the SFT run (e.g. runs/quickstart/sft)")
    ap.add_argument("--work", default="runs/bench-preference", help="where the runs are written")
    ap.add_argument("--n", type=int, default=300, help="held-out problems")
    ap.add_argument("--seed", type=int, default=1, help="which held-out problems")
    ap.add_argument("--only", nargs="+", choices=["reward", "dpo", "grpo", "ppo", "best_of"],
                    help="run only these (the others are read from --work)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    import lmforge
    from lmforge.data.tasks import family
    from lmforge.eval.best_of import evaluate_best_of
    from lmforge.infer.reward import RewardModel

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sft = args.checkpoint
    fam = family(TASK)
    problems = fam.problems("eval", args.n, args.seed)
    todo = set(args.only or ["reward", "dpo", "grpo", "ppo", "best_of"])
    walls = {}
    common = ["--checkpoint", sft]

    def stage(name, argv):
        out = work / name
        if name in todo:
            walls[name] = run_verb([*argv, "--out", str(out)])
        return out

    rm_run = stage("reward", ["reward", "train", *common, "--data", TASK, *REWARD])
    dpo_run = stage("dpo", ["dpo", *common, "--data", TASK, *DPO])
    grpo_run = stage("grpo", ["grpo", *common, "--task", TASK, "--reward", "verifier", *GRPO])
    ppo_run = stage("ppo", ["ppo", *common, "--task", TASK, "--reward-model", str(rm_run), *PPO])

    rm = RewardModel(*lmforge.load(rm_run, device="cpu"))
    rows = {name: judge(path, fam, problems, rm) for name, path in
            (("SFT", sft), ("SFT + DPO", dpo_run), ("SFT + GRPO", grpo_run), ("SFT + PPO", ppo_run))}

    best = None
    if "best_of" in todo or not (work / "best_of.json").exists():
        model, tok = lmforge.load(sft, device="cpu")
        best = evaluate_best_of(model, tok, fam, problems, BEST_OF, temperature=1.0, max_tokens=48, seed=args.seed,
                                scorers={"reward model": lambda prompts, replies: rm.rewards(prompts, replies,
                                                                                            fam.tools)})
        (work / "best_of.json").write_text(json.dumps(best["accuracy"], indent=1))
    best_acc = best["accuracy"] if best else json.loads((work / "best_of.json").read_text())

    rm_sum, dpo_sum, grpo_sum, ppo_sum = (summary(r) for r in (rm_run, dpo_run, grpo_run, ppo_run))
    curve = [(m["step"], m["val_accuracy"]) for m in metrics(grpo_run) if "val_accuracy" in m]
    ppo_kl = [m["kl"] for m in metrics(ppo_run) if "kl" in m]
    print(f"\ntask {TASK}: {len(problems)} held-out problems (eval split, seed {args.seed}), greedy, "
          f"48-token replies, {THREADS} threads")
    print(f"{'model':<12} {'accuracy':>9} {'RM score':>9}")
    for name, r in rows.items():
        print(f"{name:<12} {100 * r['accuracy']:8.1f}% {r['rm_score']:9.3f}")
    print(f"\nreward model: held-out pair accuracy {100 * rm_sum['val_accuracy']:.1f}% "
          f"({rm_sum['val_pairs']} pairs), {rm_sum['step']} steps, {rm_sum['train_time']:.0f} s of training")
    print(f"DPO: held-out implicit-reward accuracy {100 * dpo_sum['val_rewards/accuracies']:.1f}%, "
          f"{dpo_sum['step']} steps, {dpo_sum['train_time']:.0f} s of training")
    print(f"GRPO: {grpo_sum['step']} steps in {grpo_sum['train_time']:.0f} s of training "
          f"({grpo_sum['wall_time']:.0f} s wall with its evaluations); its held-out greedy accuracy by step: "
          + ", ".join(f"{s}: {100 * a:.1f}%" for s, a in curve)
          + f" (before: {100 * grpo_sum['val_accuracy_before']:.1f}%)")
    print(f"PPO: {ppo_sum['step']} steps in {ppo_sum['train_time']:.0f} s; KL(policy||SFT) per answer at the end "
          f"{ppo_kl[-1]:.3f} (sum over its tokens)")
    print(f"best-of-{BEST_OF} (temperature 1, the same samples for every rule):")
    for k, v in best_acc.items():
        print(f"  {k:<17} {100 * v:5.1f}%")
    if walls:
        print("wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()))


if __name__ == "__main__":
    main()
