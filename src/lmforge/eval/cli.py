"""`lmforge eval ...`: their arguments and what they run."""
from __future__ import annotations

from lmforge.errors import ConfigError
from lmforge.verbs import Verb, add_device_option, nonneg_int, positive_float, positive_int


def bpb_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--data", required=True, metavar="DIR", help="token shards (the val split is scored)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="window length (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="estimate from about N tokens in windows spread over the split")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="sliding window: windows every STRIDE tokens, each target scored once with >= seq_len - "
                        "STRIDE tokens of context (default: seq_len, no overlap)")
    add_device_option(p, help=None)


def cmd_bpb(args) -> int:
    from lmforge.data.shards import load_shards
    from lmforge.eval.bpb import evaluate_bpb, token_byte_lengths
    import lmforge
    from lmforge.runtime import autocast, detect_device, resolve_precision

    device = detect_device(args.device)
    model, tok = lmforge.load(args.checkpoint, device)
    train_tokens, val_tokens, meta = load_shards(args.data)
    tokens = val_tokens if args.split == "val" else train_tokens
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ConfigError(f"{seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}", field="--seq-len")
    if args.stride is not None and not 0 < args.stride <= seq_len:
        raise ConfigError(f"must be in 1..{seq_len} (the window length), got {args.stride}", field="--stride")
    with autocast(device, resolve_precision("auto", device)):
        res = evaluate_bpb(model, tokens, token_byte_lengths(tok), seq_len, args.batch_size,
                           max_tokens=args.max_tokens, progress=True, device=device, stride=args.stride)
    expected = _split_bytes(meta, args.split)
    note = ""
    if args.max_tokens is None and expected is not None and expected != res["bytes"]:
        note = f" (warning: targets cover {res['bytes']:,} bytes, meta.json says {expected:,})"
    print(f"{args.split}: {res['bpb']:.4f} bits/byte, {res['loss']:.4f} nats/token over {res['tokens']:,} tokens, "
          f"{res['bytes']:,} bytes{note}")
    return 0


def _split_bytes(meta: dict, split: str):
    try:
        return int(meta[split]["bytes"])
    except (KeyError, TypeError, ValueError):
        return None


# ---- task ---------------------------------------------------------------------------------------------------
def task_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--task", required=True, metavar="NAME",
                   help="a task family: arithmetic[:digits=N,ops=+-*,tools=true] or rg:NAME (see lmforge data list)")
    p.add_argument("--n", type=positive_int, default=200, help="held-out problems to score (default 200)")
    p.add_argument("--seed", type=int, default=0, help="which held-out problems (and the sampling seeds)")
    p.add_argument("--k", type=nonneg_int, default=4, help="sampled pass@k (default 4; 0: greedy only)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="sampled answers per problem for the pass@k estimate (default 2k, at least k)")
    p.add_argument("--temperature", type=positive_float, default=0.8, help="for sampled answers (default 0.8)")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="answer budget in tokens (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="answers decoded together (default 64)")
    p.add_argument("--best-of", type=positive_int, default=None, metavar="N",
                   help="also accuracy at N: N sampled answers per problem, one picked by each rule (first sample, "
                        "mean log-prob, the reward model, the verifier, self-consistency)")
    p.add_argument("--reward-model", default=None, metavar="RM", help="with --best-of: a reward model checkpoint "
                   "(lmforge reward train) as one more rule")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results (per problem) as JSON")
    add_device_option(p, help=None)


def cmd_task(args) -> int:
    from pathlib import Path

    import lmforge
    from lmforge.data.tasks import family
    from lmforge.errors import WriteError
    from lmforge.eval.task import evaluate_task, format_table
    from lmforge.io import write_json
    from lmforge.runtime import detect_device

    fam = family(args.task)                         # a bad name or option fails before the model loads
    if args.reward_model and not args.best_of:
        raise ConfigError("ranks the samples of --best-of N: give --best-of too", field="--reward-model")
    if args.samples is not None and args.samples < args.k:
        raise ConfigError(f"must be at least --k ({args.k}), got {args.samples}", field="--samples")
    if args.out is not None and Path(args.out).is_dir():
        raise WriteError("is a directory, expected a file name", file=args.out)
    device = detect_device(args.device)
    model, tok = lmforge.load(args.checkpoint, device)
    res = evaluate_task(model, tok, fam, args.n, args.seed, k=args.k, samples=args.samples,
                        temperature=args.temperature, max_tokens=args.max_tokens, batch_size=args.batch_size)
    res["checkpoint"] = str(args.checkpoint)
    print(format_table(res))
    if res["n"] < args.n:
        print(f"note: the eval split of {fam.name} holds only {res['n']} problems")
    if args.best_of:
        from lmforge.eval.best_of import evaluate_best_of, format_best_of
        scorers = {}
        if args.reward_model:
            from lmforge.infer.reward import RewardModel
            rm = RewardModel(*lmforge.load(args.reward_model, device))
            scorers["reward model"] = lambda prompts, replies: rm.rewards(prompts, replies, fam.tools)
        res["best_of"] = evaluate_best_of(model, tok, fam, fam.problems("eval", args.n, args.seed), args.best_of,
                                          scorers=scorers, temperature=args.temperature, max_tokens=args.max_tokens,
                                          seed=args.seed, batch_size=args.batch_size)
        print(format_best_of(res["best_of"]))
    if args.out is not None:
        write_json(args.out, res)
        print(f"wrote {args.out}")
    return 0


VERBS = [
    Verb(("eval", "bpb"), "bits per byte over a whole validation split", bpb_arguments, cmd_bpb),
    Verb(("eval", "task"), "accuracy on held-out problems of a task family (greedy, sampled pass@k)",
         task_arguments, cmd_task),
]
