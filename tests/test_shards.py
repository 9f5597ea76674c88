"""Token shards: layout, exact byte counts, document split, atomic writes, load checks, `lmforge data prepare`."""
import json
import tracemalloc

import numpy as np
import pytest
import tqdm  # noqa: F401  (imported up front: its first import would count in the tracemalloc peak below)

from lmforge import __version__
from lmforge.cli import main
from lmforge.data import Corpus, load_shards, prepare_shards, shards
from lmforge.errors import ConfigError, DataError


class ByteTokenizer:
    """Test double with the Tokenizer interface: ids are UTF-8 bytes (+ offset), BOS after them."""

    def __init__(self, offset=0, extra=0):
        self.offset, self.vocab_size = offset, 256 + offset + 1 + extra
        self.bos_id, self.eos_id = 256 + offset, None
        self.calls = 0

    def encode(self, text, bos=False, eos=False):
        return ([self.bos_id] if bos else []) + [b + self.offset for b in text.encode("utf-8")]

    def encode_batch(self, texts):
        self.calls += 1
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(i - self.offset for i in ids).decode("utf-8")

    def hash(self):
        return f"bytes+{self.offset}"


def docs_of(tokens, tok):
    """Split a shard back into document texts at BOS."""
    ids = np.asarray(tokens).astype(np.int64)
    starts = np.flatnonzero(ids == tok.bos_id)
    assert len(ids) == 0 or starts[0] == 0, "every shard starts with BOS"
    return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(starts, list(starts[1:]) + [len(ids)])]


def jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


TEXTS = [f"document {i}: " + "caf\u00e9 \u4e2d\u6587 " * (i % 5) + "end" for i in range(200)]


def test_layout_meta_and_exact_bytes(tmp_path):
    tok = ByteTokenizer()
    corpus = Corpus([jsonl(tmp_path / "d.jsonl", TEXTS)])
    meta = prepare_shards(corpus, tok, tmp_path / "out", val_fraction=0.2, seed=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert not (tmp_path / "out.tmp").exists()
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    train, val, meta2 = load_shards(tmp_path / "out")
    assert meta2 == meta and train.dtype == np.dtype("<u2") and isinstance(train, np.memmap)
    assert meta["dtype"] == "uint16" and meta["tokenizer_hash"] == "bytes+0" and meta["bos_id"] == 256
    assert meta["vocab_size"] == 257 and meta["lmforge_version"] == __version__
    assert meta["sources"] == [str(tmp_path / "d.jsonl")] and (meta["val_fraction"], meta["seed"]) == (0.2, 1)
    # raw little-endian uint16 on disk
    raw = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u2")
    assert np.array_equal(raw, train)
    got_train, got_val = docs_of(train, tok), docs_of(val, tok)
    assert sorted(got_train + got_val) == sorted(TEXTS)         # every document once, boundaries kept
    assert [t for t in TEXTS if t in set(got_train)] == got_train   # corpus order within a split
    for split, got in (("train", got_train), ("val", got_val)):
        m = meta[split]
        assert m["documents"] == len(got)
        assert m["bytes"] == sum(len(t.encode()) for t in got)     # exact UTF-8 bytes, BOS counts 0
        assert m["tokens"] == m["bytes"] + m["documents"]          # byte tokenizer: 1 token/byte + BOS
    assert 20 <= meta["val"]["documents"] <= 60                     # ~ val_fraction of 200
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == corpus.stats.bytes


def test_split_is_deterministic_and_seeded(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", TEXTS)
    files = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_shards(Corpus([src]), ByteTokenizer(), tmp_path / name, seed=seed, progress=False)
        files[name] = [(tmp_path / name / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")]
    assert files["a"] == files["b"]
    assert files["a"][0] != files["c"][0]


def test_tail_split_holds_out_the_end_of_each_source(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(40)])
    d = tmp_path / "dir"
    d.mkdir()
    for name, n in (("x.jsonl", 6), ("y.jsonl", 14)):   # a directory is ONE source: its files in sorted order
        jsonl(d / name, [f"{name[0]} {i}" for i in range(n)])
    tok = ByteTokenizer()
    meta = prepare_shards(Corpus([a, str(d)]), tok, tmp_path / "o", val_fraction=0.1, split="tail", progress=False)
    train, val, _ = load_shards(tmp_path / "o")
    # round(40 * 0.1) = 4 from a.jsonl, round(20 * 0.1) = 2 from the directory: the last two of y.jsonl
    assert docs_of(val, tok) == ["alpha 36", "alpha 37", "alpha 38", "alpha 39", "y 12", "y 13"]
    assert docs_of(train, tok) == [f"alpha {i}" for i in range(36)] + [f"x {i}" for i in range(6)] + \
        [f"y {i}" for i in range(12)]
    assert meta["split"] == "tail" and meta["val"]["documents"] == 6
    # deterministic, independent of the seed; a tiny fraction still holds out one document per source
    meta2 = prepare_shards(Corpus([a, str(d)]), tok, tmp_path / "o2", val_fraction=0.001, split="tail",
                           seed=5, progress=False)
    assert docs_of(load_shards(tmp_path / "o2")[1], tok) == ["alpha 39", "y 13"]
    assert meta2["train"]["documents"] == 58
    with pytest.raises(ConfigError, match="split must be one of random, tail"):
        prepare_shards(Corpus([a]), tok, tmp_path / "o3", split="head", progress=False)


def test_batches_stream_through_encode_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_DOCS", 16)
    tok = ByteTokenizer()
    prepare_shards(Corpus([jsonl(tmp_path / "d.jsonl", TEXTS)]), tok, tmp_path / "o", progress=False)
    assert tok.calls == 200 // 16 + 1


def test_both_splits_non_empty(tmp_path):
    src = jsonl(tmp_path / "two.jsonl", ["first document", "second document"])
    tok = ByteTokenizer()
    for frac in (0.001, 0.999):
        meta = prepare_shards(Corpus([src]), tok, tmp_path / "o", val_fraction=frac, progress=False)
        train, val, _ = load_shards(tmp_path / "o")
        assert meta["train"]["documents"] == meta["val"]["documents"] == 1
        assert sorted(docs_of(train, tok) + docs_of(val, tok)) == ["first document", "second document"]
        assert meta["val"]["bytes"] + meta["train"]["bytes"] == len("first documentsecond document")
    # with a low fraction the LAST document is moved to val
    prepare_shards(Corpus([src]), tok, tmp_path / "o", val_fraction=0.001, progress=False)
    assert docs_of(load_shards(tmp_path / "o")[1], tok) == ["second document"]


def test_single_document_split_at_tail(tmp_path):
    text = "The only document in this corpus, \u00e9\u00e9\u00e9 and some more words to split. " * 3
    p = tmp_path / "one.txt"
    p.write_text(text, encoding="utf-8")
    tok = ByteTokenizer()
    meta = prepare_shards(Corpus([str(p)]), tok, tmp_path / "o", val_fraction=0.25, progress=False)
    train, val, _ = load_shards(tmp_path / "o")
    (head,), (tail,) = docs_of(train, tok), docs_of(val, tok)
    assert head + tail == text and len(tail) == len(text) - round(len(text) * 0.75)
    assert meta["single_document_split"] is True
    assert (meta["train"]["bytes"], meta["val"]["bytes"]) == (len(head.encode()), len(tail.encode()))
    p.write_text("x")
    with pytest.raises(DataError, match="single document of one character"):
        prepare_shards(Corpus([str(p)]), tok, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.tmp").exists()


def test_uint32_for_large_vocab(tmp_path):
    tok = ByteTokenizer(offset=65400)          # ids 65400..65656, vocab 65657 > 65535
    meta = prepare_shards(Corpus([jsonl(tmp_path / "d.jsonl", TEXTS[:20])]), tok, tmp_path / "o", progress=False)
    train, val, _ = load_shards(tmp_path / "o")
    assert meta["dtype"] == "uint32" and train.dtype == np.dtype("<u4")
    assert (tmp_path / "o" / "train.bin").stat().st_size == 4 * meta["train"]["tokens"]
    assert sorted(docs_of(train, tok) + docs_of(val, tok)) == sorted(TEXTS[:20])
    assert shards.token_dtype(65535) == np.dtype("<u2") and shards.token_dtype(65536) == np.dtype("<u4")


def test_atomic_replace_and_failure_leaves_old(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_DOCS", 16)    # fail in the second batch, after writing has begun
    src = jsonl(tmp_path / "d.jsonl", TEXTS)
    out = tmp_path / "o"
    prepare_shards(Corpus([src]), ByteTokenizer(), out, progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    class Broken(ByteTokenizer):
        def encode_batch(self, texts):
            if self.calls:
                raise RuntimeError("tokenizer crashed")
            return super().encode_batch(texts)

    with pytest.raises(RuntimeError, match="crashed"):
        prepare_shards(Corpus([src]), Broken(), out, progress=False)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "o"]   # no .tmp / .old left
    # a successful run replaces it
    meta = prepare_shards(Corpus([src]), ByteTokenizer(offset=1), out, progress=False)
    assert json.loads((out / "meta.json").read_text())["tokenizer_hash"] == meta["tokenizer_hash"] == "bytes+1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "o"]


def test_refuses_to_replace_foreign_directory_and_bad_fraction(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", TEXTS[:5])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(DataError, match=rf"^{foreign}: exists, is not empty and holds no meta.json"):
        prepare_shards(Corpus([src]), ByteTokenizer(), foreign, progress=False)
    assert (foreign / "precious.txt").read_text() == "keep"
    with pytest.raises(DataError, match="exists and is a file"):
        prepare_shards(Corpus([src]), ByteTokenizer(), foreign / "precious.txt", progress=False)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="val fraction must be between 0 and 1"):
            prepare_shards(Corpus([src]), ByteTokenizer(), tmp_path / "o", val_fraction=bad, progress=False)


def test_load_shards_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope: shard directory not found; make it with `lmforge data prepare`"):
        load_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"meta.json: missing: not a shard directory"):
        load_shards(tmp_path / "empty")
    out = tmp_path / "o"
    prepare_shards(Corpus([jsonl(tmp_path / "d.jsonl", TEXTS[:30])]), ByteTokenizer(), out, progress=False)
    with pytest.raises(DataError, match=r"made with tokenizer 'bytes\+0', not this one \('other'\)"):
        load_shards(out, tokenizer_hash="other")
    assert load_shards(out, tokenizer_hash="bytes+0")[2]["tokenizer_hash"] == "bytes+0"
    data = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=rf"val.bin: has {len(data) - 2} bytes but meta.json says"):
        load_shards(out)
    (out / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val.bin: missing"):
        load_shards(out)
    (out / "meta.json").write_text('{"format": "lmforge-shards",\n "dtype": }')
    with pytest.raises(DataError, match=r"meta.json:2: bad JSON"):
        load_shards(out)
    (out / "meta.json").write_text('{"format": "lmforge-shards", "dtype": "float32"}')
    with pytest.raises(DataError, match=r"field 'dtype': dtype must be uint16 or uint32"):
        load_shards(out)


def test_memory_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "BATCH_BYTES", 1 << 16)
    p = tmp_path / "big.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for i in range(8000):
            f.write(json.dumps({"text": f"document {i} " + "tokens and more tokens " * 20}) + "\n")
    size = p.stat().st_size
    corpus = Corpus([str(p)])
    prepare_shards(Corpus([jsonl(tmp_path / "w.jsonl", TEXTS[:3])]), ByteTokenizer(), tmp_path / "w",
                   progress=False)                      # warm up first-use imports
    tracemalloc.start()
    meta = prepare_shards(corpus, ByteTokenizer(), tmp_path / "o", progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert meta["train"]["tokens"] + meta["val"]["tokens"] > size * 0.9
    # one batch (BATCH_BYTES of text, as token lists) is the bound, not the corpus
    assert peak < 20 * (1 << 16) and peak < size / 2, f"peak {peak} for a {size}-byte corpus"


def test_progress_bar_has_rates(tmp_path, capsys, monkeypatch):
    from lmforge.data import corpus
    prepare_shards(Corpus([jsonl(tmp_path / "d.jsonl", TEXTS)]), ByteTokenizer(), tmp_path / "q", progress=True)
    assert capsys.readouterr().err == ""                 # quick work: no bar (it waits PROGRESS_DELAY_S)
    monkeypatch.setattr(corpus, "PROGRESS_DELAY_S", 0)
    prepare_shards(Corpus([jsonl(tmp_path / "d.jsonl", TEXTS)]), ByteTokenizer(), tmp_path / "o", progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "B/s" in err and "tok/s" in err


# ------------------------------------------------------------------------------ real tokenizer + CLI


@pytest.fixture(scope="module")
def real_tokenizer_dir(tmp_path_factory):
    from lmforge.tokenizer.tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("tok")
    texts = list(Corpus(["python-docs"]).documents(progress=False))[:20]
    Tokenizer.train(texts, vocab_size=400, progress=False).save(d)
    return d


def test_real_tokenizer_round_trip(tmp_path, real_tokenizer_dir):
    from lmforge.tokenizer.tokenizer import Tokenizer
    tok = Tokenizer.load(real_tokenizer_dir)
    texts = TEXTS[:50] + ["def f(x):\n    return x ** 2\n", "<|bos|> typed in text stays text"]
    meta = prepare_shards(Corpus([jsonl(tmp_path / "d.jsonl", texts)]), tok, tmp_path / "o", progress=False)
    train, val, meta2 = load_shards(tmp_path / "o", tokenizer_hash=tok.hash())
    assert meta["tokenizer_hash"] == tok.hash() and meta["bos_id"] == tok.bos_id
    assert meta["vocab_size"] == tok.vocab_size == 400
    got = []
    for arr, split in ((train, "train"), (val, "val")):
        ids = np.asarray(arr).astype(np.int64)
        starts = list(np.flatnonzero(ids == tok.bos_id)) + [len(ids)]
        assert starts[0] == 0 and meta[split]["documents"] == len(starts) - 1
        parts = [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
        assert meta[split]["bytes"] == sum(len(t.encode()) for t in parts)
        assert all(ids[a + 1:b].tolist() == tok.encode(t) for a, b, t in zip(starts, starts[1:], parts))
        got += parts
    assert sorted(got) == sorted(texts)


def test_cli_prepare_summary(tmp_path, capsys, real_tokenizer_dir):
    src = jsonl(tmp_path / "d.jsonl", TEXTS)
    out = tmp_path / "shards"
    assert main(["data", "prepare", "--input", src, "--tokenizer", str(real_tokenizer_dir), "--out", str(out),
                 "--val-fraction", "0.3", "--seed", "7"]) == 0
    stdout = capsys.readouterr().out.splitlines()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["val_fraction"] == 0.3
    assert stdout[0].startswith(f"wrote {out}/") and stdout[1].split() == ["split", "docs", "tokens", "bytes",
                                                                           "bytes/token"]
    for line, split in zip(stdout[2:4], ("train", "val")):
        m = meta[split]
        assert line.split() == [split, f"{m['documents']:,}", f"{m['tokens']:,}", f"{m['bytes']:,}",
                                f"{m['bytes'] / m['tokens']:.2f}"]


def test_cli_prepare_bad_input_exits_2(tmp_path, capsys, real_tokenizer_dir):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "alpha"}\n{"txt": "b"}\n{"text": "gamma"}\n')
    args = ["data", "prepare", "--input", str(p), "--tokenizer", str(real_tokenizer_dir), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmforge: error: {p}:2: missing field 'text' (fields: 'txt')"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()
    assert main(args + ["--skip-bad-lines"]) == 0
    captured = capsys.readouterr()
    assert f"skipped 1 bad line(s) (first: {p}:2: missing field 'text'" in captured.err
    assert main(args[:-1] + [str(tmp_path / "o2"), "--val-fraction", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == ("lmforge: error: field 'val_fraction': "
                                               "val fraction must be between 0 and 1 (exclusive), got 1.5")
    assert main(["data", "prepare", "--input", str(p), "--tokenizer", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o3")]) == 2
    assert "tokenizer directory not found" in capsys.readouterr().err
