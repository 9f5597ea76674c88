"""The training stages' verbs: pretrain, distill, sft, reward train|score, dpo, grpo, ppo.

    lmforge pretrain --data runs/data --out runs/pretrain model.preset=cpu-small train.max_steps=500
    torchrun --nproc_per_node=8 -m lmforge pretrain --data runs/data --out runs/pretrain   # DDP (or FSDP)
    lmforge distill --teacher runs/pretrain --data runs/data --out runs/student model.preset=tiny distill.loss=fkl
    lmforge distill --teacher runs/sft --sequence --data chatterbot --out runs/student-chat init_from=runs/small
    lmforge sft --checkpoint runs/pretrain --data chats.jsonl arithmetic:digits=2 --out runs/sft train.max_steps=300
    lmforge reward train --checkpoint runs/sft --data arithmetic:digits=2 --out runs/rm train.max_steps=200
    lmforge reward score --checkpoint runs/rm --data pairs.jsonl
    lmforge dpo --checkpoint runs/sft --data pairs.jsonl --out runs/dpo --loss sigmoid --beta 0.1
    lmforge grpo --checkpoint runs/sft --task arithmetic:digits=2 --reward verifier --out runs/grpo
    lmforge ppo --checkpoint runs/sft --reward-model runs/rm --task arithmetic:digits=2 --out runs/ppo
"""
from __future__ import annotations

from lmforge.verbs import Verb, positive_float


def pretrain_arguments(p) -> None:
    p.add_argument("--recipe", default=None, help="YAML recipe (keys of PretrainConfig)")
    p.add_argument("--data", default=None, metavar="DIR", help="token shards (lmforge data prepare)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer (default: DATA/tokenizer)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same as train.resume=true)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. model.preset=cpu-small train.max_steps=500 train.lr=3e-3")


def cmd_pretrain(args) -> int:
    from lmforge.config import load_config
    from lmforge.stages.pretrain import PretrainConfig, run_pretrain

    over = list(args.overrides)
    for flag, key in ((args.data, "data"), (args.tokenizer, "tokenizer"), (args.out, "train.out_dir")):
        if flag:
            over.insert(0, f"{key}={flag}")
    if args.resume:
        over.append("train.resume=true")
    pcfg = load_config(PretrainConfig, args.recipe, over)
    s = run_pretrain(pcfg)
    print(f"pretrain: {s['step']} steps, {s['tokens']:,} tokens in {s['train_time']:.1f}s "
          f"({s['tokens'] / max(s['train_time'], 1e-9):,.0f} tok/s, {s['precision']}); "
          f"val loss {s.get('val_loss', float('nan')):.4f}, val bpb {s.get('val_bpb', float('nan')):.4f}; "
          f"checkpoint {s['checkpoint']}")
    return 0


def distill_arguments(p) -> None:
    p.add_argument("--teacher", required=True, metavar="RUN", help="the teacher: a checkpoint or run directory "
                   "(or a Hugging Face model directory)")
    p.add_argument("--data", nargs="+", default=None, metavar="SRC",
                   help="token shards made with the teacher's tokenizer (logit distillation); with --sequence, "
                        "conversation sources: JSONL files and/or built-ins (chatterbot, arithmetic:digits=N, ...)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory of the student (train.out_dir)")
    p.add_argument("--sequence", action="store_true",
                   help="sequence-level distillation: the teacher answers the prompts of --data and the student is "
                        "fine-tuned on its replies (same as sequence=true)")
    p.add_argument("--recipe", default=None, help="YAML recipe (keys of DistillConfig)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same as train.resume=true)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. model.preset=tiny distill.loss=fkl|rkl|jsd distill.temperature=2 distill.alpha=0.5 "
                        "distill.beta=0.5 train.max_steps=300; with --sequence: generate.prompts=500 "
                        "generate.max_new_tokens=128 sft={val_fraction: 0.1}")


def cmd_distill(args) -> int:
    import lmforge
    from lmforge.config import load_config
    from lmforge.stages.distill import DistillConfig, run_distill

    data, over = data_and_overrides(args, sequence="sequence=true")
    dcfg = load_config(DistillConfig, args.recipe, over)
    dcfg.teacher = args.teacher
    dcfg.data = data or dcfg.data
    teacher, tok = lmforge.load(dcfg.teacher, device="cpu")   # the trainer moves it with the student
    s = run_distill(dcfg, teacher, tok)
    if dcfg.sequence:
        r = s.get("teacher_replies")
        print(f"distill (sequence): {r['kept']} of {r['prompts']} teacher replies kept; " if r else
              "distill (sequence): resumed on the teacher's replies; ", end="")
        print(f"sft {s['step']} steps on {s['train_conversations']:,} conversations, {s['tokens']:,} tokens in "
              f"{s['train_time']:.1f}s; student {s['params']['total']:,} parameters, val loss "
              f"{s.get('val_loss', float('nan')):.4f}; teacher {s['teacher_params']['total']:,} parameters; "
              f"data {s['teacher_data']}; checkpoint {s['checkpoint']}")
        for q, a in s.get("answers", []):
            print(f"  {q!r} -> {a!r}")
        return 0
    print(f"distill: {s['step']} steps, {s['tokens']:,} tokens in {s['train_time']:.1f}s "
          f"({s['tokens'] / max(s['train_time'], 1e-9):,.0f} tok/s, {s['precision']}); student "
          f"{s['params']['total']:,} parameters, val bpb {s.get('val_bpb', float('nan')):.4f}; teacher "
          f"{s['teacher_params']['total']:,} parameters, val bpb {s.get('teacher_val_bpb', float('nan')):.4f}; "
          f"checkpoint {s['checkpoint']}")
    return 0


def sft_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="BASE",
                   help="the base model: an lmforge checkpoint or run directory, or a Hugging Face model directory")
    p.add_argument("--data", nargs="+", default=None, metavar="SRC",
                   help="JSONL files of conversations ({messages: [...]} or {prompt, completion} rows) and/or "
                        "built-in sources (arithmetic[:digits=N], chatterbot[:LANG], rg:NAME; see lmforge data list)")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (train.out_dir)")
    p.add_argument("--recipe", default=None, help="YAML recipe (keys of SFTConfig)")
    p.add_argument("--truncate", action="store_true",
                   help="cut conversations longer than the context instead of refusing them (same as truncate=true)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same as train.resume=true)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. train.max_steps=300 train.lr=3e-4 train.batch_size=16 val_fraction=0.05 source_n=5000")


_OVERRIDE = r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*="


def data_and_overrides(args, **flags) -> tuple[list[str], list[str]]:
    """(data sources, config overrides) of a verb with `--data SRC...` and KEY=VALUE words. argparse gives --data
    the KEY=VALUE words after it too: a word with a bare dotted-key prefix is an override (a source's own options
    look like NAME:KEY=VALUE, a file has no such prefix). --out, --resume and the boolean flags named in `flags`
    (flag -> override) become overrides as well."""
    import re
    data = list(args.data or [])
    over = [d for d in data if re.match(_OVERRIDE, d)] + list(args.overrides)
    data = [d for d in data if not re.match(_OVERRIDE, d)]
    if args.out:
        over.insert(0, f"train.out_dir={args.out}")
    over += [o for flag, o in flags.items() if getattr(args, flag)]
    if args.resume:
        over.append("train.resume=true")
    return data, over


def cmd_sft(args) -> int:
    import lmforge
    from lmforge.config import load_config
    from lmforge.stages.sft import SFTConfig, run_sft

    data, over = data_and_overrides(args, truncate="truncate=true")
    cfg = load_config(SFTConfig, args.recipe, over)
    cfg.checkpoint = args.checkpoint
    cfg.data = data or cfg.data
    model, tok = lmforge.load(cfg.checkpoint, device="cpu")   # the trainer moves it to the device
    s = run_sft(cfg, model, tok, base=cfg.checkpoint)
    val = f"val loss {s['val_loss']:.4f}" if "val_loss" in s else "no held-out data"
    print(f"sft: {s['step']} steps on {s['train_conversations']:,} conversations ({s['val_conversations']:,} held "
          f"out), {s['tokens']:,} tokens in {s['train_time']:.1f}s ({s['tokens'] / max(s['train_time'], 1e-9):,.0f} "
          f"tok/s, {s['precision']}); {100 * s['assistant_fraction']:.0f}% of tokens trained (assistant); "
          f"{val}; checkpoint {s['checkpoint']}")
    for q, a in s.get("answers", []):
        print(f"  {q!r} -> {a!r}")
    return 0


def _common(p, data_help: str) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="the model to start from: an lmforge checkpoint or run directory, or a Hugging Face model "
                        "directory")
    p.add_argument("--data", nargs="+", default=None, metavar="SRC", help=data_help)
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (train.out_dir)")
    p.add_argument("--recipe", default=None, help="YAML recipe (keys of the stage's config)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same as train.resume=true)")


PAIRS_HELP = ("preference JSONL files ({prompt, chosen, rejected} rows, strings or message lists) and/or "
              "built-in task families (arithmetic:digits=2,...): correct vs wrong answers")


def reward_train_arguments(p) -> None:
    _common(p, PAIRS_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. train.max_steps=200 train.lr=3e-4 pairs_n=4000 val_n=200 use_margin=false")


def cmd_reward_train(args) -> int:
    import lmforge
    from lmforge.config import load_config
    from lmforge.stages.reward import RewardConfig, run_reward_train

    data, over = data_and_overrides(args)
    cfg = load_config(RewardConfig, args.recipe, over)
    cfg.checkpoint, cfg.data = args.checkpoint, data or cfg.data
    model, tok = lmforge.load(cfg.checkpoint, device="cpu")
    s = run_reward_train(cfg, model, tok, base=cfg.checkpoint)
    val = (f"held-out pair accuracy {100 * s['val_accuracy']:.1f}%, margin {s['val_margin']:.3f}"
           if "val_accuracy" in s else "no held-out pairs")
    print(f"reward train: {s['step']} steps on {s['train_pairs']:,} pairs ({s['val_pairs']:,} held out) in "
          f"{s['train_time']:.1f}s; {val}; checkpoint {s['checkpoint']}")
    return 0


def reward_score_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RM", help="a reward model (lmforge reward train)")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="JSONL: preference rows (both sides scored) or {prompt, completion} rows")
    p.add_argument("--json", action="store_true", help="print one JSON object per row")


def cmd_reward_score(args) -> int:
    import json

    import lmforge
    from lmforge.stages.reward import RewardModel, score_file, summarize_scores

    rm = RewardModel(*lmforge.load(args.checkpoint, device="cpu"))
    rows = score_file(rm, args.data)
    for r in rows:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        elif "reward" in r:
            print(f"{r['line']:>6}  {r['reward']:+.4f}  {r['prompt'][:60]!r}")
        else:
            print(f"{r['line']:>6}  chosen {r['reward_chosen']:+.4f}  rejected {r['reward_rejected']:+.4f}  "
                  f"{'✓' if r['prefers_chosen'] else '✗'}  {r['prompt'][:50]!r}")
    if not args.json:
        print(summarize_scores(rows))
    return 0


def dpo_arguments(p) -> None:
    _common(p, PAIRS_HELP)
    p.add_argument("--loss", default=None, choices=["sigmoid", "ipo", "hinge", "robust"],
                   help="sigmoid (DPO, default), ipo, hinge (SLiC), robust (label noise; with label_smoothing=E)")
    p.add_argument("--beta", type=positive_float, default=None, help="strength of the tie to the reference "
                   "(default 0.1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. train.max_steps=200 train.lr=1e-5 label_smoothing=0.1 pairs_n=4000")


def cmd_dpo(args) -> int:
    import lmforge
    from lmforge.config import load_config
    from lmforge.stages.dpo import DPOConfig, run_dpo

    data, over = data_and_overrides(args)
    over += [f"loss={args.loss}"] * (args.loss is not None) + [f"beta={args.beta}"] * (args.beta is not None)
    cfg = load_config(DPOConfig, args.recipe, over)
    cfg.checkpoint, cfg.data = args.checkpoint, data or cfg.data
    model, tok = lmforge.load(cfg.checkpoint, device="cpu")
    s = run_dpo(cfg, model, tok, base=cfg.checkpoint)
    val = (f"held-out implicit-reward accuracy {100 * s['val_rewards/accuracies']:.1f}%, margin "
           f"{s['val_rewards/margins']:.3f}" if "val_rewards/accuracies" in s else "no held-out pairs")
    print(f"dpo ({cfg.loss}, beta {cfg.beta:g}): {s['step']} steps on {s['train_pairs']:,} pairs in "
          f"{s['train_time']:.1f}s; {val}; checkpoint {s['checkpoint']}")
    return 0


def _accuracy_change(s: dict) -> str:
    """'held-out greedy accuracy A% -> B%; ' of an RL run's summary (empty without held-out problems)."""
    if s.get("val_accuracy") is None:
        return ""
    before = s.get("val_accuracy_before")
    return (f"held-out greedy accuracy {100 * before:.1f}% -> " if before is not None else
            "held-out greedy accuracy ") + f"{100 * s['val_accuracy']:.1f}%; "


def grpo_arguments(p) -> None:
    rl_arguments(p, "GRPOConfig", task_help="a built-in task family: its training problems are the prompts, its "
                                            "scorer the verifier",
                 prompts_help='prompt JSONL ({"prompt": ..., other keys go to the reward functions})',
                 example="group_size=8 prompts_per_step=8 max_new_tokens=32 beta=0.04 loss_type=dapo "
                         "num_iterations=2 train.max_steps=100 train.lr=1e-5")
    p.add_argument("--reward", default=None, metavar="SPEC",
                   help="verifier | a reward model directory | module:function, comma-separated for several "
                        "(weights: reward_weights=[...]); default verifier")


def rl_arguments(p, config: str, *, task_help: str, prompts_help: str, example: str) -> None:
    """The arguments grpo and ppo share: the policy, where the prompts come from, the run."""
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="the policy to start from (an SFT model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None, metavar="NAME", help=task_help)
    src.add_argument("--prompts", default=None, metavar="FILE", help=prompts_help)
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (train.out_dir)")
    p.add_argument("--recipe", default=None, help=f"YAML recipe (keys of {config})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same as train.resume=true)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"e.g. {example}")


def rl_config(args, config_class):
    """The verb's config: recipe and KEY=VALUE overrides, then the checkpoint and prompt source flags."""
    from lmforge.config import load_config

    args.data = None
    _, over = data_and_overrides(args)
    cfg = load_config(config_class, args.recipe, over)
    cfg.checkpoint = args.checkpoint
    if args.task or args.prompts:
        cfg.task, cfg.prompts = args.task, args.prompts
    return cfg


def cmd_grpo(args) -> int:
    import lmforge
    from lmforge.stages.grpo import GRPOConfig, run_grpo

    cfg = rl_config(args, GRPOConfig)
    if args.reward:
        cfg.reward = [s for s in args.reward.split(",") if s]
    model, tok = lmforge.load(cfg.checkpoint, device="cpu")
    s = run_grpo(cfg, model, tok, base=cfg.checkpoint, load_model=lambda path: lmforge.load(path, device="cpu"))
    acc = _accuracy_change(s)
    print(f"grpo: {s['step']} steps in {s['train_time']:.1f}s, mean reward {s.get('reward', float('nan')):.3f}; "
          f"{acc}checkpoint {s['checkpoint']}")
    return 0


def ppo_arguments(p) -> None:
    rl_arguments(p, "PPOConfig", task_help="a built-in task family: its training problems are the prompts (its "
                                           "verifier's accuracy is logged)",
                 prompts_help='prompt JSONL ({"prompt": ...})',
                 example="kl_coef=0.05 ppo_epochs=4 num_mini_batches=2 prompts_per_step=32 vf_coef=0.1 "
                         "train.max_steps=64 train.lr=1e-5")
    p.add_argument("--reward-model", default=None, metavar="RM", help="a reward model (lmforge reward train)")


def cmd_ppo(args) -> int:
    import lmforge
    from lmforge.stages.ppo import PPOConfig, run_ppo

    cfg = rl_config(args, PPOConfig)
    cfg.reward_model = args.reward_model or cfg.reward_model
    model, tok = lmforge.load(cfg.checkpoint, device="cpu")
    s = run_ppo(cfg, model, tok, base=cfg.checkpoint, load_model=lambda path: lmforge.load(path, device="cpu"))
    acc = _accuracy_change(s)
    print(f"ppo: {s['step']} steps in {s['train_time']:.1f}s, reward-model score {s.get('score', float('nan')):.3f}, "
          f"KL {s.get('kl', float('nan')):.3f}; {acc}checkpoint {s['checkpoint']}")
    return 0


VERBS = [
    Verb(("pretrain",), "pretrain a Transformer on token shards (torchrun-aware: DDP/FSDP)", pretrain_arguments,
         cmd_pretrain),
    Verb(("distill",), "train a small student from a teacher: its next-token distributions, or its replies "
                       "(--sequence)",
         distill_arguments, cmd_distill),
    Verb(("sft",), "supervised fine-tuning for chat on conversations (loss on the assistant's tokens only)",
         sft_arguments, cmd_sft),
    Verb(("reward", "train"), "train a reward model (a score head on the SFT model) on preference pairs",
         reward_train_arguments, cmd_reward_train),
    Verb(("reward", "score"), "score replies (or both sides of preference pairs) with a reward model",
         reward_score_arguments, cmd_reward_score),
    Verb(("dpo",), "direct preference optimisation on pairs (sigmoid, IPO, hinge, robust losses), no reward model",
         dpo_arguments, cmd_dpo),
    Verb(("grpo",), "reinforcement learning with group-relative advantages on checkable rewards (a verifier, a "
                    "reward model, your function)", grpo_arguments, cmd_grpo),
    Verb(("ppo",), "RLHF with PPO: a reward model's score, a KL penalty to the start, a value head, GAE",
         ppo_arguments, cmd_ppo),
]
