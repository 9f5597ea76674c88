"""`lmforge eval ...`: their arguments and what they run."""
from __future__ import annotations

from lmforge.errors import ConfigError
from lmforge.verbs import Verb, add_device_option, positive_int


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


VERBS = [
    Verb(("eval", "bpb"), "bits per byte over a whole validation split", bpb_arguments, cmd_bpb),
]
