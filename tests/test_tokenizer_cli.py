"""`lmforge tokenizer train | encode | stats`, run in-process through lmforge.cli.main, errors included."""
from __future__ import annotations

import io
import json
import re
import sys

import pytest

from lmforge.cli import main
from lmforge.data.corpus import Corpus
from lmforge.tokenizer.bpe import GPT2_PATTERN, GPT4_PATTERN
from lmforge.tokenizer.tokenizer import Tokenizer
from test_tokenizer import MULTILINGUAL, corpus_texts, reference

CHINESE = ["我们的分词器应该能很好地处理中文文本。", "今天天气很好，我们去公园散步吧！", "人工智能正在改变世界。"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "en.txt").write_text("\n\n".join(corpus_texts()[:12]), encoding="utf-8")  # ~70 KB English + code
    with open(d / "zh.jsonl", "w", encoding="utf-8") as f:
        for doc in CHINESE * 10 + MULTILINGUAL:
            f.write(json.dumps({"body": doc}, ensure_ascii=False) + "\n")
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    reference()[1].save(d)
    return d


def run(capsys, *argv):
    rc = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    """The single error line on stderr (progress bars may share stderr, they are \r-separated)."""
    errors = [s for s in re.split(r"[\r\n]", err) if s.startswith("lmforge: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------------------------------------------------
# train

def test_train_writes_tokenizer_and_summary(inputs, tmp_path, capsys):
    out_dir = tmp_path / "tok"
    rc, out, _ = run(capsys, "tokenizer", "train", "--input", inputs / "en.txt", inputs / "zh.jsonl",
                     "--text-field", "body", "--vocab-size", 400, "--out", out_dir)
    assert rc == 0
    tok = Tokenizer.load(out_dir)
    assert tok.vocab_size == 400 and tok.n_merges == 400 - 256 - 16 and tok.pattern == GPT4_PATTERN
    # the CLI trains exactly what the library trains on the same corpus
    corpus = Corpus([str(inputs / "en.txt"), str(inputs / "zh.jsonl")], text_field="body")
    assert tok == Tokenizer.train(corpus.documents(progress=False), 400, progress=False)
    n_docs = 1 + len(CHINESE) * 10 + len(MULTILINGUAL)
    assert f"tokenizer saved to {out_dir}" in out
    assert re.search(rf"data +{n_docs} documents, 0\.\d\d MB in [\d.]+ s \([\d.]+ MB/s\)", out), out
    assert "vocab        400 = 256 bytes + 128 merges + 16 special tokens" in out
    m = re.search(r"compression +([\d.]+) bytes/token, ([\d.]+) chars/token on a (\d+)-document sample", out)
    assert m and float(m[1]) > 1.5 and int(m[3]) == n_docs
    assert "longest" in out and f"hash         {tok.hash()[:16]}" in out


def test_train_gpt2_pattern_and_early_stop(inputs, tmp_path, capsys):
    rc, out, _ = run(capsys, "tokenizer", "train", "--input", inputs / "zh.jsonl", "--text-field", "body",
                     "--vocab-size", 2000, "--out", tmp_path / "t", "--pattern", "gpt2", "--min-frequency", 5)
    assert rc == 0
    tok = Tokenizer.load(tmp_path / "t")
    assert tok.pattern == GPT2_PATTERN and 0 < tok.n_merges < 2000 - 272
    assert f"learned {tok.n_merges:,} of 1,728 merges" in out and "--min-frequency=5" in out


def test_train_errors(inputs, tmp_path, capsys):
    rc, out, err = run(capsys, "tokenizer", "train", "--input", inputs / "en.txt", "--vocab-size", 271,
                       "--out", tmp_path / "t")
    assert rc == 2 and "--vocab-size" in one_line_error(err) and "271 is too small" in err
    assert not (tmp_path / "t").exists()

    rc, _, err = run(capsys, "tokenizer", "train", "--input", inputs / "en.txt", "--vocab-size", 300,
                     "--out", tmp_path / "t", "--pattern", "(unclosed")
    assert rc == 2 and "field '--pattern'" in one_line_error(err)

    rc, _, err = run(capsys, "tokenizer", "train", "--input", inputs / "en.txt", "--vocab-size", 300,
                     "--out", tmp_path / "t", "--min-frequency", 0)
    assert rc == 2 and "--min-frequency" in one_line_error(err)

    missing = tmp_path / "missing.txt"
    rc, _, err = run(capsys, "tokenizer", "train", "--input", missing, "--vocab-size", 300, "--out", tmp_path / "t")
    assert rc == 2 and str(missing) in one_line_error(err)

    rc, _, err = run(capsys, "tokenizer", "train", "--input", inputs / "zh.jsonl", "--vocab-size", 300,
                     "--out", tmp_path / "t")  # wrong --text-field: the file's lines have no "text"
    assert rc == 2 and "zh.jsonl" in one_line_error(err)


# ---------------------------------------------------------------------------------------------------------
# encode

def test_encode_piped_shows_brackets(tok_dir, capsys):
    tok = Tokenizer.load(tok_dir)
    text = "How many r's are in strawberry?\n\tdef f(): 42"
    rc, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", tok_dir, text)
    assert rc == 0
    ids_line, pieces_line, count_line = out.splitlines()
    ids = tok.encode(text)
    assert ids_line == f"ids ({len(ids)}): {ids}"
    pieces = re.findall(r"\[(.*?)\]", pieces_line)
    assert pieces == [tok.token_str(i).replace("\n", "\\n").replace("\t", "\\t") for i in ids]
    assert "".join(pieces) == text.replace("\n", "\\n").replace("\t", "\\t")
    n = len(text.encode())
    assert count_line == f"{len(ids)} tokens, {len(text)} chars, {n} bytes, {n / len(ids):.2f} bytes/token"
    assert "\x1b[" not in out


def test_encode_strawberry_and_partial_bytes(tok_dir, capsys):
    tok = Tokenizer.load(tok_dir)
    rc, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", tok_dir, " strawberry 你")
    assert rc == 0
    pieces = re.findall(r"\[(.*?)\]", out.splitlines()[1])
    # the word's pieces spell it out; a character split over tokens shows its bytes
    ids = tok.encode(" strawberry")
    assert "".join(pieces[:len(ids)]) == " strawberry"
    tail = "".join(pieces[len(ids):])
    assert tail == "".join(tok.token_str(i) for i in tok.encode(" 你"))
    if len(tok.encode(" 你")) > 2:   # not a learned token: its UTF-8 bytes appear as \xNN
        assert "\\xe4" in tail


def test_encode_tty_uses_colours(tok_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    rc, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", tok_dir, "strawberry fields")
    assert rc == 0
    shown = out.splitlines()[1]
    assert "\x1b[30;48;5;" in shown
    assert re.sub(r"\x1b\[[0-9;]*m", "", shown) == "strawberry fields"
    n = len(Tokenizer.load(tok_dir).encode("strawberry fields"))
    assert shown.count("\x1b[0m") == n


def test_encode_reads_stdin(tok_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    rc, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", tok_dir, "-")
    assert rc == 0 and out.splitlines()[0].endswith(str(Tokenizer.load(tok_dir).encode("from stdin\n")))


def test_encode_errors(tok_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-tokenizer"
    rc, out, err = run(capsys, "tokenizer", "encode", "--tokenizer", missing, "hi")
    assert rc == 2 and out == ""
    assert one_line_error(err) == f"lmforge: error: {missing}: tokenizer directory not found"

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tok_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "tokenizer.model").write_text("lmforge-bpe v1\n1 2 3\n")
    rc, _, err = run(capsys, "tokenizer", "encode", "--tokenizer", bad, "hi")
    assert rc == 2 and f"{bad / 'tokenizer.model'}:2" in one_line_error(err)


# ---------------------------------------------------------------------------------------------------------
# stats

def test_stats_tables(tok_dir, inputs, capsys):
    tok = Tokenizer.load(tok_dir)
    rc, out, _ = run(capsys, "tokenizer", "stats", "--tokenizer", tok_dir, "--text-field", "body",
                     inputs / "en.txt", inputs / "zh.jsonl")
    assert rc == 0
    lines = out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line and not line.startswith(("-", " "))}
    corpus = Corpus([str(inputs / "en.txt"), str(inputs / "zh.jsonl")], text_field="body")
    for label, docs in corpus.iter_sources(progress=False):
        docs = list(docs)
        row = rows[label]
        tokens = sum(len(tok.encode(d)) for d in docs)
        chars, nbytes = sum(map(len, docs)), sum(len(d.encode()) for d in docs)
        assert row[1:5] == [f"{chars:,}", f"{nbytes:,}", f"{tokens:,}", f"{nbytes / tokens:.2f}"]
        assert row[5:] == [f"{chars / tokens:.2f}", f"{1000 * tokens / chars:.1f}"]
    for script in ("Latin", "Han", "Cyrillic", "Emoji", "Common"):
        assert script in rows, script
    # a header row per table and aligned columns within each table
    assert sum(1 for line in lines if line.split()[:2] in (["file", "chars"], ["script", "chars"])) == 2
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("file"))):][:6]
    assert len({len(ln) for ln in table}) == 1
    # Chinese costs more tokens per character than English for a tokenizer trained mostly on English
    assert float(rows["Han"][-1]) > float(rows["Latin"][-1])
    assert re.search(r"' strawberry' +\d+ tokens +(\[[^\]]*\])+", out)


def test_stats_errors(tok_dir, inputs, tmp_path, capsys):
    rc, _, err = run(capsys, "tokenizer", "stats", "--tokenizer", tmp_path / "nope", inputs / "en.txt")
    assert rc == 2 and str(tmp_path / "nope") in one_line_error(err)
    rc, _, err = run(capsys, "tokenizer", "stats", "--tokenizer", tok_dir, tmp_path / "none.txt")
    assert rc == 2 and "none.txt" in one_line_error(err)
