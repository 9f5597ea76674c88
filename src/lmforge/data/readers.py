"""Streaming readers for user corpus files: .txt / .md, .jsonl, .parquet.

Every reader is a generator of document texts that holds at most one document (or one bounded piece of a
huge text file) in memory, so a corpus larger than RAM streams through. Readers record what they see in a
`CorpusStats` (bytes read from disk, malformed lines, replaced characters); the Corpus does the rest.

Decisions a user can rely on:
- Text is UTF-8. Invalid bytes are decoded as U+FFFD (never an error) and counted in `replaced_chars`;
  a leading UTF-8 byte-order mark is dropped.
- .txt / .md: one document per file. A file larger than TXT_PIECE_BYTES (1 MiB) is yielded in pieces,
  each cut right after a blank line (a paragraph boundary) once it has passed TXT_PIECE_BYTES, or at the
  next line end once it has passed 2 * TXT_PIECE_BYTES; a single line longer than that is sliced (at a
  UTF-8 character boundary). The pieces, joined, are exactly the file's text.
- .jsonl: one document per line, text in `text_field`. Blank lines are skipped silently. A malformed line
  stops the read with a DataError naming file:line, or with skip_bad_lines is counted and skipped.
- .parquet: text column `text_field` (string or binary), read batch by batch, row group by row group.
  A null in that column counts as a bad line.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator

from lmforge.errors import DataError

TXT_PIECE_BYTES = 1 << 20   # .txt/.md files above this size stream as several documents (see above)
PARQUET_BATCH_ROWS = 1024   # rows per pyarrow batch: small enough to bound memory, big enough to be fast

EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")


# ---------------------------------------------------------------------------------------------- UTF-8


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8 with U+FFFD for invalid bytes; return (text, number of U+FFFD inserted).

    The count is exact as long as `raw` does not end inside a character (the readers make sure of that):
    'replace' inserts one U+FFFD per invalid sequence, and genuine U+FFFD in the input (EF BF BD) are
    subtracted.
    """
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def split_utf8_tail(raw: bytes) -> tuple[bytes, bytes]:
    """Split off an incomplete UTF-8 character at the end of `raw` (to be glued to the next read)."""
    for i in range(len(raw) - 1, max(len(raw) - 4, -1), -1):
        b = raw[i]
        if b & 0xC0 == 0x80:          # continuation byte: keep looking for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return (raw[:i], raw[i:]) if len(raw) - i < need else (raw, b"")
    return raw, b""


def replace_surrogates(text: str) -> tuple[str, int]:
    """Lone surrogates (possible in JSON: "\\ud800") cannot be UTF-8 encoded: make them U+FFFD."""
    return _SURROGATE.subn("\ufffd", text)


# ----------------------------------------------------------------------------------------- bad lines


def bad_line(stats, skip: bool, where: str, problem: str) -> None:
    """A malformed record: raise, or (skip_bad_lines) count it and remember the first one for the report."""
    if not skip:
        raise DataError(f"{where}: {problem}")
    stats.bad_lines += 1
    if stats.first_bad_line is None:
        stats.first_bad_line = f"{where}: {problem}"


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------ readers


def read_text(path: str, stats) -> Iterator[str]:
    """A .txt/.md file: one document, streamed in paragraph-aligned pieces if it is large."""
    with _open(path) as f:
        piece: list[bytes] = []
        size, carry, first, yielded = 0, b"", True, False
        while True:
            chunk = f.readline(TXT_PIECE_BYTES)   # bounded even if the file has no newline at all
            if not chunk:
                break
            stats.bytes_read += len(chunk)
            if first:
                chunk, first = chunk.removeprefix(_BOM), False
            chunk = carry + chunk
            chunk, carry = (chunk, b"") if chunk.endswith(b"\n") else split_utf8_tail(chunk)
            piece.append(chunk)
            size += len(chunk)
            if size >= 2 * TXT_PIECE_BYTES or (size >= TXT_PIECE_BYTES and not chunk.strip()):
                text, bad = decode_utf8(b"".join(piece))
                stats.replaced_chars += bad
                piece, size, yielded = [], 0, True
                yield text
        piece.append(carry)   # an incomplete character at EOF is invalid: decoded as U+FFFD
        if size or carry or not yielded:
            text, bad = decode_utf8(b"".join(piece))
            stats.replaced_chars += bad
            yield text


def read_jsonl(path: str, text_field: str, stats, skip_bad_lines: bool) -> Iterator[str]:
    """A .jsonl file: one document per line, the text in `text_field`."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes_read += len(raw)
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            if not raw.strip():
                continue
            line, bad = decode_utf8(raw)
            stats.replaced_chars += bad
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"bad JSON: {e.msg} (column {e.colno})"
            else:
                if not isinstance(obj, dict):
                    problem = f"not a JSON object (got {_kind(obj)})"
                elif text_field not in obj:
                    keys = ", ".join(map(repr, list(obj)[:8])) or "none"
                    problem = f"missing field '{text_field}' (fields: {keys})"
                elif not isinstance(obj[text_field], str):
                    problem = f"field '{text_field}' is not a string (got {_kind(obj[text_field])})"
                else:
                    yield obj[text_field]
                    continue
            bad_line(stats, skip_bad_lines, f"{path}:{lineno}", problem)


def import_parquet():
    """pyarrow.parquet, or a DataError saying how to get it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet files needs pyarrow: pip install 'lmforge[parquet]'") from None
    return pq


def read_parquet(path: str, text_field: str, stats, skip_bad_lines: bool) -> Iterator[str]:
    """A .parquet file: one document per row, the text in column `text_field`."""
    pq = import_parquet()
    import pyarrow as pa
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable parquet file ({e})", file=path) from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"no column '{text_field}' (columns: {', '.join(schema.names)}); "
                        f"choose one with --text-field", file=path)
    kind = schema.field(text_field).type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if not (is_text or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise DataError(f"column '{text_field}' holds {kind}, not text", file=path)
    # progress: the file's bytes, spread over its rows
    size, rows_total, row = os.path.getsize(path), max(pf.metadata.num_rows, 1), 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            start = row
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    bad_line(stats, skip_bad_lines, f"{path}: row {row}", f"column '{text_field}' is null")
                    continue
                if not is_text:
                    value, bad = decode_utf8(value)
                    stats.replaced_chars += bad
                yield value
            stats.bytes_read += size * row // rows_total - size * start // rows_total
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"corrupt parquet data near row {row + 1} ({e})", file=path) from None


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", file=path) from None
