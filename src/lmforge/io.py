"""Files that appear whole or not at all, and JSON in one style.

Everything lmforge writes for a later stage (checkpoints, shards, tokenizers, tables, exports) goes through
here: write into a sibling `NAME.tmp`, fsync, then rename over the target. A crash leaves either the old
file/directory or the new one, never half of one. Directories are swapped in two renames (old → `NAME.old`,
tmp → NAME); readers that find only `NAME.old` (a crash between the two) may use it. A write that fails (disk
full, file too large, permission denied) removes the temporary, keeps the previous output and raises WriteError
naming the output and the OS's reason.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lmforge.errors import WriteError


def write_json(path: str | Path, obj, *, sort_keys: bool = False) -> None:
    """Write `obj` as indented UTF-8 JSON (non-ASCII kept as is), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open `path.tmp` for writing; on a clean exit fsync it and rename it to `path` (on error: delete it).
    An OSError while writing (disk full, file too large, permission denied) becomes a WriteError naming `path`."""
    path = Path(path)
    if path.is_dir():
        raise WriteError("is a directory, expected a file name", file=str(path))
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and _is_about(e, path, tmp):
            raise write_error(e, path, tmp) from None
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty `path.tmp` directory to fill; on a clean exit fsync every file in it and swap it in for
    `path`. A leftover `.tmp` from an earlier crash is never trusted (deleted first); on error it is removed.
    An OSError while writing becomes a WriteError naming `path` (and the file inside it)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError("exists and is not a directory: refusing to replace it", file=str(path))
    tmp = path.with_name(path.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        swap_in(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and _is_about(e, path, tmp):
            raise write_error(e, path, tmp) from None
        if isinstance(e, WriteError) and e.file is not None and _inside(Path(e.file), tmp):
            e.file = str(path / Path(e.file).relative_to(tmp))   # a nested atomic write: name the real place
        raise


def write_error(e: OSError, target: Path, tmp: Path | None = None) -> WriteError:
    """The one-line error for an OSError met while writing `target` (through `tmp`): the file and the OS's
    reason (e.strerror: "No space left on device", "File too large", "Permission denied")."""
    file = target
    if e.filename is not None and tmp is not None and _inside(Path(e.filename), tmp):
        file = target / Path(e.filename).relative_to(tmp)
    # a short write without an errno (numpy's tofile: "N requested and M written") is a full disk or a size limit
    reason = e.strerror or f"{e} (disk full or file size limit?)"
    return WriteError(f"cannot write: {reason}", file=str(file))


def _inside(p: Path, d: Path) -> bool:
    return p == d or d in p.parents


def _is_about(e: OSError, target: Path, tmp: Path) -> bool:
    """Whether the OSError concerns this output. One about another file (an input read while writing) is
    not a write failure and keeps its own handling."""
    if e.filename is None:
        return True
    f = Path(e.filename)
    return _inside(f, tmp) or _inside(target, f)   # the output, its temporary, or a folder on the way to it


def check_replaceable_dir(path: str | Path, marker: str) -> None:
    """Before writing directory `path` with atomic_dir (which replaces it whole): refuse a file in the way, and
    a non-empty directory that does not hold `marker` (so not an earlier output of the same kind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError("exists and is not a directory: refusing to replace it", file=str(path))
    if path.is_dir() and any(path.iterdir()) and not (path / marker).exists():
        raise WriteError(f"exists, is not empty and holds no {marker}: refusing to replace it", file=str(path))


def swap_in(tmp: Path, path: Path) -> None:
    """Make directory `tmp` appear at `path`: move any old `path` to `path.old`, rename, delete the old one.
    At every instant a complete directory exists at `path` or `path.old` (where `checkpoint.resolve` looks): a
    `.old` left by an earlier crash is only dropped once `path` is there to replace it."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def run_lock(directory: str | Path) -> Iterator[None]:
    """Hold `directory/.lock` exclusively while a run writes there: a second writer (another process, or a second
    run in this one) is refused at once with the holder's PID, instead of both interleaving their checkpoints and
    metrics. The OS drops the lock when the holder exits, however it exits, so a killed run never leaves it behind."""
    import fcntl

    from lmforge.errors import ConfigError

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError("exists and is not a directory: a run needs a directory of its own", file=str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"another run (pid {holder}) is writing to this directory; wait for it, or choose "
                              f"another --out", file=str(directory)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)      # releases the lock (the file stays: deleting it would race with a waiting writer)


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
