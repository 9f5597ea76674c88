"""The native (C++) decode step, compiled on this machine on first use and cached.

    ext = load()          # the extension module, or None when it cannot be built here (reason: why_not())
    ext.NativeDecoder(emb, [6 tensors per layer...], norm_w, head, n_head, n_kv_heads, head_dim, eps).step(...)

`lmforge.infer.fastpath.FastDecoder` uses it when it loads and falls back to its own PyTorch ops otherwise, so
nothing breaks on a machine without a C++ compiler; the math and the tests are the same either way.
Build: torch.utils.cpp_extension with ninja and the system C++ compiler, about 30 s once; the module is cached
under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), named after a hash of the source, the torch
version and this CPU's model and flags (it is compiled with -march=native, so a cache shared between different
CPUs never loads code for the wrong one). LMFORGE_NATIVE=0 turns it off.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_step.cpp")
_lock = threading.Lock()
_state: dict = {}          # "ext": the module or None, "why": the reason it is None


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
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _cpu_id().encode(), sys.version.encode()):
        h.update(part)
    return f"lmforge_decode_{h.hexdigest()[:12]}"


def load(verbose: bool = False):
    """The compiled extension, building it if needed; None when disabled or the build fails (see why_not())."""
    if not enabled():
        return None
    with _lock:
        if "ext" not in _state:
            _state["ext"], _state["why"] = _build(verbose)
    return _state["ext"]


def why_not() -> str | None:
    """Why load() returned None (after a call), or None."""
    if not enabled():
        return "LMFORGE_NATIVE=0"
    return _state.get("why")


def _build_dir(cpp_extension, name: str) -> Path | None:
    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # a private torch helper: only used for the "compiling" line and the stale-lock check
        return None


def clear_stale_lock(build_dir: Path | None, max_age_s: float = 600.0) -> bool:
    """torch's build lock is a file that a killed build (Ctrl-C while compiling) leaves behind, and every later
    load then waits on it forever. A build takes ~30 s, so a lock older than max_age_s is removed."""
    import time
    lock = build_dir / "lock" if build_dir is not None else None
    try:
        if lock is not None and time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            return True
    except OSError:
        pass
    return False


def _build(verbose: bool):
    try:
        from torch.utils import cpp_extension
        if not cpp_extension.is_ninja_available():
            return None, "ninja is not installed (pip install ninja)"
        name = module_name()
        build_dir = _build_dir(cpp_extension, name)
        clear_stale_lock(build_dir)
        if build_dir is None or not any(build_dir.glob(f"{name}*.so")):
            print("lmforge: compiling the native decode step for this machine (once, about 30 s)...",
                  file=sys.stderr, flush=True)
        ext = cpp_extension.load(name=name, sources=[str(SOURCE)], verbose=verbose,
                                 extra_cflags=["-O3", "-march=native", "-fopenmp-simd"])
        return ext, None
    except Exception as e:  # no compiler, no headers, a compile error: the PyTorch fast path still works
        msg = str(e).strip().splitlines()
        why = f"native decode step unavailable ({type(e).__name__}: {msg[-1] if msg else ''})"
        print(f"lmforge: {why}; using the PyTorch decode path", file=sys.stderr, flush=True)
        return None, why


__all__ = ["load", "why_not", "enabled", "module_name", "SOURCE"]
