"""The index: ONE SQLite file holding the chunks, their full text (FTS5, BM25) and their vectors (sqlite-vec).

    store = Store.open("kjv.sqlite", create=True)
    store.check_settings(embedder="minilm", dim=384, chunk_tokens=128, overlap=0)
    with store.transaction():
        store.remove_source("kjv")
        store.add_source("kjv", content_hash, chunks, vectors)

Tables:
    meta          key/value: format version, embedder name and dimension, chunk_tokens, overlap
    sources       one row per indexed source (a file path or a built-in corpus name) with its content hash
    chunks        source, document, location, byte span, token count, text
    chunks_fts    FTS5 over chunks.text (external content: the text is stored once), Porter-stemmed words
    chunks_vec    sqlite-vec vec0 table of float32 vectors, cosine distance, rowid = chunk id

Why apsw: Python's own sqlite3 module may be built without `enable_load_extension`, and sqlite-vec is a loadable
extension; apsw always can load one, and ships a recent SQLite with FTS5.
Chunk ids are never reused (AUTOINCREMENT), so an id cited in an answer never names another chunk later.
Writes are transactions (SQLite's rollback journal): a source's old chunks leave and its new ones arrive together,
so a process killed in the middle (SIGKILL included) leaves the index as it was after the last committed source.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from lmforge.errors import ConfigError, DataError

FORMAT = "lmforge-rag-1"
SQLITE_MAGIC = b"SQLite format 3\x00"


def connect(path: str):
    """An apsw connection with sqlite-vec loaded, or a one-line error saying what to install."""
    try:
        import apsw
        import sqlite_vec
    except ImportError as e:
        raise ConfigError(f"lmforge rag needs the package {e.name!r}: pip install 'lmforge[rag]'") from None
    try:
        con = apsw.Connection(path)
        con.enable_load_extension(True)
        con.load_extension(sqlite_vec.loadable_path())
        con.enable_load_extension(False)
    except apsw.Error as e:
        raise DataError(f"cannot open as an SQLite database: {e}", file=path) from None
    con.setbusytimeout(10_000)
    return con


class Store:
    def __init__(self, con, path: str):
        self.con, self.path = con, path
        self.meta = dict(self.con.execute("SELECT key, value FROM meta"))
        self._matrix = None          # (ids, vectors) for the dense scan, read once, dropped on a write
        self._common = None          # stems in more than half the chunks, dropped on a write

    @classmethod
    def open(cls, path, create: bool = False) -> "Store":
        """The index at `path`. Refused with a one-line DataError: a file that is not SQLite, an SQLite file that
        is not an index, a missing file (unless `create`, which makes an empty index)."""
        import apsw
        path = str(path)
        p = Path(path)
        if p.is_dir():
            raise DataError("is a directory, not an index file", file=path)
        exists = p.exists()
        if not exists and not create:
            raise DataError("no such index (build one with: lmforge rag index --input ... --db FILE)", file=path)
        if exists:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            if head and head != SQLITE_MAGIC:
                raise DataError("not an SQLite file (not a RAG index)", file=path)
        con = connect(path)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
            if "meta" not in tables:
                if tables:
                    raise DataError("an SQLite file, but not an lmforge RAG index (no meta table)", file=path)
                if not create:
                    raise DataError("an empty SQLite file, not an index", file=path)
                with con:
                    con.execute(SCHEMA)
                    con.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            store = cls(con, path)
            if store.meta.get("format") != FORMAT:
                raise DataError(f"index format {store.meta.get('format')!r}, this lmforge reads {FORMAT!r}", file=path)
            return store
        except apsw.Error as e:
            con.close()
            raise DataError(f"cannot read the index: {e}", file=path) from None
        except BaseException:
            con.close()
            raise

    def close(self) -> None:
        self.con.close()

    # ---- settings --------------------------------------------------------------------------------------------
    def check_settings(self, *, embedder: str, dim: int, chunk_tokens: int | None = None,
                       overlap: int | None = None) -> None:
        """Record the settings in a new index; in an existing one, refuse others (one line naming both)."""
        given = {"embedder": embedder, "dim": str(dim)}
        if chunk_tokens is not None:
            given.update(chunk_tokens=str(chunk_tokens), overlap=str(overlap or 0))
        if "embedder" not in self.meta:
            missing = {"chunk_tokens", "overlap"} - given.keys()
            if missing:
                raise DataError("the index is empty: build it first with lmforge rag index", file=self.path)
            with self.con:
                self.con.executemany("INSERT INTO meta VALUES (?, ?)", list(given.items()))
                self.con.execute(f"CREATE VIRTUAL TABLE chunks_vec USING vec0(embedding float[{int(dim)}] "
                                 "distance_metric=cosine)")
            self.meta.update(given)
            return
        if self.meta["embedder"] != embedder or self.meta["dim"] != str(dim):
            raise ConfigError(f"this index was built with the embedder {self.meta['embedder']!r} "
                              f"({self.meta['dim']} dimensions), not {embedder!r} ({dim}); query it with "
                              f"--embedder {self.meta['embedder']} or build another index", field="embedder")
        for key in ("chunk_tokens", "overlap"):
            if key in given and given[key] != self.meta[key]:
                raise ConfigError(f"this index was built with {key} {self.meta[key]}, not {given[key]}; "
                                  f"use the same settings or another --db", field=key)

    @property
    def embedder(self) -> str | None:
        return self.meta.get("embedder")

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    # ---- writing ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self):
        with self.con:
            yield

    def source_hash(self, name: str) -> str | None:
        row = self.con.execute("SELECT hash FROM sources WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def add_source(self, name: str, content_hash: str, chunks, vectors: np.ndarray) -> None:
        """Inside a transaction, after remove_source: the source's chunks, FTS rows and vectors."""
        self._matrix = self._common = None
        cur = self.con.execute("INSERT INTO sources(name, hash, chunks, indexed_at) VALUES (?, ?, ?, ?) "
                               "RETURNING id", (name, content_hash, len(chunks), time.time()))
        source_id = cur.fetchone()[0]
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for c, v in zip(chunks, vectors):
            cid = self.con.execute(
                "INSERT INTO chunks(source_id, document, location, start, end, tokens, text) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (source_id, c.document, c.location, c.start, c.end, c.tokens, c.text)).fetchone()[0]
            self.con.execute("INSERT INTO chunks_fts(rowid, text) VALUES (?, ?)", (cid, c.text))
            self.con.execute("INSERT INTO chunks_vec(rowid, embedding) VALUES (?, ?)", (cid, v.tobytes()))

    def remove_source(self, name: str) -> int:
        """Inside a transaction: drop the source's chunks (text, FTS rows, vectors); returns how many."""
        row = self.con.execute("SELECT id FROM sources WHERE name = ?", (name,)).fetchone()
        if row is None:
            return 0
        sid = row[0]
        self._matrix = self._common = None
        n = self.con.execute("SELECT count(*) FROM chunks WHERE source_id = ?", (sid,)).fetchone()[0]
        # external-content FTS5: its rows are deleted with the text they were made from
        self.con.execute("INSERT INTO chunks_fts(chunks_fts, rowid, text) "
                         "SELECT 'delete', id, text FROM chunks WHERE source_id = ?", (sid,))
        self.con.execute("DELETE FROM chunks_vec WHERE rowid IN (SELECT id FROM chunks WHERE source_id = ?)", (sid,))
        self.con.execute("DELETE FROM chunks WHERE source_id = ?", (sid,))
        self.con.execute("DELETE FROM sources WHERE id = ?", (sid,))
        return n

    def optimize(self) -> None:
        """Merge the FTS5 index's segments into one (after a batch of writes: fewer b-trees per query term)."""
        with self.con:
            self.con.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('optimize')")

    # ---- reading ---------------------------------------------------------------------------------------------
    def count(self) -> int:
        return self.con.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def sources(self) -> list[tuple[str, int]]:
        return list(self.con.execute("SELECT name, chunks FROM sources ORDER BY id"))

    def chunks(self, ids: list[int]) -> dict[int, dict]:
        """{id: {id, source, document, location, start, end, tokens, text}} of the chunks that exist."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.con.execute(
            f"SELECT c.id, s.name, c.document, c.location, c.start, c.end, c.tokens, c.text FROM chunks c "
            f"JOIN sources s ON s.id = c.source_id WHERE c.id IN ({marks})", [int(i) for i in ids])
        keys = ("id", "source", "document", "location", "start", "end", "tokens", "text")
        return {r[0]: dict(zip(keys, r)) for r in rows}

    def all_chunks(self) -> list[tuple[int, str, str, str]]:
        """(id, source, document, location) of every chunk, in order (the benchmark's answer keys)."""
        return list(self.con.execute("SELECT c.id, s.name, c.document, c.location FROM chunks c "
                                     "JOIN sources s ON s.id = c.source_id ORDER BY c.id"))

    def bm25(self, match: str, limit: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score: higher is better) for an FTS5 MATCH expression."""
        return [(i, -s) for i, s in self.con.execute(
            "SELECT rowid, bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?",
            (match, limit))]

    def knn(self, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the `limit` nearest vectors: an exact scan, as one matrix-vector product
        over all the vectors (read from the vec0 table once; 4 bytes x dim per chunk of memory). Measured faster
        than vec0's own scan (bench/rag.py prints both). Done by torch, not numpy: one thread pool in the process
        (the embedder's), instead of two that spin against each other between a query's steps."""
        import torch
        if "embedder" not in self.meta or limit < 1:
            return []
        ids, vecs = self.matrix()
        if not len(ids):
            return []
        scores = vecs @ torch.as_tensor(np.asarray(vector, dtype=np.float32))
        top = torch.topk(scores, min(limit, len(ids))).indices        # best first
        return [(int(ids[i]), float(scores[i])) for i in top]

    def matrix(self):
        """(chunk ids, vectors) as torch tensors, read from the vec0 table on first use."""
        import torch
        if self._matrix is None:
            rows = self.con.execute("SELECT rowid, embedding FROM chunks_vec ORDER BY rowid").fetchall()
            ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
            vecs = torch.frombuffer(bytearray(b"".join(r[1] for r in rows)), dtype=torch.float32)
            self._matrix = ids, vecs.view(len(rows), self.dim)
        return self._matrix

    def knn_vec0(self, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """The same through sqlite-vec's own KNN query (cosine distance = 1 - similarity)."""
        q = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        return [(i, 1.0 - d) for i, d in self.con.execute(
            "SELECT rowid, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ?", (q, limit))]

    def common_stems(self) -> set[str]:
        """Stems found in more than half of the chunks. FTS5's BM25 gives such a term an idf of 1e-6 (its
        idf would be negative), so leaving it out of a query keeps the ranking and saves reading its long
        posting list (on the KJV: the, and, of, that, to, in, for)."""
        if self._common is None:
            self.con.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_vocab USING fts5vocab(main, "
                             "'chunks_fts', 'row')")
            n = self.count()
            self._common = {t for t, in self.con.execute("SELECT term FROM temp.chunks_vocab WHERE doc * 2 > ?",
                                                         (n,))}
        return self._common

    def stems(self, word: str) -> list[str]:
        """What the index's tokenizer makes of `word` (Porter stems, lower case, no diacritics)."""
        import apsw
        tok = self.con.fts5_tokenizer("porter", ["unicode61", "remove_diacritics", "2"])
        return [t[2] for t in tok(word.encode("utf-8", "surrogatepass"), apsw.FTS5_TOKENIZE_QUERY, None)]

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return {i: np.frombuffer(b, dtype=np.float32) for i, b in self.con.execute(
            f"SELECT rowid, embedding FROM chunks_vec WHERE rowid IN ({marks})", [int(i) for i in ids])}


SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sources(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, hash TEXT NOT NULL, chunks INTEGER NOT NULL,
                     indexed_at REAL NOT NULL);
CREATE TABLE chunks(id INTEGER PRIMARY KEY AUTOINCREMENT, source_id INTEGER NOT NULL REFERENCES sources(id),
                    document TEXT NOT NULL, location TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL,
                    tokens INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX chunks_by_source ON chunks(source_id);
CREATE VIRTUAL TABLE chunks_fts USING fts5(text, content='chunks', content_rowid='id',
                                           tokenize='porter unicode61 remove_diacritics 2');
"""


def is_sqlite_file(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


__all__ = ["Store", "connect", "FORMAT", "is_sqlite_file"]
