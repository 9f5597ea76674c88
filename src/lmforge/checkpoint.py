"""The lmforge checkpoint format: one directory per checkpoint, written atomically.

    config.json              {"model": ModelConfig, "lmforge_version": ..., extra keys of the stage}
    model.safetensors        weights (tied tensors stored once)
    tokenizer/               lmforge tokenizer + HF tokenizer.json + chat template
    generation_config.json   default sampling settings
    trainer_state.json       for exact resume: step, RNG states, data position, metrics
    optimizer.pt             for exact resume (read with weights_only=True: never unpickled objects)

`save` writes everything into `DIR.tmp`, fsyncs, then swaps it in (lmforge.io.atomic_dir), so a crash mid-write
leaves the previous good checkpoint in place — at `DIR`, or at `DIR.old` for the instant between the two renames,
where `resolve` finds it too. This module is core: it knows no model class and no other format. The one loader
that builds a model from a directory (this format or Hugging Face's) is `lmforge.load`.

A LoRA run's checkpoint (lmforge.model.lora) holds only the adapters, `<layer>.lora_A` and `<layer>.lora_B`, in
model.safetensors, and says in config.json["lora"] which base they belong to: {"rank", "alpha", "dropout",
"targets", "modules" (the wrapped layers), "base": {"path", "weights_sha256" (`weights_hash` of its weights)}}.
`load` reads the base from there, refuses a base whose weights changed since, and adds the adapters.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.version import __version__
from lmforge.errors import CheckpointError, read_json_object
from lmforge.io import atomic_dir, write_json


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)        # torch.compile


def save(path: str | Path, *, model: torch.nn.Module, model_config: dict, tokenizer=None,
         generation_config: dict | None = None, trainer_state: dict | None = None,
         optimizer_state: dict | None = None, extra: dict | None = None,
         state_dict: dict | None = None) -> Path:
    """Write a checkpoint directory atomically. `state_dict` (default: the model's) lets a caller save a
    different set of tensors, e.g. only the trainable ones."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_json(tmp / "config.json", {"model": model_config, "lmforge_version": __version__, **(extra or {})},
                   sort_keys=True)
        state = state_dict if state_dict is not None else unwrap(model).state_dict()
        # safetensors refuses shared storage (tied embeddings): save each tensor once, contiguous
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_safetensors(_dedupe_tied(state), tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_json(tmp / "generation_config.json", generation_config or {}, sort_keys=True)
        if trainer_state is not None:
            write_json(tmp / "trainer_state.json", trainer_state, sort_keys=True)
        if optimizer_state is not None:
            torch_save(optimizer_state, tmp / "optimizer.pt")
    return path


def save_safetensors(state: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures as the OSError they are (so lmforge.io reports them)."""
    try:
        save_file(state, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # SafetensorError("... I/O error: File too large (os error 27)")
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def torch_save(obj, path: Path) -> None:
    """torch.save, with a failed write raised as the OSError behind it: torch itself only reports
    "unexpected pos", so the file object records the error its write met."""
    with open(path, "wb") as f:
        w = _RecordingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is None:
                raise
            raise OSError(w.error.errno, w.error.strerror, str(path)) from None


class _RecordingWriter:
    """A binary file that remembers the OSError of a failed write or flush."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        return self._call(self.f.write, data)

    def flush(self) -> None:
        self._call(self.f.flush)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self.error = self.error or e
            raise


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


def is_checkpoint(path: str | Path) -> bool:
    try:
        resolve(path)
        return True
    except CheckpointError:
        return False


def is_lmforge_checkpoint(path: str | Path) -> bool:
    """A checkpoint of this format (a Hugging Face model directory also has config.json + model.safetensors, but
    its config.json has no 'model' section)."""
    try:
        config = read_config(path)
    except CheckpointError:
        return False
    return isinstance(config, dict) and isinstance(config.get("model"), dict)


def resolve(path: str | Path) -> Path:
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
    path = resolve(path)
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt config.json: {e.msg}", file=str(path / "config.json"), line=e.lineno) from None


def load(path: str | Path, model: torch.nn.Module, strict: bool = True) -> None:
    """Load model.safetensors into `model`. strict=False allows tensors the model has but the file lacks (a
    file of trainable tensors only); tensors the model does not know are always an error.

    A LoRA checkpoint loads its base's weights from the lmforge checkpoint it names (checked against the hash it
    recorded) and then its adapters: into the model's adapters when it has them (wrapped by
    lmforge.model.lora.apply_lora_section), else merged into the weights, W + (alpha / r) B A. Either way the
    model computes what the LoRA run trained. The directory is recorded on the model as `model.loaded_from`
    (a LoRA run trained on this model refers to it)."""
    path = resolve(path)
    section = lora_section(path)
    if section is None:
        _load_state(read_weights(path), model, strict, str(path / "model.safetensors"))
    else:
        _load_lora(path, model, section)
    unwrap(model).loaded_from = str(path)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's model.safetensors, or a CheckpointError naming the file."""
    file = str(resolve(path) / "model.safetensors")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"cannot read weights: {e}", file=file) from None


def _load_state(state: dict, model: torch.nn.Module, strict: bool, file: str) -> None:
    check_shapes({k: v.shape for k, v in state.items()},
                 {k: v.shape for k, v in unwrap(model).state_dict().items()}, file)
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_tied_alias(unwrap(model), k)] if strict else []
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                              file=file)


# ---- LoRA checkpoints: adapters + a reference to their base -----------------------------------------------------
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def lora_section(path: str | Path) -> dict | None:
    """config.json["lora"] of a LoRA run's checkpoint, None for a checkpoint of full weights."""
    path = resolve(path)
    config = read_config(path)
    section = config.get("lora") if isinstance(config, dict) else None
    if section is not None and not (isinstance(section, dict) and isinstance(section.get("base"), dict)
                                    and isinstance(section["base"].get("path"), str)):
        raise CheckpointError("malformed 'lora' section (no base path)", file=str(path / "config.json"))
    return section


def lora_base(path: str | Path) -> Path:
    """The base model directory a LoRA checkpoint's adapters belong to (an lmforge checkpoint or an HF directory)."""
    path = resolve(path)
    base = Path(lora_section(path)["base"]["path"])
    if not base.exists():
        raise CheckpointError(f"the base model of this LoRA run is gone: {base} not found",
                              file=str(path / "config.json"))
    return base


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, shapes and float32 values (tied tensors once, names sorted): the same for a
    model in memory and for the checkpoint it was loaded from, whatever dtype the file stores (bf16 and fp16
    widen to fp32 exactly)."""
    h = hashlib.sha256()
    unique = _dedupe_tied({k: v.detach() for k, v in state.items()})
    for name in sorted(unique):
        t = unique[name].float().contiguous().cpu()
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def check_base(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """The base weights `state` are those LoRA checkpoint `path` was trained on (its recorded hash)."""
    path = resolve(path)
    base = lora_section(path)["base"]
    if weights_hash(state) != base.get("weights_sha256"):
        raise CheckpointError(f"the base model {base['path']} has changed since this LoRA run was trained (its "
                              "weights hash differs): the adapters fit only the original base",
                              file=str(path / "config.json"))


def load_adapters(path: str | Path, model: torch.nn.Module) -> None:
    """Load a LoRA checkpoint's adapter tensors into a model wrapped with the same layers (its base weights are the
    caller's business: see `load`)."""
    path = resolve(path)
    file = str(path / "model.safetensors")
    adapters = read_weights(path)
    expected = {k: v.shape for k, v in unwrap(model).state_dict().items() if k.endswith(ADAPTER_SUFFIXES)}
    if adapters.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - adapters.keys()), sorted(adapters.keys() - expected.keys())
        raise CheckpointError(f"the adapters do not match the model's: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}", file=file)
    check_shapes({k: v.shape for k, v in adapters.items()}, expected, file)
    unwrap(model).load_state_dict(adapters, strict=False)


def _load_lora(path: Path, model: torch.nn.Module, section: dict) -> None:
    base = lora_base(path)
    if not is_lmforge_checkpoint(base):
        raise CheckpointError(f"the base model {base} is not an lmforge checkpoint (a Hugging Face directory?): "
                              "load this LoRA run with lmforge.load", file=str(path / "config.json"))
    state = read_weights(base)
    check_base(state, path)
    adapters = read_weights(path)
    file = str(path / "model.safetensors")
    own = unwrap(model).state_dict()
    if any(k.endswith(ADAPTER_SUFFIXES) for k in own):      # a wrapped model: base and adapters side by side
        load_adapters(path, model)
        _load_state(state, model, False, str(base / "model.safetensors"))
        missing = [k for k in own if k not in state and k not in adapters and not _is_tied_alias(unwrap(model), k)]
        if missing:
            raise CheckpointError(f"weights do not match the model: missing {missing[:5]}", file=file)
        return
    scale = float(section["alpha"]) / int(section["rank"])  # a plain model: merge the adapters into its weights
    for m in section["modules"]:
        try:
            w, a, b = state[f"{m}.weight"], adapters[f"{m}.lora_A"], adapters[f"{m}.lora_B"]
        except KeyError as e:
            raise CheckpointError(f"no tensor {e} for the adapted layer {m!r}", file=file) from None
        state[f"{m}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    _load_state(state, model, True, file)


def require_full_weights(path: str | Path) -> None:
    """For readers of model.safetensors that need every weight: a LoRA checkpoint (adapters only) is an error
    that says what to do instead."""
    path = resolve(path)
    if lora_section(path) is not None:
        raise CheckpointError("a LoRA checkpoint holds only adapters: merge them into the base first (lmforge lora "
                              "merge --checkpoint RUN --out DIR), or export the adapter alone (lmforge lora export)",
                              file=str(path))


def check_shapes(found: dict, expected: dict, file: str) -> None:
    """A CheckpointError naming the first tensor whose shape differs from the model's (a checkpoint of another
    model size, or a config.json that disagrees with the weights), instead of load_state_dict's wall of text.
    Both mappings go from tensor name to a shape (a torch.Size or any sequence of ints)."""
    for name, shape in found.items():
        want = expected.get(name)
        if want is not None and tuple(shape) != tuple(want):
            raise CheckpointError(f"tensor '{name}' has shape {list(shape)} but the model expects {list(want)}: "
                                  "the weights are of another model (check config.json)", file=file)


def _is_tied_alias(model: torch.nn.Module, key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return key in params and key not in unique


def load_trainer_state(path: str | Path) -> tuple[dict, dict | None]:
    """trainer_state.json and the optimizer state (loaded with weights_only=True: never unpickle objects)."""
    path = resolve(path)
    ts = path / "trainer_state.json"
    if not ts.is_file():
        raise CheckpointError("no trainer_state.json: this checkpoint cannot be resumed", file=str(path))
    state = read_json_object(ts)
    opt = path / "optimizer.pt"
    if not opt.is_file():
        return state, None
    try:
        opt_state = torch.load(opt, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        # truncated or corrupt (PytorchStreamReader failed reading zip archive ...), or not torch's format
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]   # torch's first sentence
        raise CheckpointError(f"cannot read the optimizer state ({why})", file=str(opt)) from None
    return state, opt_state
