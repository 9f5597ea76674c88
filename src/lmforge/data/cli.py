"""`lmforge data list | prepare`: their arguments and what they run.

    lmforge data list
    lmforge data prepare --input kjv python-docs --tokenizer runs/tok --out runs/data
"""
from __future__ import annotations

import time

from lmforge.verbs import Verb, add_source_options, no_arguments


# ---- list -----------------------------------------------------------------------------------------------
def cmd_list(args) -> int:
    """`lmforge data list`: the built-in corpora, then the built-in instruction sources, as aligned tables."""
    from lmforge.data.corpus import list_builtins

    rows, builtins = [("NAME", "WHAT", "DOCS", "SIZE", "SOURCE (LICENSE)")], list_builtins()
    for b in builtins:
        if b["available"]:
            docs, size = f"{b['documents']:,}", _human(b["approx_bytes"])
        else:
            docs, size = "-", "not installed"
        rows.append((b["name"], b["description"], docs, size, f"{b['source']} ({b['license']})"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.rjust(w) if i in (2, 3) and r is not rows[0] else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip())
    for b in builtins:
        if not b["available"]:
            print(f"{b['name']}: {b['error']}")
    print()
    _list_instruction_sources()
    return 0


def _list_instruction_sources() -> None:
    """The built-in instruction sources and task families (lmforge.data.tasks), as a second table."""
    from lmforge.data.tasks import list_sources

    rows, sources = [("NAME", "KIND", "SIZE", "WHAT")], list_sources()
    for s in sources:
        kind = "task (with scorer)" if s["scorer"] else "instruction (no scorer)"
        size = s["size"] if isinstance(s["size"], str) else \
            f"{s['size']:,} conversations" if s["size"] is not None else "not installed"
        rows.append((s["name"], kind, size, s["description"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    for s in sources:
        if s["error"]:
            print(f"{s['name']}: {s['error']}")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ---- prepare --------------------------------------------------------------------------------------------
def prepare_arguments(p) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="built-in corpus name or a file/directory (.txt .md .jsonl .parquet)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents held out (default 0.1)")
    p.add_argument("--split", default="random", choices=["random", "tail"],
                   help="random documents (seeded) or the last documents of each source (default: random)")
    p.add_argument("--seed", type=int, default=0, help="seed for the train/val document split")
    add_source_options(p)


def cmd_prepare(args) -> int:
    """`lmforge data prepare --input SRC... --tokenizer DIR --out DIR`: write shards, print a summary."""
    from lmforge.data.corpus import Corpus
    from lmforge.data.shards import SPLITS, check_options, prepare_shards
    from lmforge.tokenizer.tokenizer import Tokenizer

    check_options(args.val_fraction, args.out, args.split)  # bad options fail before reading anything
    corpus = Corpus(args.input, text_field=args.text_field, skip_bad_lines=args.skip_bad_lines)
    tokenizer = Tokenizer.load(args.tokenizer)
    t0 = time.time()
    meta = prepare_shards(corpus, tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                          split=args.split)
    seconds = time.time() - t0
    print(f"wrote {args.out}/ (train.bin, val.bin, meta.json; {meta['dtype']}) in {seconds:.1f} s")
    rows = [("split", "docs", "tokens", "bytes", "bytes/token")]
    for split in SPLITS:
        s = meta[split]
        rows.append((split, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}",
                     f"{s['bytes'] / max(s['tokens'], 1):.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    if meta["single_document_split"]:
        print("note: the corpus is a single document; its tail was held out as val")
    return 0


VERBS = [
    Verb(("data", "list"), "list the built-in corpora, instruction sources and task families", no_arguments, cmd_list),
    Verb(("data", "prepare"), "tokenize a corpus into train.bin / val.bin / meta.json", prepare_arguments,
         cmd_prepare),
]
