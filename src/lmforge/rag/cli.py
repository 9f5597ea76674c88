"""`lmforge rag index | query | ask | eval`: their arguments and what they run.

index  sources (built-in corpora, files, directories) into one SQLite file; unchanged sources are skipped
query  ranked chunks for a question: bm25, dense or hybrid, optionally re-ranked by MMR (--json for a JSON list)
ask    retrieve, then answer with a checkpoint through the inference engine, citing the chunks as [n]
eval   recall@1/5/10 and MRR@10 of the three modes on the built-in labelled sets (table, --plot PNG, --json)

--embedder is `minilm` (all-MiniLM-L6-v2, the default) or a checkpoint directory (mean-pooled hidden states). An
index remembers its embedder: query, ask and eval use it without the flag, and refuse another.
"""
from __future__ import annotations

import json
import sys

from lmforge.errors import ConfigError
from lmforge.verbs import Verb, add_device_option, add_source_options, clean_text, nonneg_int, positive_int

MODES = ("bm25", "dense", "hybrid")      # lmforge.rag.retrieve.MODES (not imported here: the verb table is light)
SETS = ("kjv-cloze", "python-docs")      # lmforge.rag.evaluate.SETS


def _embedder_option(p) -> None:
    p.add_argument("--embedder", default=None, metavar="NAME|DIR",
                   help="minilm (all-MiniLM-L6-v2, default) or a checkpoint directory; an existing index's own "
                        "embedder by default")


def _mmr(text: str) -> float:
    import argparse
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return x


def _retrieval_options(p) -> None:
    p.add_argument("--db", required=True, metavar="FILE.sqlite", help="the index")
    p.add_argument("question", metavar="QUESTION", help="what to look for (at most 8 kB)")
    p.add_argument("--mode", default="hybrid", choices=MODES, help="bm25 | dense | hybrid (default: hybrid, RRF)")
    p.add_argument("-k", type=positive_int, default=5, help="how many chunks (default 5)")
    p.add_argument("--mmr", type=_mmr, default=None, metavar="LAMBDA",
                   help="re-rank for diversity by MMR with this lambda in [0, 1] (1 = relevance only)")
    _embedder_option(p)


def load_embedder(name: str | None, db: str | None = None, device: str = "cpu"):
    """The embedder named on the command line, else the one the index at `db` records; a checkpoint is loaded
    here (the front door), the library takes it as an object."""
    from pathlib import Path

    from lmforge.rag.embed import MINILM
    if name is None and db is not None and Path(db).is_file():
        from lmforge.rag.store import Store
        store = Store.open(db)
        recorded = store.embedder
        store.close()
        name = recorded.removeprefix("checkpoint:") if recorded else None
    if name is None or name == MINILM:
        return name
    import lmforge
    from lmforge import checkpoint
    from lmforge.interop.hf import is_hf_dir
    from lmforge.rag.embed import CheckpointEmbedder
    if not Path(name).is_dir():
        raise ConfigError(f"{name!r} is neither 'minilm' nor a checkpoint directory", field="embedder")
    path = Path(name) if is_hf_dir(name) else checkpoint.resolve(name)
    model, tok = lmforge.load(path, device=device)
    return CheckpointEmbedder(model, tok, name=f"checkpoint:{Path(path).resolve()}")


def _open(args, create: bool = False, **chunking):
    from lmforge.rag import Index
    embedder = load_embedder(args.embedder, args.db, getattr(args, "device", "cpu"))
    return Index(args.db, embedder, create=create, **chunking)


# ---- index ----------------------------------------------------------------------------------------------------
def index_arguments(p) -> None:
    p.add_argument("--input", required=True, nargs="+", metavar="SRC",
                   help="built-in corpora (kjv, python-docs, python-stdlib), files (.txt .md .jsonl .parquet) or "
                        "directories")
    p.add_argument("--db", required=True, metavar="FILE.sqlite", help="the index (made if missing)")
    _embedder_option(p)
    p.add_argument("--chunk-tokens", type=positive_int, default=None, metavar="N",
                   help="most tokens per chunk, in the embedder's tokens (default 128)")
    p.add_argument("--overlap", type=nonneg_int, default=None, metavar="M",
                   help="repeat up to M tokens of whole verses/paragraphs from the end of a chunk (default 0)")
    add_source_options(p)
    add_device_option(p)


def cmd_index(args) -> int:
    ix = _open(args, create=True, chunk_tokens=args.chunk_tokens, overlap=args.overlap)
    with ix:
        r = ix.add(args.input, text_field=args.text_field, skip_bad_lines=args.skip_bad_lines, progress_bar=True)
        for name, n in r.indexed:
            print(f"indexed {name}: {n:,} chunks")
        for name in r.skipped:
            print(f"unchanged {name}: skipped")
        for name in r.dropped:
            print(f"removed {name}: no longer in its directory")
        rate = f", {r.chunks_per_s:,.1f} chunks/s embedding" if r.chunks else ""
        print(f"{ix.path}: {ix.stats()['chunks']:,} chunks from {len(ix.stats()['sources'])} source(s), embedder "
              f"{ix.embedder.name} ({ix.embedder.dim} dims), {ix.chunk_tokens} tokens per chunk, overlap "
              f"{ix.overlap}; this run: {r.chunks:,} chunks written, {r.removed:,} replaced in {r.seconds:.1f}s{rate}")
    return 0


# ---- query ----------------------------------------------------------------------------------------------------
def query_arguments(p) -> None:
    _retrieval_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of {rank, score, source, location, text}")


def cmd_query(args) -> int:
    question = clean_text(args.question, "QUESTION")
    _check_question(question)
    with _open(args) as ix:
        hits = ix.search(question, args.k, args.mode, args.mmr)
    if args.json:
        print(json.dumps([h.to_json() for h in hits], ensure_ascii=False, indent=1))
        return 0
    for h in hits:
        print(f"{h.rank:>2}. {h.score:.4f}  {h.source}  {h.location}  (chunk {h.id})")
        print("    " + h.text.strip().replace("\n", "\n    "))
    if not hits:
        print("no chunk matches", file=sys.stderr)
    return 0


def _check_question(question: str) -> None:
    from lmforge.rag.retrieve import check_query
    check_query(question)


# ---- ask ------------------------------------------------------------------------------------------------------
def ask_arguments(p) -> None:
    from lmforge.infer.cli import add_sampling_options
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the model that answers")
    _retrieval_options(p)
    add_sampling_options(p)
    p.add_argument("--json", action="store_true", help="print the answer, its sources and what was dropped as JSON")
    add_device_option(p)
    p.add_argument("--precision", default="fp32", help="fp32 (default) | bf16 | fp16 | auto (autocast)")


def cmd_ask(args) -> int:
    import lmforge
    from lmforge import checkpoint
    from lmforge.infer.cli import sampling_params
    from lmforge.interop.hf import is_hf_dir

    question = clean_text(args.question, "QUESTION")
    _check_question(question)
    path = args.checkpoint if is_hf_dir(args.checkpoint) else checkpoint.resolve(args.checkpoint)
    params = sampling_params(args, path)
    ix = _open(args)                                     # the index first: a bad --db fails before the model loads
    with ix:
        model, tok = lmforge.load(path, device=args.device)
        write = None if args.json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        a = ix.ask(model, tok, question, k=args.k, mode=args.mode, mmr=args.mmr, params=params, on_text=write,
                   precision=args.precision)
    if args.json:
        print(json.dumps({"answer": a.text, "sources": [s.to_json() for s in a.sources],
                          "dropped": [h.to_json() for h in a.dropped], "cited": a.cited, "unknown": a.unknown,
                          "prompt_tokens": a.prompt_tokens, "finish_reason": a.finish_reason},
                         ensure_ascii=False, indent=1))
        return 0
    print("\n\nSources:")
    for s in a.sources:
        print(f"[{s.n}] {s.source}, {s.location} (chunk {s.id}){'  (cited)' if s.n in a.cited else ''}")
    if a.dropped:
        print(f"lmforge: note: {len(a.dropped)} retrieved chunk(s) did not fit the context of "
              f"{model.config.max_seq_len} tokens and were left out: "
              + "; ".join(f"{h.source}, {h.location}" for h in a.dropped), file=sys.stderr)
    if a.unknown:
        print(f"lmforge: note: the answer cites {', '.join(f'[{n}]' for n in a.unknown)}, which name no source",
              file=sys.stderr)
    print(f"[{a.prompt_tokens} prompt tokens, {len(a.sources)} passages; finish: {a.finish_reason}]", file=sys.stderr)
    return 0


# ---- eval -----------------------------------------------------------------------------------------------------
def eval_arguments(p) -> None:
    p.add_argument("--db", required=True, metavar="FILE.sqlite",
                   help="the benchmark's own index: built on the first run, reused after")
    p.add_argument("--set", action="append", default=None, choices=SETS,
                   help="labelled set (repeatable; default: both)")
    p.add_argument("--n", type=positive_int, default=200, help="kjv-cloze: verses held out as queries (default 200)")
    p.add_argument("--seed", type=int, default=0, help="kjv-cloze: which verses (default 0)")
    p.add_argument("--books", default=None, metavar="NAMES",
                   help="kjv-cloze: only these books, comma-separated (e.g. Genesis,Exodus), for a quick run")
    _embedder_option(p)
    p.add_argument("--chunk-tokens", type=positive_int, default=None, metavar="N", help="as for rag index")
    p.add_argument("--overlap", type=nonneg_int, default=None, metavar="M", help="as for rag index")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the table as a bar chart")
    p.add_argument("--json", default=None, metavar="FILE.json", help="also write the numbers as JSON")
    add_device_option(p)


def cmd_eval(args) -> int:
    from lmforge.io import write_json
    from lmforge.rag.evaluate import build_sets, evaluate, plot, text_table

    books = [b.strip() for b in args.books.split(",") if b.strip()] if args.books else None
    if books:
        from lmforge.data.corpus import kjv_verses
        known = list(dict.fromkeys(v["book"] for v in kjv_verses()))
        bad = [b for b in books if b not in known]
        if bad:
            raise ConfigError(f"unknown book {bad[0]!r} (e.g. {', '.join(known[:3])})", field="books")
    with _open(args, create=True, chunk_tokens=args.chunk_tokens, overlap=args.overlap) as ix:
        sets = build_sets(ix, args.set or SETS, n=args.n, seed=args.seed, books=books, progress_bar=True)
        results = {s.name: evaluate(ix, s) for s in sets}
        for s in sets:
            print(f"{s.name}: {s.note}")
        print(text_table(results))
    if args.json:
        write_json(args.json, results)
    if args.plot:
        print(f"wrote {plot(results, args.plot)}")
    return 0


VERBS = [
    Verb(("rag", "index"), "index documents into one SQLite file: FTS5 (BM25) + vectors (sqlite-vec), incremental",
         index_arguments, cmd_index),
    Verb(("rag", "query"), "the best chunks for a question: bm25, dense or hybrid (RRF), with scores and sources",
         query_arguments, cmd_query),
    Verb(("rag", "ask"), "answer a question from retrieved chunks with a checkpoint, citing them as [n]",
         ask_arguments, cmd_ask),
    Verb(("rag", "eval"), "retrieval benchmark: recall@1/5/10 and MRR@10 of each mode on built-in labelled sets",
         eval_arguments, cmd_eval),
]
