"""The verb record: one `lmforge ...` command, with its arguments and the function that runs it.

Every package that has verbs lists them in its own cli.py as `VERBS: list[Verb]`; lmforge/cli.py builds the
parser from those lists. A cli module is imported just to build the parser (also for `lmforge --help`), so it
imports nothing heavy at the top: torch, numpy and the library modules that need them are imported inside the
run functions.

Also here: the few argument groups that verbs of several packages share.
"""
from __future__ import annotations

import argparse
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
