"""Token shards: a corpus tokenized once into flat, memory-mappable token files.

    OUT/train.bin   tokens of the training documents, raw little-endian uint16 (uint32 if vocab > 65535)
    OUT/val.bin     tokens of the held-out documents
    OUT/meta.json   tokenizer hash, vocab_size, dtype, bos_id, and per split: tokens, bytes, documents

Each document is stored as [bos] + encode(text), so a training window can start at any BOS and a model
always sees where documents begin. `bytes` is the UTF-8 size of the split's text (BOS adds none), which
makes bits-per-byte = total loss in bits / bytes exact, whatever the tokenizer.

The split is by document, in one of two ways:
  random  each document goes to val with probability val_fraction (seeded: same corpus + seed, same files);
  tail    the last val_fraction of each source's documents (a built-in, a file, or a directory's files in
          sorted order) go to val, like nanoGPT's "last 10% of the text". Use it when documents repeat each
          other (the KJV's parallel passages, boilerplate in docs): a random split then rewards memorising
          them, which flatters n-gram models. It reads the corpus twice (the first pass only counts).
Both splits are made non-empty: with >= 2 documents, if one split came out
empty the last document of the other is moved over; a corpus of a single document is cut at character
(1 - val_fraction) * len(text), head to train and tail to val (each then counts as a document).

Documents stream through in batches (encode_batch) and are appended to the .bin files, so memory stays
bounded by one batch (BATCH_BYTES of text) whatever the corpus size. Everything is written into OUT.tmp/
and renamed to OUT only when complete; an existing OUT is replaced only then.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from lmforge.version import __version__
from lmforge.data.corpus import progress_bar
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_dir, write_json

BATCH_BYTES = 1 << 18      # text per encode_batch call: big enough for the tokenizer's threads, small for RAM
BATCH_DOCS = 1024
SPLITS = ("train", "val")
FORMAT = "lmforge-shards"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65535), else uint32; always little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class _SplitWriter:
    """Appends documents' tokens to one .bin file and counts tokens / bytes / documents."""

    def __init__(self, path: Path, dtype: np.dtype, vocab_size: int):
        self.path, self.dtype, self.vocab_size = path, dtype, vocab_size
        self.f = open(path, "wb")
        self.tokens = self.bytes = self.documents = 0
        self.last_start = self.last_bytes = 0       # where the last document starts, to move it if needed
        self.pending: list = []                     # token sequences not yet written (one batch at most)
        self.pending_tokens = 0

    def add(self, bos: int, ids, nbytes: int) -> None:
        """One document: [bos] + ids. `ids` is kept as given (no copy) until the next flush."""
        self.last_start, self.last_bytes = self.tokens, nbytes
        self.pending += [(bos,), ids]
        n = 1 + len(ids)
        self.pending_tokens += n
        self.tokens += n
        self.bytes += nbytes
        self.documents += 1

    def flush(self) -> None:
        if not self.pending:
            return
        arr = np.fromiter(itertools.chain.from_iterable(self.pending), dtype=np.int64, count=self.pending_tokens)
        if arr.min() < 0 or arr.max() >= self.vocab_size:   # a tokenizer bug, not a user error
            raise RuntimeError(f"token id {int(arr.max())} outside vocab_size {self.vocab_size}")
        # f.write, not ndarray.tofile: tofile can lose a failed write (disk full), leaving a short file
        self.f.write(arr.astype(self.dtype).data)
        self.pending, self.pending_tokens = [], 0

    def pop_last(self) -> tuple[np.ndarray, int]:
        """Remove the last document from the file; return its tokens and byte count."""
        self.flush()
        self.f.flush()
        tail = np.fromfile(self.path, dtype=self.dtype, offset=self.last_start * self.dtype.itemsize)
        self.f.truncate(self.last_start * self.dtype.itemsize)
        self.f.seek(0, os.SEEK_END)
        nbytes = self.last_bytes
        self.tokens, self.bytes, self.documents = self.last_start, self.bytes - nbytes, self.documents - 1
        return tail, nbytes

    def reset(self) -> None:
        self.pending, self.pending_tokens = [], 0
        self.f.seek(0)
        self.f.truncate()
        self.tokens = self.bytes = self.documents = 0

    def close(self) -> None:
        self.flush()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def counts(self) -> dict:
        return {"file": self.path.name, "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


SPLIT_RULES = ("random", "tail")


def prepare_shards(corpus, tokenizer, out_dir, val_fraction: float = 0.1, seed: int = 0,
                   progress: bool = True, split: str = "random") -> dict:
    """Tokenize `corpus` (a Corpus) with `tokenizer` into OUT/{train,val}.bin + meta.json; return the meta.
    split: 'random' or 'tail' (see the module docstring)."""
    check_options(val_fraction, out_dir, split)
    out = Path(out_dir)
    vocab_size, bos = int(tokenizer.vocab_size), int(tokenizer.bos_id)
    dtype = token_dtype(vocab_size)
    assign = _assigner(corpus, split, val_fraction, seed, progress)
    t0 = time.time()
    writers: dict[str, _SplitWriter] = {}
    try:
        with atomic_dir(out) as tmp:
            writers = {s: _SplitWriter(tmp / f"{s}.bin", dtype, vocab_size) for s in SPLITS}
            bar = progress_bar(corpus.total_bytes, "tokenizing", progress)
            first_text, n_docs = None, 0
            try:
                for batch in _batches(assign(corpus.iter_sources(progress=False))):
                    texts = [text for text, _ in batch]
                    for (text, part), ids in zip(batch, tokenizer.encode_batch(texts)):
                        writers[part].add(bos, ids, len(text.encode("utf-8")))
                        n_docs += 1
                        if n_docs == 1:
                            first_text = text     # kept only for the single-document case
                        elif n_docs == 2:
                            first_text = None
                    for w in writers.values():
                        w.flush()
                    bar.update(corpus.stats.bytes_read - bar.n)
                    tokens = sum(w.tokens for w in writers.values())
                    bar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9) / 1e3:.1f}k tok/s", refresh=False)
            except BaseException:
                bar.leave = False     # an error message alone on its line, not under a dead bar
                raise
            finally:
                bar.close()
            if n_docs == 0:   # a Corpus raises first; this guards other iterables
                raise DataError(f"the corpus has no documents: {corpus}")
            single = n_docs == 1
            if single:
                _split_single(first_text, tokenizer, writers, val_fraction)
            else:
                for a, b in (("train", "val"), ("val", "train")):
                    if writers[b].documents == 0:    # make sure both splits have something
                        tail, nbytes = writers[a].pop_last()    # starts with its BOS
                        writers[b].add(int(tail[0]), tail[1:].tolist(), nbytes)
            for w in writers.values():
                w.close()

            stats = corpus.stats
            meta = {
                "format": FORMAT, "format_version": 1, "lmforge_version": __version__,
                "tokenizer_hash": tokenizer.hash(), "vocab_size": vocab_size, "dtype": dtype.name,
                "byte_order": "little", "bos_id": bos, "eos_id": getattr(tokenizer, "eos_id", None),
                "train": writers["train"].counts(), "val": writers["val"].counts(),
                "sources": list(corpus.sources), "text_field": corpus.text_field,
                "val_fraction": val_fraction, "split": split, "seed": seed, "single_document_split": single,
                "corpus": {"documents": stats.documents, "bytes": stats.bytes, "files": stats.files,
                           "bad_lines": stats.bad_lines, "replaced_chars": stats.replaced_chars,
                           "empty_documents": stats.empty_documents, "skipped_files": len(stats.skipped_files)},
            }
            write_json(tmp / "meta.json", meta)
    finally:
        for w in writers.values():
            try:
                w.f.close()
            except OSError:  # after a failed write: its buffer cannot be flushed either, and the error is raised
                pass
    return meta


def _assigner(corpus, rule: str, val_fraction: float, seed: int, progress: bool):
    """A function (label, docs) pairs -> (text, 'train' | 'val') pairs implementing the split rule."""
    if rule == "random":
        rng = random.Random(seed)

        def assign(units):
            for _, docs in units:
                for text in docs:
                    yield text, ("val" if rng.random() < val_fraction else "train")
        return assign

    counts: dict[str, int] = {}     # tail: count each source's documents first
    for label, docs in corpus.iter_sources(progress=progress):
        src = corpus.source_of(label)
        counts[src] = counts.get(src, 0) + sum(1 for _ in docs)
    # a source of n >= 2 documents gives its last max(1, round(n * f)) to val (never all of them)
    first_val = {s: n - min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else n for s, n in counts.items()}

    def assign(units):
        seen: dict[str, int] = {}
        for label, docs in units:
            src = corpus.source_of(label)
            for text in docs:
                i = seen[src] = seen.get(src, 0) + 1
                yield text, ("val" if i > first_val[src] else "train")
    return assign


def _batches(docs):
    batch, size = [], 0
    for item in docs:
        batch.append(item)
        size += len(item[0])
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _split_single(text: str, tokenizer, writers: dict, val_fraction: float) -> None:
    """One document: head -> train, tail -> val, cut at a character boundary."""
    if len(text) < 2:
        raise DataError("the corpus is a single document of one character: too little text to make "
                        "a train and a val split")
    cut = min(max(round(len(text) * (1 - val_fraction)), 1), len(text) - 1)
    bos = int(tokenizer.bos_id)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        w = writers[split]
        w.reset()
        w.add(bos, tokenizer.encode(part), len(part.encode("utf-8")))
        w.flush()


def check_options(val_fraction: float, out_dir, split: str = "random") -> None:
    """Bad options fail before any tokenizing; never overwrite something that is not a shard directory."""
    if split not in SPLIT_RULES:
        raise ConfigError(f"split must be one of {', '.join(SPLIT_RULES)}, got {split!r}", field="split")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}",
                          field="val_fraction")
    out = Path(out_dir)
    if out.is_file():
        raise DataError("exists and is a file, not a shard directory", file=str(out))
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise DataError("exists, is not empty and holds no meta.json: refusing to replace it; "
                        "choose another --out", file=str(out))


def load_shards(data_dir, tokenizer_hash: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train tokens, val tokens, meta): read-only memmaps checked against meta.json. With tokenizer_hash,
    also check the shards were made by that tokenizer."""
    d = Path(data_dir)
    hint = "make it with `lmforge data prepare`"
    if not d.is_dir():
        raise DataError(f"shard directory not found; {hint}", file=str(d))
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"missing: not a shard directory; {hint}", file=str(meta_path))
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"bad JSON: {e.msg}", file=str(meta_path), line=e.lineno) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read ({e})", file=str(meta_path)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"not an lmforge shard meta.json (format is not '{FORMAT}')", file=str(meta_path))
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"dtype must be uint16 or uint32, got {meta.get('dtype')!r}", file=str(meta_path),
                        field="dtype")
    dtype = np.dtype("<u2" if meta["dtype"] == "uint16" else "<u4")
    if tokenizer_hash is not None and meta.get("tokenizer_hash") != tokenizer_hash:
        raise DataError(f"shards were made with tokenizer {meta.get('tokenizer_hash')!r}, not this one "
                        f"({tokenizer_hash!r}); re-run `lmforge data prepare` with it", file=str(meta_path))
    arrays = []
    for split in SPLITS:
        info = meta.get(split)
        if not isinstance(info, dict) or not isinstance(info.get("tokens"), int) or info["tokens"] < 0:
            raise DataError(f"missing or bad token count", file=str(meta_path), field=f"{split}.tokens")
        path = d / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"missing; {hint}", file=str(path))
        expected = info["tokens"] * dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"has {path.stat().st_size} bytes but meta.json says {info['tokens']} tokens "
                            f"({expected} bytes): incomplete or foreign file; re-run `lmforge data prepare`",
                            file=str(path))
        arrays.append(np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype))
    return arrays[0], arrays[1], meta
