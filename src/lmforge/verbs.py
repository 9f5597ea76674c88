"""The verb record: one `lmforge ...` command, with its arguments and the function that runs it.

Every package that has verbs lists them in its own cli.py as `VERBS: list[Verb]`; lmforge/cli.py builds the
parser from those lists. A cli module is imported just to build the parser (also for `lmforge --help`), so it
imports nothing heavy at the top: torch, numpy and the library modules that need them are imported inside the
run functions.

Also here: the few argument groups that verbs of several packages share, the argparse types that declare a
number's range once (`positive_int`, `nonneg_int`), and `clean_text` for text that comes from argv or stdin.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Verb:
    path: tuple[str, ...]                                 # ("pretrain",) or ("eval", "bpb")
    help: str                                             # its line in `lmforge --help`, and its description
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the verb's arguments to its parser
    run: Callable[[argparse.Namespace], int]              # does the work; returns the exit code

    def __post_init__(self):
        if not self.path or not all(self.path):
            raise ValueError(f"a verb needs a non-empty path of names, got {self.path!r}")


def no_arguments(p: argparse.ArgumentParser) -> None:
    """For verbs without options (`lmforge data list`)."""


def add_source_options(p: argparse.ArgumentParser) -> None:
    """How to read a corpus (lmforge.data.corpus.Corpus): for every verb that takes --input files."""
    p.add_argument("--text-field", default="text",
                   help="JSONL/parquet field (column) that holds the text (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed JSONL lines (counted and reported) instead of stopping")


DEVICE_HELP = "auto | cpu | cuda | mps"


def add_device_option(p: argparse.ArgumentParser, help: str | None = DEVICE_HELP) -> None:
    """--device, resolved by lmforge.runtime.detect_device."""
    p.add_argument("--device", default="auto", help=help)


# ---- argument types: a bad value is a usage error (one line, exit 2) naming the flag, before anything runs
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, counts, budgets)."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0 (indices, optional extras where 0 means none)."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


# ---- text from argv / stdin ----------------------------------------------------------------------------
def clean_text(text: str, what: str) -> str:
    """`text` with invalid UTF-8 replaced by U+FFFD, and one warning on stderr naming `what` when there was any.
    Python hands undecodable argv/stdin bytes over as lone surrogates (surrogateescape), which no encoder
    accepts; the corpus readers treat files the same way."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    if all(0xDC80 <= ord(c) <= 0xDCFF for c in text if 0xD800 <= ord(c) <= 0xDFFF):
        # every surrogate is an escaped byte: restore the bytes, decode them as a UTF-8 decoder would
        fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    else:  # lone surrogates of another origin (a JSON "\\ud800" escape): one U+FFFD each
        fixed = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    print(f"lmforge: warning: {what}: invalid UTF-8 replaced with U+FFFD", file=sys.stderr)
    return fixed


def read_stdin_text(what: str = "standard input") -> str:
    """All of standard input as text, read as bytes so that invalid UTF-8 becomes U+FFFD (clean_text) whatever
    the locale's error handler."""
    buf = getattr(sys.stdin, "buffer", None)
    text = buf.read().decode("utf-8", "surrogateescape") if buf is not None else sys.stdin.read()
    return clean_text(text, what)
