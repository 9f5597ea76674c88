"""`lmforge tokenizer train | encode | stats`: their arguments and what they run.

    lmforge tokenizer train --input python-docs kjv --vocab-size 4096 --out runs/tok
    lmforge tokenizer encode --tokenizer runs/tok "How many r's are in strawberry?"
    lmforge tokenizer stats --tokenizer runs/tok notes.md chinese.jsonl
"""
from __future__ import annotations

import random
import sys
import time
from typing import TYPE_CHECKING

from lmforge.errors import ConfigError
from lmforge.verbs import Verb, add_source_options, clean_text, positive_int, read_stdin_text

if TYPE_CHECKING:
    from lmforge.tokenizer.tokenizer import Tokenizer

SAMPLE_DOCS, SAMPLE_DOC_CHARS = 1000, 100_000   # training-data sample used for the bytes/token figure
EXAMPLE_WORDS = [" strawberry", " tokenization", " 1234567", " 你好世界"]  # splits shown by `stats`

# background colours (xterm-256) cycled over tokens; black text on light backgrounds reads everywhere
_BG = [153, 223, 194, 217, 189, 229]


def render_tokens(tok: Tokenizer, ids: list[int], color: bool) -> str:
    """The text with token boundaries visible: coloured backgrounds on a terminal, `[tok][en]` otherwise.
    Newlines/tabs show as \\n, \\t; a token holding part of a UTF-8 character shows its bytes as \\xNN."""
    out = []
    for k, i in enumerate(ids):
        piece = tok.token_str(i).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
        out.append(f"\x1b[30;48;5;{_BG[k % len(_BG)]}m{piece}\x1b[0m" if color else f"[{piece}]")
    return "".join(out)


# ---- train ----------------------------------------------------------------------------------------------
def train_arguments(p) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="built-in corpus name or a file/directory (.txt .md .jsonl .parquet)")
    p.add_argument("--vocab-size", type=positive_int, required=True,
                   help="vocabulary size including 256 bytes and specials")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the tokenizer")
    p.add_argument("--pattern", default="gpt4",
                   help="pre-split regex: 'gpt4' (default), 'gpt2', or a regex of your own")
    p.add_argument("--min-frequency", type=positive_int, default=2, help="stop when the best pair occurs fewer times")
    add_source_options(p)


def cmd_train(args) -> int:
    from lmforge.data.corpus import Corpus
    from lmforge.io import check_replaceable_dir
    from lmforge.tokenizer.bpe import resolve_pattern
    from lmforge.tokenizer.stats import measure, total_of
    from lmforge.tokenizer.tokenizer import MODEL_FILE, SPECIAL_TOKENS, Tokenizer

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < min_vocab:
        raise ConfigError(f"{args.vocab_size} is too small: the vocabulary needs at least {min_vocab} entries "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens) plus the merges to learn",
                          field="--vocab-size")
    check_replaceable_dir(args.out, MODEL_FILE)  # before the corpus is read, not after training
    try:
        pattern = resolve_pattern(args.pattern)
        Tokenizer([], pattern)  # compile the regex now rather than after reading the whole corpus
    except ConfigError as e:
        raise ConfigError(e.message, field="--pattern") from None

    corpus = Corpus(args.input, text_field=args.text_field, skip_bad_lines=args.skip_bad_lines)
    sample: list[str] = []
    rng = random.Random(0)

    def docs():
        # reservoir sample of documents for the bytes/token figure, taken while the trainer streams
        for n, doc in enumerate(corpus.documents(progress=True)):
            if len(sample) < SAMPLE_DOCS:
                sample.append(doc[:SAMPLE_DOC_CHARS])
            elif (j := rng.randrange(n + 1)) < SAMPLE_DOCS:
                sample[j] = doc[:SAMPLE_DOC_CHARS]
            yield doc

    t0 = time.perf_counter()
    tok = Tokenizer.train(docs(), args.vocab_size, pattern=pattern, min_frequency=args.min_frequency,
                          progress=True)
    seconds = time.perf_counter() - t0
    stats = corpus.stats  # (a corpus without documents has raised DataError by now)
    tok.save(args.out)

    mb = stats.bytes / 1e6
    wanted = args.vocab_size - min_vocab
    print(f"tokenizer saved to {args.out}")
    print(f"  data         {stats.documents:,} documents, {mb:.2f} MB in {seconds:.1f} s "
          f"({mb / max(seconds, 1e-9):.2f} MB/s)")
    if getattr(stats, "bad_lines", 0):
        print(f"  skipped      {stats.bad_lines:,} malformed lines")
    print(f"  vocab        {tok.vocab_size:,} = 256 bytes + {tok.n_merges:,} merges + "
          f"{len(tok.special_tokens)} special tokens")
    if tok.n_merges < wanted:
        print(f"  note         learned {tok.n_merges:,} of {wanted:,} merges: no pair left that occurs "
              f"at least --min-frequency={args.min_frequency} times (vocab {tok.vocab_size:,}, "
              f"not {args.vocab_size:,})")
    counts = total_of(measure(tok, [("sample", sample)], progress=False)[0].values())
    print(f"  compression  {counts.bytes_per_token:.2f} bytes/token, {counts.chars_per_token:.2f} chars/token "
          f"on a {len(sample):,}-document sample of the training data")
    longest = sorted(range(256, 256 + tok.n_merges), key=lambda i: (-len(tok.id_to_bytes(i)), i))[:5]
    shown = [render_tokens(tok, [i], color=False) for i in longest]
    print("  longest      " + "  ".join(t if len(t) <= 32 else t[:30] + "…]" for t in shown))
    print(f"  hash         {tok.hash()[:16]}")
    return 0


# ---- encode ---------------------------------------------------------------------------------------------
def encode_arguments(p) -> None:
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("text", help="text to encode ('-' reads standard input)")


def cmd_encode(args) -> int:
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    text = read_stdin_text() if args.text == "-" else clean_text(args.text, "text")
    ids = tok.encode(text)
    nbytes = len(text.encode("utf-8"))
    print(f"ids ({len(ids)}): {ids}")
    print(render_tokens(tok, ids, color=sys.stdout.isatty()))
    per = f", {nbytes / len(ids):.2f} bytes/token" if ids else ""
    print(f"{len(ids)} tokens, {len(text)} chars, {nbytes} bytes{per}")
    return 0


# ---- stats ----------------------------------------------------------------------------------------------
def stats_arguments(p) -> None:
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("inputs", nargs="+", metavar="SRC")
    add_source_options(p)


def cmd_stats(args) -> int:
    from lmforge.data.corpus import Corpus
    from lmforge.tokenizer.stats import format_table, measure, pad, total_of
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    corpus = Corpus(args.inputs, text_field=args.text_field, skip_bad_lines=args.skip_bad_lines)
    # the corpus' own bar (MB/s, ETA) covers the pass; measuring happens as documents stream by
    per_file, per_script = measure(tok, corpus.iter_sources(progress=True), progress=False)
    total = total_of(per_file.values())
    print(f"tokenizer {args.tokenizer}: vocab {tok.vocab_size:,}, {tok.n_merges:,} merges\n")
    print(format_table("file", per_file, total))
    print("\n" + format_table("script", per_script))
    print("(per-script counts encode each run of one script on its own; see lmforge.tokenizer.stats)")
    print("\nhow some words split:")
    color = sys.stdout.isatty()
    for word in EXAMPLE_WORDS:
        ids = tok.encode(word)
        print(f"  {pad(repr(word), 16)} {len(ids):2} tokens  {render_tokens(tok, ids, color)}")
    return 0


VERBS = [
    Verb(("tokenizer", "train"), "train a byte-level BPE tokenizer", train_arguments, cmd_train),
    Verb(("tokenizer", "encode"), "show ids and token boundaries of a text", encode_arguments, cmd_encode),
    Verb(("tokenizer", "stats"), "bytes/token, chars/token and tokens per 1000 chars, per file and per script",
         stats_arguments, cmd_stats),
]
