"""RAG: index build time and query latency over the whole KJV + Python docs, and retrieval quality (recall@1/5/10,
MRR@10 of bm25, dense, hybrid) on the built-in labelled sets (`lmforge rag eval`'s sets).

    python bench/rag.py [--out runs/bench-rag] [--threads 1] [--queries 200] [--n 200]

1. Index: `kjv` + `python-docs` into a fresh index (embedder minilm, 128-token chunks), timed end to end.
2. Latency: --queries questions (KJV verses and Python docs section titles, alternating), each searched in every
   mode with k=5 through `Index.search`, which embeds the question: p50 / p99 per mode. Also the dense scan alone:
   sqlite-vec's vec0 KNN query against the numpy matrix-vector product over the same vectors that `dense` uses.
3. Quality: `lmforge rag eval`'s sets in an index of their own (KJV minus the held-out verses, Python docs without
   their headings); the chunks the two indexes share are embedded once (an in-memory cache, said in the output).
   Prints the table, writes rag.png (bar chart) and rag.json, and says whether hybrid recall@5 >= max(bm25, dense).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-rag", help="where the indexes, rag.png and rag.json go")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--queries", type=int, default=200, help="questions for the latency measurement")
    ap.add_argument("--n", type=int, default=200, help="kjv-cloze: verses held out")
    ap.add_argument("--reuse", action="store_true", help="keep an index from an earlier run (no build time)")
    ap.add_argument("--sources", nargs="+", default=["kjv", "python-docs"], help="what the timed index holds")
    ap.add_argument("--sets", nargs="+", default=None, help="labelled sets (default: all)")
    ap.add_argument("--books", default=None, help="kjv-cloze: only these books, comma-separated (a quick run)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    torch.set_num_threads(args.threads)
    from lmforge.rag import Index, MiniLM
    from lmforge.rag.evaluate import build_sets, evaluate, held_out_verses, markdown_table, plot, text_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emb = MiniLM()
    emb.cache = {}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"cpu: {cpu}, {os.cpu_count()} cores; torch threads {args.threads}", flush=True)

    # ---- 1. build ---------------------------------------------------------------------------------------------
    full = out / "full.sqlite"
    if full.exists() and not args.reuse:
        full.unlink()
    ix = Index(full, emb)
    r = ix.add(args.sources, progress_bar=True)
    stats = ix.stats()
    tokens = ix.store.con.execute("SELECT sum(tokens) FROM chunks").fetchone()[0]
    build = {"seconds": r.seconds, "embed_seconds": r.embed_seconds, "chunks": stats["chunks"], "tokens": tokens,
             "chunks_per_s": r.chunks_per_s, "bytes": full.stat().st_size, "fresh": bool(r.chunks)}
    print(f"index {' + '.join(args.sources)}: {stats['chunks']:,} chunks ({tokens:,} tokens) in {r.seconds:.1f} s "
          f"({r.embed_seconds:.1f} s embedding, {r.chunks_per_s:.1f} chunks/s, "
          f"{tokens / max(r.embed_seconds, 1e-9):,.0f} tokens/s); file {full.stat().st_size / 1e6:.1f} MB"
          + ("" if r.chunks else " (reused: not timed)"), flush=True)

    # ---- 2. latency -------------------------------------------------------------------------------------------
    from lmforge.data.corpus import pydoc_topics
    from lmforge.rag.chunking import paragraphs
    verses = [v["text"] for v in held_out_verses(args.queries, seed=1)]
    titles = [u.location.split(", ", 1)[1] for t in pydoc_topics().values()
              for u in paragraphs(t, "rst", line_numbers=False, prefix="x") if ", " in u.location]
    titles = list(dict.fromkeys(titles))
    questions = [q for pair in zip(verses, titles * 4) for q in pair][:args.queries]
    cache, emb.cache = emb.cache, None                # the questions are embedded for real
    for q in questions[:5]:                           # warm-up
        ix.search(q, 5, "hybrid")
    latency = {}
    for mode in ("bm25", "dense", "hybrid"):
        times = []
        for q in questions:
            t = time.perf_counter()
            ix.search(q, 5, mode)
            times.append((time.perf_counter() - t) * 1000)
        latency[mode] = {"p50_ms": statistics.median(times), "p99_ms": percentile(times, 99), "n": len(times)}
    qv, embed_times = [], []
    for q in questions:
        t = time.perf_counter()
        qv.append(emb.embed([q])[0])
        embed_times.append((time.perf_counter() - t) * 1000)
    embed_ms = statistics.median(embed_times)
    # the dense scan alone: vec0 against numpy over the same matrix
    ids = [row[0] for row in ix.store.con.execute("SELECT rowid FROM chunks_vec ORDER BY rowid")]
    vec0, mat = [], []
    for v in qv[:100]:
        t = time.perf_counter()
        ix.store.knn_vec0(v, 50)
        vec0.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        ix.store.knn(v, 50)
        mat.append((time.perf_counter() - t) * 1000)
    scan = {"vec0_p50_ms": statistics.median(vec0), "numpy_p50_ms": statistics.median(mat), "vectors": len(ids)}
    print(f"\nquery latency over {stats['chunks']:,} chunks, k=5, question embedding included "
          f"({len(questions)} questions; the embedding alone: p50 {embed_ms:.1f} ms):")
    print(f"{'mode':<8}{'p50 ms':>9}{'p99 ms':>9}")
    for mode, row in latency.items():
        print(f"{mode:<8}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}")
    print(f"dense scan of {len(ids):,} vectors, top 50: sqlite-vec vec0 {scan['vec0_p50_ms']:.2f} ms, "
          f"numpy matrix-vector product (what `dense` uses) {scan['numpy_p50_ms']:.2f} ms (p50)", flush=True)
    ix.close()

    # ---- 3. quality -------------------------------------------------------------------------------------------
    emb.cache = cache
    if (out / "eval.sqlite").exists() and not args.reuse:
        (out / "eval.sqlite").unlink()
    ev = Index(out / "eval.sqlite", emb)
    t = time.perf_counter()
    books = args.books.split(",") if args.books else None
    sets = build_sets(ev, args.sets or ("kjv-cloze", "python-docs"), n=args.n, books=books, progress_bar=True)
    eval_build = time.perf_counter() - t
    results = {s.name: evaluate(ev, s) for s in sets}
    ev.close()
    print()
    for s in sets:
        print(f"{s.name}: {s.note}")
    print(text_table(results))
    print("\n" + markdown_table(results))
    ok = {name: rows["hybrid"]["recall@5"] >= max(rows["bm25"]["recall@5"], rows["dense"]["recall@5"])
          for name, rows in results.items()}
    for name, good in ok.items():
        print(f"{name}: hybrid recall@5 {'>=' if good else '<'} max(bm25, dense)")
    print(f"wrote {plot(results, out / 'rag.png')}")
    (out / "rag.json").write_text(json.dumps({"cpu": cpu, "threads": args.threads, "build": build,
                                              "latency": latency, "embed_ms": embed_ms, "scan": scan,
                                              "eval_build_seconds": eval_build, "results": results}, indent=1))
    print(f"wrote {out / 'rag.json'} (eval index built in {eval_build:.1f} s, shared chunks embedded once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
