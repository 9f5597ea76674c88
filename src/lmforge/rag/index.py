"""`Index`: the Python API over one index file — add sources, search them, answer questions from them.

    from lmforge.rag import Index
    with Index("kjv.sqlite") as ix:                  # made on the first add; embedder minilm by default
        ix.add(["kjv", "notes/"])                    # built-ins, files, directories; unchanged ones are skipped
        for hit in ix.search("who built the ark", k=5, mode="hybrid"):
            print(hit.rank, hit.score, hit.source, hit.location)
        model, tok = lmforge.load("runs/quickstart/sft")
        answer = ix.ask(model, tok, "Who built the ark?", on_text=print)
        for s in answer.sources: print(f"[{s.n}] {s.source} {s.location}")

An index built with a checkpoint as its embedder is reopened with that embedder passed in:
`Index(path, embedder=CheckpointEmbedder(*lmforge.load(ckpt), name=...))` (the library never loads models itself).

Adding a source: its content hash (the file's bytes, or the built-in's data) is compared with the one recorded; an
unchanged source is skipped, a changed one has all its chunks replaced, in one transaction per source. A file indexed
from a directory that is given again but no longer holds it leaves the index. Every
source is read and chunked before anything is embedded or written, so a bad file fails before any work is done and
an empty corpus leaves no file behind.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import ConfigError, DataError
from lmforge.rag import answer as answering
from lmforge.rag import retrieve
from lmforge.rag.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP, Chunk, pack, source_documents, source_hash
from lmforge.rag.embed import MINILM, Embedder, MiniLM, check_dim, progress
from lmforge.rag.store import Store


@dataclass
class AddReport:
    indexed: list[tuple[str, int]] = field(default_factory=list)   # (source, chunks) written
    skipped: list[str] = field(default_factory=list)               # unchanged sources
    dropped: list[str] = field(default_factory=list)               # sources gone from their directory
    removed: int = 0                                               # old chunks replaced or dropped
    chunks: int = 0                                                # chunks embedded and written
    seconds: float = 0.0
    embed_seconds: float = 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / max(self.embed_seconds, 1e-9)


def make_embedder(name: str | Embedder | None) -> Embedder:
    if isinstance(name, Embedder):
        return name
    if name in (None, MINILM):
        return MiniLM()
    raise ConfigError(f"unknown embedder {name!r}: use 'minilm', or pass a CheckpointEmbedder (the command line "
                      f"takes a checkpoint directory)", field="embedder")


class Index:
    def __init__(self, path, embedder: str | Embedder | None = None, *, chunk_tokens: int | None = None,
                 overlap: int | None = None, create: bool = True):
        self.path = str(path)
        exists = Path(self.path).exists()
        self.store = Store.open(self.path) if exists or not create else None
        try:
            self._settle(embedder, chunk_tokens, overlap)
        except BaseException:
            self.close()
            raise

    def _settle(self, embedder, chunk_tokens: int | None, overlap: int | None) -> None:
        """The embedder and chunk settings: the index's own, refusing others (one-line errors)."""
        recorded = self.store.embedder if self.store else None
        if embedder is None and recorded is not None and recorded != MINILM:
            raise ConfigError(f"this index was built with the embedder {recorded!r}: pass it "
                              f"(the command line: --embedder {recorded})", field="embedder")
        self.embedder = make_embedder(embedder)
        if recorded is not None:
            self.store.check_settings(embedder=self.embedder.name, dim=self.embedder.dim)
        meta = self.store.meta if self.store else {}
        self.chunk_tokens = int(meta.get("chunk_tokens", chunk_tokens or min(DEFAULT_CHUNK_TOKENS,
                                                                               self.embedder.window)))
        self.overlap = int(meta.get("overlap", DEFAULT_OVERLAP if overlap is None else overlap))
        if chunk_tokens is not None or overlap is not None:
            self._check_chunking(chunk_tokens or self.chunk_tokens, self.overlap if overlap is None else overlap)

    def _check_chunking(self, chunk_tokens: int, overlap: int) -> None:
        if chunk_tokens > self.embedder.window:
            raise ConfigError(f"{chunk_tokens} tokens do not fit the embedder's window of {self.embedder.window}",
                              field="chunk_tokens")
        if not 0 <= overlap < chunk_tokens:
            raise ConfigError(f"must be in [0, chunk_tokens = {chunk_tokens}), got {overlap}", field="overlap")
        if self.store is not None and "chunk_tokens" in self.store.meta:
            self.store.check_settings(embedder=self.embedder.name, dim=self.embedder.dim, chunk_tokens=chunk_tokens,
                                      overlap=overlap)
        self.chunk_tokens, self.overlap = chunk_tokens, overlap

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    # ---- adding ------------------------------------------------------------------------------------------------
    def add(self, sources: list[str] | str, *, text_field: str = "text", skip_bad_lines: bool = False,
            progress_bar: bool = False) -> AddReport:
        """Index built-in corpora, files and directories (as `lmforge data` reads them); see the module docstring."""
        from lmforge.data.corpus import Corpus
        corpus = Corpus([sources] if isinstance(sources, (str, os.PathLike)) else list(sources), text_field,
                        skip_bad_lines)
        work = []
        for label, is_file in corpus.units():
            name = os.path.normpath(label) if is_file else label
            h = source_hash(label, is_file, text_field)
            work.append((name, h, lambda label=label, is_file=is_file: list(
                source_documents(label, is_file, text_field, skip_bad_lines))))
        # files indexed from a directory given again, that are no longer in it, leave the index
        dirs = tuple(os.path.normpath(s) + os.sep for s in corpus.sources if os.path.isdir(s))
        present = {name for name, _, _ in work}
        gone = [n for n, _ in self.store.sources() if n.startswith(dirs) and n not in present] \
            if dirs and self.store is not None else []
        return self.add_documents(work, progress_bar=progress_bar, remove=gone)

    def add_documents(self, work: list, progress_bar: bool = False, remove: list[str] = ()) -> AddReport:
        """The general form of `add`: `work` is [(source name, content hash, () -> list[Document])], the
        documents read only when the hash differs from the recorded one; `remove`: sources to drop."""
        t0 = time.perf_counter()
        report, todo = AddReport(), []
        for name in remove:
            with self.store.transaction():
                report.removed += self.store.remove_source(name)
            report.dropped.append(name)
        for name, h, read in work:
            if self.store is not None and self.store.source_hash(name) == h:
                report.skipped.append(name)
                continue
            todo.append((name, h, pack(read(), self.embedder.count_tokens, self.chunk_tokens, self.overlap)))
        if not any(chunks for _, _, chunks in todo) and not report.skipped and not report.dropped:
            raise DataError(f"no text to index in {', '.join(n for n, _, _ in todo) or 'the input'}")
        if todo and self.store is None:
            self.store = Store.open(self.path, create=True)
        if todo:
            self.store.check_settings(embedder=self.embedder.name, dim=self.embedder.dim,
                                      chunk_tokens=self.chunk_tokens, overlap=self.overlap)
        total = sum(len(c) for _, _, c in todo)
        with progress(total, "indexing", "chunk", progress_bar) as bar:
            for name, h, chunks in todo:
                t1 = time.perf_counter()
                vectors = self.embedder.embed([c.text for c in chunks], bar=bar)
                report.embed_seconds += time.perf_counter() - t1
                if len(chunks):
                    check_dim(vectors, self.embedder.dim)
                with self.store.transaction():         # old chunks out, new ones in: together or not at all
                    report.removed += self.store.remove_source(name)
                    self.store.add_source(name, h, chunks, vectors)
                report.indexed.append((name, len(chunks)))
                report.chunks += len(chunks)
        if todo or report.dropped:
            self.store.optimize()
        report.seconds = time.perf_counter() - t0
        return report

    # ---- reading -----------------------------------------------------------------------------------------------
    def _opened(self) -> Store:
        if self.store is None or self.store.embedder is None:
            raise DataError("the index is empty: add sources first (lmforge rag index)", file=self.path)
        return self.store

    def search(self, query: str, k: int = 5, mode: str = "hybrid", mmr: float | None = None) -> list:
        """The k best chunks (retrieve.Hit) for `query`: mode bm25 | dense | hybrid; mmr: lambda for MMR."""
        return retrieve.search(self._opened(), self.embedder, query, k, mode, mmr)

    def ask(self, model, tokenizer, question: str, *, k: int = 5, mode: str = "hybrid", mmr: float | None = None,
            params=None, on_text=None, precision: str = "fp32") -> answering.Answer:
        """Retrieve, build the numbered prompt within the model's context, generate the answer (streamed to
        `on_text`) through the engine; the Answer maps each [n] to its chunk."""
        hits = self.search(question, k, mode, mmr)
        answer_tokens = (params.max_tokens if params is not None and params.max_tokens
                         else answering.DEFAULT_ANSWER_TOKENS)
        prompt = answering.build_prompt(tokenizer, model.config.max_seq_len, question, hits, answer_tokens)
        return answering.answer_question(model, tokenizer, prompt, params, on_text, precision)

    def chunk(self, chunk_id: int) -> dict | None:
        return self._opened().chunks([chunk_id]).get(chunk_id)

    def stats(self) -> dict:
        s = self._opened()
        return {"chunks": s.count(), "sources": s.sources(), "embedder": s.embedder, "dim": s.dim,
                "chunk_tokens": self.chunk_tokens, "overlap": self.overlap}


__all__ = ["Index", "AddReport", "make_embedder", "Chunk"]
