"""Checkpoints: one directory per checkpoint, written atomically.

Layout (DESIGN.md): config.json, model.safetensors, tokenizer/, generation_config.json, and for exact resume
trainer_state.json + optimizer.pt. We write everything into `DIR.tmp`, fsync, then swap it in with renames, so a
crash mid-write leaves the previous good checkpoint in place (at `DIR`, or at `DIR.old` for the instant between
the two renames — `resolve_checkpoint` finds it there too).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge import __version__
from lmforge.errors import CheckpointError


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, model_config: dict, tokenizer=None,
                    generation_config: dict | None = None, trainer_state: dict | None = None,
                    optimizer_state: dict | None = None, extra: dict | None = None) -> Path:
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)  # a leftover from an earlier crash: never trusted
    tmp.mkdir(parents=True)
    _write_json(tmp / "config.json", {"model": model_config, "lmforge_version": __version__, **(extra or {})})
    # safetensors refuses shared storage (tied embeddings): save each tensor once, contiguous
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    save_file(_dedupe_tied(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    _write_json(tmp / "generation_config.json", generation_config or {})
    if trainer_state is not None:
        _write_json(tmp / "trainer_state.json", trainer_state)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    _fsync_dir(tmp)
    # swap: path -> path.old, tmp -> path, drop old
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)        # torch.compile


def _dedupe_tied(state: dict) -> dict:
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.shape == state[seen[ptr]].shape:
            continue  # tied weight; the model re-ties on load
        seen[ptr] = k
        out[k] = v
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir or a run dir (→ run/checkpoint); fall back to `.old` after a crash mid-swap."""
    path = Path(path)
    for cand in (path, path / "checkpoint"):
        if (cand / "model.safetensors").is_file() and (cand / "config.json").is_file():
            return cand
        old = cand.with_name(cand.name + ".old")
        if not cand.exists() and (old / "model.safetensors").is_file():
            return old
    if not path.exists():
        raise CheckpointError("checkpoint not found", file=str(path))
    raise CheckpointError("not a checkpoint directory (no config.json + model.safetensors)", file=str(path))


def read_config(path: str | Path) -> dict:
    path = resolve_checkpoint(path)
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt config.json: {e.msg}", file=str(path / "config.json"), line=e.lineno) from None


def load_model_state(path: str | Path, model: torch.nn.Module) -> None:
    path = resolve_checkpoint(path)
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"cannot read weights: {e}", file=str(path / "model.safetensors")) from None
    missing, unexpected = _unwrap(model).load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_tied_alias(_unwrap(model), k)]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                              file=str(path / "model.safetensors"))


def _is_tied_alias(model: torch.nn.Module, key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return key in params and key not in unique


def load_trainer_state(path: str | Path) -> tuple[dict, dict | None]:
    """trainer_state.json and the optimizer state (loaded with weights_only=True: never unpickle objects)."""
    path = resolve_checkpoint(path)
    ts = path / "trainer_state.json"
    if not ts.is_file():
        raise CheckpointError("no trainer_state.json: this checkpoint cannot be resumed", file=str(path))
    state = json.loads(ts.read_text())
    opt = path / "optimizer.pt"
    opt_state = torch.load(opt, map_location="cpu", weights_only=True) if opt.is_file() else None
    return state, opt_state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """(model in eval mode, tokenizer or None, config dict) from a checkpoint directory (or a run directory)."""
    from lmforge.errors import ConfigError
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    path = resolve_checkpoint(path)
    config = read_config(path)
    if not isinstance(config.get("model"), dict):
        raise CheckpointError("config.json has no 'model' section", file=str(path / "config.json"))
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except ConfigError as e:
        raise CheckpointError(f"bad model config: {e}", file=str(path / "config.json")) from None
    tokenizer = None
    if with_tokenizer:
        from lmforge.tokenizer.tokenizer import Tokenizer
        if not (path / "tokenizer").is_dir():
            raise CheckpointError("checkpoint has no tokenizer/ directory", file=str(path))
        tokenizer = Tokenizer.load(path / "tokenizer")
    model = Transformer(cfg)
    load_model_state(path, model)
    return model.to(device).eval(), tokenizer, config
