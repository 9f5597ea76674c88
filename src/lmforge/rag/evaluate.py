"""The retrieval benchmark: recall@1/5/10 and MRR@10 of bm25, dense and hybrid on built-in labelled sets.

    ix = Index("eval.sqlite")
    sets = [kjv_cloze(ix, n=200), python_docs_titles(ix)]     # index what each set needs, then label it
    results = {s.name: evaluate(ix, s) for s in sets}          # {set: {mode: {"recall@5": ..., "mrr@10": ...}}}
    print(text_table(results))

The sets are made mechanically from the built-in corpora, the same every time (seeded):

kjv-cloze     inverse cloze over the KJV (as in Lee et al. 2019): n verses of at least MIN_CLOZE_WORDS words, drawn
              with the seed, are held out of the index; each held-out verse is a query, and its answers are the
              chunks that held its neighbouring verses in its chapter (the chunk it was taken out of, and with
              overlap the ones that repeat its neighbours). The index holds the other 31k verses, so the query's own
              words are not there to be matched.
python-docs   section titles of the Python language reference (the pydoc topics CPython ships): every reST heading
              ("Augmented assignment statements", "The "with" statement") is a query, once per distinct title; the
              index holds the topics with their headings taken out; the answers are the chunks of the sections with
              that title. A question such as "Implementing Descriptors" then has to find the passage that explains
              it without its title.

recall@k = share of queries with an answer among the first k; MRR@10 = mean of 1/rank of the first answer within
the first 10 (0 when none). The held-out sources are named "kjv (cloze ...)" and "python-docs (titles removed)",
so an evaluation index also answers ordinary queries.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from lmforge.data import corpus
from lmforge.rag import retrieve
from lmforge.rag.chunking import kjv_documents, pydoc_documents

SETS = ("kjv-cloze", "python-docs")
KS = (1, 5, 10)
MIN_CLOZE_WORDS = 8


@dataclass
class LabelledSet:
    name: str
    queries: list[str]
    answers: list[set[int]]      # chunk ids that answer each query
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# the sets

def held_out_verses(n: int, seed: int, books: list[str] | None = None) -> list[dict]:
    verses = [v for v in corpus.kjv_verses() if len(v["text"].split()) >= MIN_CLOZE_WORDS
              and (books is None or v["book"] in books)]
    return [verses[i] for i in sorted(random.Random(seed).sample(range(len(verses)), min(n, len(verses))))]


def kjv_cloze(index, n: int = 200, seed: int = 0, books: list[str] | None = None,
              progress_bar: bool = False) -> LabelledSet:
    """Index the KJV without n held-out verses (skipped when already there), and label the held-out verses."""
    held = held_out_verses(n, seed, books)
    skip = {v["citation"] for v in held}
    scope = "" if books is None else f", {'+'.join(books)}"
    name = f"kjv (cloze: {len(held)} verses held out, seed {seed}{scope})"
    h = hashlib.sha256(corpus.kjv_path().read_bytes() + repr((sorted(skip), books)).encode()).hexdigest()
    docs = (lambda: [d for d in kjv_documents(skip) if books is None or d.name.rsplit(" ", 1)[0] in books])
    _only_benchmark_sources(index, keep=name)
    index.add_documents([(name, h, docs)], progress_bar=progress_bar)

    # chapter -> [(first verse, last verse, chunk id)] of this source's chunks
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for cid, source, document, location in index.store.all_chunks():
        if source == name:
            first, last = _verse_range(location)
            spans.setdefault(document, []).append((first, last, cid))
    kept = {}
    for v in corpus.kjv_verses():
        if v["citation"] not in skip:
            kept.setdefault(f"{v['book']} {v['chapter']}", []).append(v["verse"])
    answers = []
    for v in held:
        chapter = f"{v['book']} {v['chapter']}"
        before = [x for x in kept.get(chapter, []) if x < v["verse"]]
        after = [x for x in kept.get(chapter, []) if x > v["verse"]]
        near = ([before[-1]] if before else []) + ([after[0]] if after else [])
        answers.append({cid for a, b, cid in spans.get(chapter, []) for x in near if a <= x <= b})
    return LabelledSet("kjv-cloze", [v["text"] for v in held], answers,
                       f"{len(held)} KJV verses held out (seed {seed}{scope}), each to find its chapter's chunk")


def _only_benchmark_sources(index, keep: str) -> None:
    """An evaluation index holds the sets' own sources only: another copy of the KJV would hold the held-out
    verses; a cloze source drawn with other settings is replaced by this one."""
    if index.store is None:
        return
    names = [name for name, _ in index.store.sources()]
    other = [n for n in names if not n.startswith(("kjv (cloze", "python-docs (titles removed)"))]
    if other:
        from lmforge.errors import ConfigError
        raise ConfigError(f"this index also holds {', '.join(other)}: the benchmark needs an index of its own "
                          f"(another --db)", field="db")
    for n in names:
        if n.startswith("kjv (cloze") and n != keep and keep.startswith("kjv (cloze"):
            with index.store.transaction():
                index.store.remove_source(n)


def _verse_range(location: str) -> tuple[int, int]:
    """'Genesis 1:3-7' -> (3, 7); 'Genesis 1:3' -> (3, 3)."""
    rng = location.rpartition(":")[2]
    a, _, b = rng.partition("-")
    return int(a), int(b or a)


def python_docs_titles(index, progress_bar: bool = False) -> LabelledSet:
    """Index the pydoc topics without their headings (skipped when already there), and label every title."""
    name = "python-docs (titles removed)"
    topics = corpus.pydoc_topics()
    h = hashlib.sha256(repr(sorted(topics.items())).encode()).hexdigest()
    _only_benchmark_sources(index, keep=name)
    index.add_documents([(name, h, lambda: list(pydoc_documents(keep_headings=False)))], progress_bar=progress_bar)
    by_location: dict[str, set[int]] = {}
    for cid, source, document, location in index.store.all_chunks():
        if source == name:
            by_location.setdefault(location, set()).add(cid)
    titles: dict[str, set[int]] = {}
    for doc in pydoc_documents(keep_headings=True):        # the headings, and which section each one names
        for u in doc.units:
            title = u.location[len(doc.name) + 2:]
            if title and u.location in by_location:
                titles.setdefault(title, set()).update(by_location[u.location])
    queries = sorted(titles)
    return LabelledSet("python-docs", queries, [titles[q] for q in queries],
                       f"{len(queries)} section titles of the Python language reference, each to find its section")


def build_sets(index, names=SETS, n: int = 200, seed: int = 0, books: list[str] | None = None,
               progress_bar: bool = False) -> list[LabelledSet]:
    out = []
    for name in names:
        if name == "kjv-cloze":
            out.append(kjv_cloze(index, n, seed, books, progress_bar))
        elif name == "python-docs":
            out.append(python_docs_titles(index, progress_bar))
        else:
            from lmforge.errors import ConfigError
            raise ConfigError(f"unknown set {name!r} (sets: {', '.join(SETS)})", field="set")
    return out


# ---------------------------------------------------------------------------------------------------------------
# metrics

def evaluate(index, lset: LabelledSet, modes=retrieve.MODES, ks=KS) -> dict[str, dict[str, float]]:
    """{mode: {"recall@k": ..., "mrr@10": ..., "queries": n}}. Every mode ranks the same queries, and each query is
    embedded once for all of them."""
    depth = max(max(ks), 10)
    qvecs = index.embedder.embed(lset.queries)
    out = {}
    for mode in modes:
        ranks = []
        for q, qv, answers in zip(lset.queries, qvecs, lset.answers):
            hits = retrieve.search(index.store, index.embedder, q, depth, mode, qvec=qv)
            ranks.append(next((h.rank for h in hits if h.id in answers), None))
        row = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / len(ranks) for k in ks}
        row["mrr@10"] = sum(1 / r for r in ranks if r is not None and r <= 10) / len(ranks)
        row["queries"] = len(ranks)
        out[mode] = row
    return out


def text_table(results: dict, ks=KS) -> str:
    cols = [f"recall@{k}" for k in ks] + ["mrr@10"]
    lines = [f"{'set':<12} {'mode':<7} " + " ".join(f"{c:>9}" for c in cols) + f" {'queries':>8}"]
    for name, modes in results.items():
        for mode, row in modes.items():
            lines.append(f"{name:<12} {mode:<7} " + " ".join(f"{row[c]:>9.3f}" for c in cols)
                         + f" {row['queries']:>8}")
    return "\n".join(lines)


def markdown_table(results: dict, ks=KS) -> str:
    cols = [f"recall@{k}" for k in ks] + ["MRR@10"]
    lines = ["| set | mode | " + " | ".join(cols) + " | queries |", "|---|---|" + "---:|" * (len(cols) + 1)]
    for name, modes in results.items():
        for mode, row in modes.items():
            best = {c: max(r[c.lower()] for r in modes.values()) for c in cols}
            cells = [f"**{row[c.lower()]:.3f}**" if row[c.lower()] == best[c] else f"{row[c.lower()]:.3f}"
                     for c in cols]
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + f" | {row['queries']} |")
    return "\n".join(lines)


def plot(results: dict, path, ks=KS) -> str:
    """A grouped bar chart: one panel per set, metrics on the x axis, one bar per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [f"recall@{k}" for k in ks] + ["mrr@10"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, (name, modes) in zip(axes[0], results.items()):
        width = 0.8 / len(modes)
        for j, (mode, row) in enumerate(modes.items()):
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(cols))]
            bars = ax.bar(xs, [row[c] for c in cols], width, label=mode)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name} ({next(iter(modes.values()))['queries']} queries)")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)




# ---------------------------------------------------------------------------------------------------------------
# the quickstart's step

def kjv_report(index, model=None, tokenizer=None, question: str = "Who built the ark, and of what wood?",
               n: int = 100, seed: int = 0, books: list[str] | None = None, k: int = 3, params=None,
               progress_bar: bool = True) -> str:
    """Index the KJV (kjv-cloze's index: all verses but the n held out), measure retrieval on it and, given a
    model, answer `question` from it with citations. Returns a markdown section for a report."""
    import time
    t0 = time.perf_counter()
    lset = kjv_cloze(index, n, seed, books, progress_bar)
    built = time.perf_counter() - t0
    results = {lset.name: evaluate(index, lset)}
    scope = "the KJV" if books is None else f"the KJV ({', '.join(books)})"
    lines = ["## Retrieval (lmforge rag)", "",
             f"Index: {scope}, {index.store.count():,} chunks of at most {index.chunk_tokens} tokens, embedder "
             f"{index.embedder.name}; built in {built:.1f} s. Benchmark: {lset.note} (inverse cloze).", "",
             markdown_table(results), ""]
    if model is not None:
        from lmforge.rag.answer import answer_question, build_prompt
        hits = retrieve.search(index.store, index.embedder, question, k)
        prompt = build_prompt(tokenizer, model.config.max_seq_len, question, hits, 64)
        a = answer_question(model, tokenizer, prompt, params)
        lines += [f"**Q:** {question}", "", f"**A:** {a.text.strip()}", ""]
        lines += [f"- [{s.n}] {s.source}, {s.location}: {s.text[:120].strip()}…" for s in a.sources]
        if a.dropped:
            lines += ["", f"({len(a.dropped)} retrieved chunk(s) did not fit the context and were left out.)"]
        lines.append("")
    return "\n".join(lines)


__all__ = ["LabelledSet", "SETS", "kjv_cloze", "python_docs_titles", "build_sets", "evaluate", "text_table",
           "markdown_table", "plot", "held_out_verses", "kjv_report"]
