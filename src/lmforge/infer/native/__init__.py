"""The native (C++) decode step, compiled on this machine on first use and cached.

    ext = load()          # the extension module, or None when it cannot be built here (reason: why_not())
    ext.NativeDecoder(emb, [6 tensors per layer...], norm_w, head, n_head, n_kv_heads, head_dim, eps).step(...)

`lmforge.infer.fastpath.FastDecoder` uses it when it loads and falls back to its own PyTorch ops otherwise, so
nothing breaks on a machine without a C++ compiler; the math and the tests are the same either way.
Build: torch.utils.cpp_extension with ninja and the system C++ compiler, about 30 s once; the module is cached
under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), named after a hash of the source, the torch
version, the Python environment (sys.prefix: two virtualenvs do not take turns rebuilding one directory) and this
CPU's model and flags (it is compiled with -march=native, so a cache shared between different CPUs never loads
code for the wrong one). LMFORGE_NATIVE=0 turns it off.

Build lock: torch guards a build with a `lock` file that a killed build leaves behind, after which torch waits
on it forever. So a builder first takes `lock.pid` (created exclusively, holding its PID): a lock.pid whose
process is dead is cleared together with torch's lock, and a live holder is waited for at most `lock_timeout`
seconds; then the PyTorch fast path is used, with one line on stderr saying why.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_step.cpp")
_lock = threading.Lock()
_state: dict = {}          # "ext": the module or None, "why": the reason it is None
LOCK_WAIT_S = 120.0        # a build takes about 30 s: a holder past this is stuck (or very slow)
# -fopenmp matters: at::parallel_for is an inline template that only fans out across threads when the including
# code is compiled with OpenMP; the runtime it links (libgomp.so.1) resolves to the one torch has already loaded
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def enabled() -> bool:
    return os.environ.get("LMFORGE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def module_name() -> str:
    h = hashlib.sha1()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _cpu_id().encode(), sys.version.encode(),
                 os.path.realpath(sys.prefix).encode(), " ".join(CFLAGS + LDFLAGS).encode()):
        h.update(part)
    return f"lmforge_decode_{h.hexdigest()[:12]}"


def load(verbose: bool = False):
    """The compiled extension, building it if needed; None when disabled or the build fails (see why_not())."""
    if not enabled():
        return None
    with _lock:
        if "ext" not in _state:
            _state["ext"], _state["why"] = build(verbose)
    return _state["ext"]


def why_not() -> str | None:
    """Why load() returned None (after a call), or None."""
    if not enabled():
        return "LMFORGE_NATIVE=0"
    return _state.get("why")


def build_dir() -> Path | None:
    """Where the extension is built and cached (None if torch cannot say)."""
    from torch.utils import cpp_extension
    try:
        return Path(cpp_extension._get_build_directory(module_name(), verbose=False))
    except Exception:  # a private torch helper: without it there is no lock handling, the build still runs
        return None


def build(verbose: bool = False, lock_timeout: float = LOCK_WAIT_S):
    """(extension module, None), or (None, why) when it cannot be built here; not cached (load() caches)."""
    try:
        from torch.utils import cpp_extension
        if not cpp_extension.is_ninja_available():
            return None, "ninja is not installed (pip install ninja)"
        name, where = module_name(), build_dir()
        busy = acquire_build_lock(where, lock_timeout) if where is not None else None
        if busy is not None:
            return _unavailable(busy)
        try:
            if where is None or not any(where.glob(f"{name}*.so")):
                print("lmforge: compiling the native decode step for this machine (once, about 30 s)...",
                      file=sys.stderr, flush=True)
            ext = cpp_extension.load(name=name, sources=[str(SOURCE)], verbose=verbose,
                                     extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS))  # torch appends to them
        finally:
            if where is not None:
                release_build_lock(where)
        return ext, None
    except Exception as e:  # no compiler, no headers, a compile error: the PyTorch fast path still works
        msg = str(e).strip().splitlines()
        return _unavailable(f"{type(e).__name__}: {msg[-1] if msg else ''}")


def _unavailable(why: str):
    why = f"native decode step unavailable ({why})"
    print(f"lmforge: {why}; using the PyTorch decode path", file=sys.stderr, flush=True)
    return None, why


def acquire_build_lock(directory: Path, timeout: float) -> str | None:
    """Take `directory/lock.pid` for this process. Returns None once held, or why not (a live holder kept it
    for `timeout` seconds). A holder that is dead, or a pid file left empty by a crash, is cleared, and with it
    torch's `lock`: while we hold lock.pid no other lmforge process is building, so a torch lock is stale."""
    directory.mkdir(parents=True, exist_ok=True)
    pid_file, deadline = directory / "lock.pid", time.monotonic() + timeout
    while True:
        try:
            fd = os.open(pid_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _read_pid(pid_file)
            if (holder is None and _age(pid_file) > 5.0) or (holder is not None and not pid_alive(holder)):
                pid_file.unlink(missing_ok=True)     # its builder died (killed mid-compile)
                continue
            if time.monotonic() >= deadline:
                return (f"the build directory {directory} is locked by process {holder}, still running after "
                        f"{timeout:g} s; remove {pid_file} and {directory / 'lock'} if no build is running")
            time.sleep(min(0.2, max(timeout, 0.01)))
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        (directory / "lock").unlink(missing_ok=True)
        return None


def release_build_lock(directory: Path) -> None:
    """Remove lock.pid if this process holds it."""
    pid_file = directory / "lock.pid"
    if _read_pid(pid_file) == os.getpid():
        pid_file.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


__all__ = ["load", "build", "build_dir", "why_not", "enabled", "module_name", "acquire_build_lock",
           "release_build_lock", "pid_alive", "LOCK_WAIT_S", "SOURCE"]
