"""Files that appear whole or not at all, and JSON in one style.

Everything lmforge writes for a later stage (checkpoints, shards, tokenizers, tables, exports) goes through
here: write into a sibling `NAME.tmp`, fsync, then rename over the target. A crash leaves either the old
file/directory or the new one, never half of one. Directories are swapped in two renames (old → `NAME.old`,
tmp → NAME); readers that find only `NAME.old` (a crash between the two) may use it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lmforge.errors import read_json_object  # noqa: F401  (the one JSON-object reader, re-exported)


def write_json(path: str | Path, obj, *, sort_keys: bool = False) -> None:
    """Write `obj` as indented UTF-8 JSON (non-ASCII kept as is), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open `path.tmp` for writing; on a clean exit fsync it and rename it to `path` (on error: delete it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty `path.tmp` directory to fill; on a clean exit fsync every file in it and swap it in for
    `path`. A leftover `.tmp` from an earlier crash is never trusted (deleted first); on error it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, path: Path) -> None:
    """Make directory `tmp` appear at `path`: move any old `path` to `path.old`, rename, delete the old one."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (not possible on every platform: then skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
