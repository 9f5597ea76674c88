"""Documents -> chunks on token counts, cut only where the text allows it.

A source (a file, a built-in corpus) is read as `Document`s, each a text with its `Unit`s: the pieces a chunk never
splits (a KJV verse, a paragraph) with their byte spans, locations and section numbers. `pack` then fills chunks
greedily up to `chunk_tokens` tokens (counted with the embedder's tokenizer, so a chunk fits its window), starting
a new chunk at every section boundary (a heading) and, with `overlap`, repeating the last units of a chunk (up to
that many tokens) at the start of the next. A unit longer than a whole chunk is cut at sentence ends, or at words
when a sentence is too long.

What each source gives:
    kjv             one document per chapter ("Genesis 1"), one unit per verse ("Genesis 1:3"); chunk locations
                    are verse ranges ("Genesis 1:3-7")
    python-docs     one document per pydoc topic, paragraphs; reST headings (a line underlined with * = - ~) start
                    sections; locations "topic: heading"
    python-stdlib   one document per .py file, blocks between blank lines; locations "path, line N"
    .md / .txt      the whole file, paragraphs; Markdown headings (#) start sections; locations "§ heading, line N"
    .jsonl/.parquet one document per record ("record N"), paragraphs
Byte spans are offsets into the document's UTF-8 text (the file itself for .md/.txt).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from lmforge.data import corpus, readers
from lmforge.data.corpus import CorpusStats

DEFAULT_CHUNK_TOKENS = 128
DEFAULT_OVERLAP = 0

_PARAGRAPH = re.compile(r"\S(?:.*?\S)?(?=\n[ \t]*\n|\s*\Z)", re.S)     # text between blank lines, trimmed
_RST_UNDERLINE = re.compile(r"([*=~^-])\1{2,}")
_MD_HEADING = re.compile(r"#{1,6}\s+(.*?)\s*#*\s*$")
_WORD = re.compile(r"\S+\s*")
_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*\s*$")


@dataclass
class Unit:
    start: int             # character offsets in the document text (bytes come at the end: `pack`)
    end: int
    location: str
    section: int = 0       # chunks never join units of different sections


@dataclass
class Document:
    name: str              # "Genesis 1", a topic, "record 3", or "" for a whole file
    text: str
    units: list[Unit] = field(default_factory=list)


@dataclass
class Chunk:
    document: str
    location: str
    start: int             # byte span in the document's UTF-8 text
    end: int
    tokens: int
    text: str


# ---------------------------------------------------------------------------------------------------------------
# units

def paragraphs(text: str, headings: str | None = None, line_numbers: bool = True, prefix: str = "",
               keep_headings: bool = True) -> list[Unit]:
    """Blank-line separated paragraphs. headings='md' (# lines) or 'rst' (a line underlined with * = - ~ ^)
    start a new section, named in the locations; keep_headings=False leaves the heading text out of the units
    (the section still starts there)."""
    units, section, heading = [], 0, ""
    line, counted = 1, 0                        # line numbers counted on from the previous paragraph
    for m in _PARAGRAPH.finditer(text):
        start, end, para = m.start(), m.end(), m.group(0)
        line, counted = line + text.count("\n", counted, start), start
        title = None
        if headings == "md":
            h = _MD_HEADING.fullmatch(para.split("\n", 1)[0])
            title = h.group(1) if h else None
            rest_at = len(para.split("\n", 1)[0])
        elif headings == "rst":
            first, _, rest = para.partition("\n")
            under = rest.split("\n", 1)[0].strip()
            title = first.strip() if _RST_UNDERLINE.fullmatch(under) and len(under) >= len(first.strip()) else None
            rest_at = len(first) + 1 + len(rest.split("\n", 1)[0])
        if title is not None:
            section, heading = section + 1, title
            if not keep_headings:           # the heading is no text of its own: what follows it in the paragraph
                start = start + rest_at
                while start < end and text[start].isspace():
                    start += 1
                if start >= end:
                    continue
        where = ", ".join(x for x in (prefix, f"§ {heading}" if heading and headings == "md" else heading,
                                      f"line {line}" if line_numbers else "") if x)
        units.append(Unit(start, end, where, section))
    return units


# ---------------------------------------------------------------------------------------------------------------
# sources: (documents, content hash)

def kjv_documents(skip: set[str] | frozenset = frozenset()) -> Iterator[Document]:
    """The KJV by chapter, one unit per verse; verses whose citation is in `skip` are left out (the benchmark's
    inverse cloze holds them out)."""
    for (book, chapter), verses in itertools.groupby(corpus.kjv_verses(), key=lambda v: (v["book"], v["chapter"])):
        parts, units, at = [], [], 0
        for v in verses:
            if v["citation"] in skip:
                continue
            parts.append(v["text"])
            units.append(Unit(at, at + len(v["text"]), v["citation"]))
            at += len(v["text"]) + 1
        if units:
            yield Document(f"{book} {chapter}", "\n".join(parts), units)


def pydoc_documents(keep_headings: bool = True) -> Iterator[Document]:
    topics = corpus.pydoc_topics()
    for key in sorted(topics):
        text = topics[key]
        yield Document(key, text, paragraphs(text, "rst", line_numbers=False, prefix=key,
                                             keep_headings=keep_headings))


def _stdlib_documents() -> Iterator[Document]:
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in corpus.stdlib_files():
        for text in corpus.python_stdlib([path]):
            name = str(path.relative_to(root))
            yield Document(name, text, paragraphs(text, prefix=name))


def file_documents(path: str, text_field: str, skip_bad_lines: bool, stats: CorpusStats) -> Iterator[Document]:
    suffix = Path(path).suffix.lower()
    if suffix in (".txt", ".md"):
        text = "".join(readers.read_text(path, stats))     # pieces of a large file join back to its text
        yield Document("", text, paragraphs(text, "md" if suffix == ".md" else None))
        return
    records = (readers.read_parquet(path, text_field, stats, skip_bad_lines) if suffix == ".parquet"
               else readers.read_jsonl(path, text_field, stats, skip_bad_lines))
    for i, text in enumerate(records, 1):
        yield Document(f"record {i}", text, paragraphs(text, line_numbers=False, prefix=f"record {i}"))


def source_hash(label: str, is_file: bool, text_field: str = "text") -> str:
    """The content hash that decides whether a source is indexed again: the file's bytes (and the text field it
    is read with), or the built-in corpus's data."""
    h = hashlib.sha256()
    if is_file:
        h.update(text_field.encode() + b"\0")
        with open(label, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif label == "kjv":
        h.update(corpus.kjv_path().read_bytes())
    elif label == "python-docs":
        h.update(json.dumps(corpus.pydoc_topics(), sort_keys=True).encode())
    else:                                                  # python-stdlib: every file's path and bytes
        for p in corpus.stdlib_files():
            h.update(str(p).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def source_documents(label: str, is_file: bool, text_field: str = "text", skip_bad_lines: bool = False,
                     stats: CorpusStats | None = None) -> Iterator[Document]:
    """The documents of one corpus unit (lmforge.data.corpus.Corpus.units)."""
    stats = stats or CorpusStats()
    if is_file:
        return file_documents(label, text_field, skip_bad_lines, stats)
    return {"kjv": kjv_documents, "python-docs": pydoc_documents, "python-stdlib": _stdlib_documents}[label]()


# ---------------------------------------------------------------------------------------------------------------
# packing

def pack(docs: list[Document], count_tokens: Callable[[list[str]], list[int]], chunk_tokens: int,
         overlap: int = 0) -> list[Chunk]:
    """Chunks of at most `chunk_tokens` tokens (as counted by `count_tokens`), in document order."""
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap must be in [0, chunk_tokens), got {overlap} for {chunk_tokens}")
    units = [(d, u) for d in docs for u in d.units]
    counts = count_tokens([d.text[u.start:u.end] for d, u in units]) if units else []
    chunks: list[Chunk] = []
    by_doc = itertools.groupby(zip(units, counts), key=lambda x: id(x[0][0]))
    for _, group in by_doc:
        group = list(group)
        doc = group[0][0][0]
        pieces: list[tuple[Unit, int]] = []
        for (_, u), n in group:
            pieces += [(u, n)] if n <= chunk_tokens else _split(doc.text, u, count_tokens, chunk_tokens)
        chunks += _fill(doc, pieces, chunk_tokens, overlap)
    return chunks


def _fill(doc: Document, pieces: list[tuple[Unit, int]], chunk_tokens: int, overlap: int) -> list[Chunk]:
    out, cur, total = [], [], 0
    to_bytes = _byte_offsets(doc.text)

    def emit():
        first, last = cur[0][0], cur[-1][0]
        out.append(Chunk(doc.name, span_location(first.location, last.location), to_bytes(first.start),
                         to_bytes(last.end), total, doc.text[first.start:last.end]))

    for u, n in pieces:
        if cur and (u.section != cur[0][0].section or total + n > chunk_tokens):
            emit()
            tail, t = [], 0                 # the overlap: last units of this chunk, within `overlap` tokens
            if u.section == cur[0][0].section:
                for p in reversed(cur[1:]):
                    if t + p[1] > overlap or t + p[1] + n > chunk_tokens:
                        break
                    tail.insert(0, p)
                    t += p[1]
            cur, total = tail, t
        cur.append((u, n))
        total += n
    if cur:
        emit()
    return out


def _split(text: str, u: Unit, count_tokens, chunk_tokens: int) -> list[tuple[Unit, int]]:
    """A unit too long for one chunk, as pieces within the budget: cut after the last sentence end that keeps a
    piece at least half full, else at a word."""
    words = [m.span() for m in _WORD.finditer(text, u.start, u.end)]
    counts = count_tokens([text[a:b] for a, b in words])
    out, i = [], 0
    while i < len(words):
        j, total, cut = i, 0, None
        while j < len(words) and (total + counts[j] <= chunk_tokens or j == i):
            total += counts[j]
            j += 1
            if _SENTENCE_END.search(text[words[j - 1][0]:words[j - 1][1]]) and total >= chunk_tokens // 2:
                cut = j
        if j < len(words) and cut is not None:
            j = cut
        start, end = words[i][0], words[j - 1][1]
        while end > start and text[end - 1].isspace():
            end -= 1
        out.append((Unit(start, end, u.location, u.section), sum(counts[i:j])))
        i = j
    return out


def span_location(first: str, last: str) -> str:
    """'Genesis 1:3' .. 'Genesis 1:7' -> 'Genesis 1:3-7'; otherwise the first unit's location."""
    if first == last:
        return first
    a, sep, x = first.rpartition(":")
    b, _, y = last.rpartition(":")
    return f"{a}:{x}-{y}" if sep and a == b and x.isdigit() and y.isdigit() else first


def _byte_offsets(text: str) -> Callable[[int], int]:
    """Character offset -> UTF-8 byte offset, counted on from the previous call (spans come in order)."""
    if text.isascii():
        return lambda i: i
    at = [0, 0]                     # (character, byte) of the previous answer

    def to_bytes(i: int) -> int:
        c, b = at if i >= at[0] else (0, 0)
        at[:] = [i, b + len(text[c:i].encode("utf-8", "surrogatepass"))]
        return at[1]
    return to_bytes


__all__ = ["Unit", "Document", "Chunk", "paragraphs", "kjv_documents", "pydoc_documents", "file_documents",
           "source_documents", "source_hash", "pack", "span_location", "DEFAULT_CHUNK_TOKENS", "DEFAULT_OVERLAP"]
