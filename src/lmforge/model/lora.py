"""LoRA: low-rank adapters on a model's Linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

A wrapped layer computes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

with W, b the frozen base weights, A (r x in) random and B (out x r) zero: a freshly wrapped model computes exactly
what the base computed, and training moves only A and B, r * (in + out) numbers per layer instead of in * out.

    names = apply_lora(model, rank=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"])
    ...                        # train: only the lora_A / lora_B parameters require grad
    lora_state_dict(model)     # {"blocks.0.attn.q_proj.lora_A": ..., ...}: what a LoRA checkpoint stores
    merge_lora(model)          # fold (alpha / r) B A into W: plain nn.Linear layers again, the same function

Targets are fnmatch patterns over qualified module names; a pattern also matches at a dot boundary from the
right, so `q_proj` matches `blocks.3.attn.q_proj`, `*_proj` every projection, `blocks.0.*` everything in the first
block. Only nn.Linear layers are wrapped.

A wrapped layer keeps the base's `weight` and `bias` under their own names, so the wrapped model's state dict is the
base's plus `<layer>.lora_A` / `<layer>.lora_B`: a base checkpoint loads into it as it is. The trainer applies
LoRA when `train.lora.rank > 0` (`LoRAConfig`), for every stage; a LoRA run's checkpoints hold only the adapters and
a reference to the base (its path and a hash of its weights; `lora_checkpoint_section`), which `lmforge.load` and
`lmforge.checkpoint.load` put back together.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import checkpoint as ckpt
from lmforge.errors import CheckpointError, ConfigError

@dataclass
class LoRAConfig:
    """`train.lora.*`: rank 0 trains every weight (no LoRA)."""
    rank: int = 0                 # r: adapter rank; 0 = off
    alpha: float = 16.0           # the update is scaled by alpha / rank
    dropout: float = 0.0          # dropout on the adapter's input (training only)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])   # module-name patterns

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"must be >= 0 (0 = no LoRA), got {self.rank}", field="rank")
        if not self.alpha > 0:
            raise ConfigError(f"must be > 0, got {self.alpha}", field="alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", field="dropout")
        if self.rank and not self.targets:
            raise ConfigError("name at least one module pattern (e.g. q_proj,v_proj)", field="targets")


class LoRALinear(nn.Module):
    """An nn.Linear's frozen weight and bias plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}", field="train.lora.rank")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.weight = base.weight                     # the same Parameter objects: nothing is copied
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        if not w.is_meta:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # PEFT's default (init_lora_weights=True)
        # no Dropout module at p=0: it would still run (and may draw random numbers) at every step
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_A),
                                                              self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A, the update the adapter adds to the weight, in fp32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (dropout aside): W + (alpha / r) B A."""
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter((w.detach().float() + self.delta()).to(w.dtype), requires_grad=w.requires_grad)
        if self.bias is not None:
            lin.bias = self.bias
        if hasattr(self, "is_residual_proj"):   # the marker the model's own init reads
            lin.is_residual_proj = self.is_residual_proj
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, bias={self.bias is not None}")


# ---------------------------------------------------------------------------------------------------------------
# wrapping, merging, the adapters' tensors

def matches(name: str, pattern: str) -> bool:
    """Whether qualified module name `name` matches target `pattern` (fnmatch, whole name or a dotted suffix)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def split_targets(targets) -> list[str]:
    if isinstance(targets, str):
        targets = targets.split(",")
    return [t.strip() for t in targets if t and t.strip()]


def find_targets(model: nn.Module, targets) -> list[str]:
    """The qualified names of the Linear layers the patterns select, in model order. A pattern that selects none,
    or a layer whose weight is shared with another module (a tied LM head), is a ConfigError naming it."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("the model already has LoRA adapters: merge them first (lmforge lora merge)",
                          field="train.lora.targets")
    patterns = split_targets(targets)
    if not patterns:
        raise ConfigError("no LoRA target given (e.g. q_proj,v_proj)", field="train.lora.targets")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for p in patterns:
        if not any(matches(n, p) for n in linears):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"LoRA target {p!r} matches no Linear layer of the model (its Linear layers are "
                              f"named {', '.join(leaves)})", field="train.lora.targets")
    chosen = [n for n in linears if any(matches(n, p) for p in patterns)]
    owners: dict[int, int] = {}
    for _, prm in model.named_parameters(remove_duplicate=False):
        owners[id(prm)] = owners.get(id(prm), 0) + 1
    for n in chosen:
        if owners[id(model.get_submodule(n).weight)] > 1:
            raise ConfigError(f"{n!r} shares its weight with another module (tied embeddings): an adapter on it "
                              "would change that module too when merged", field="train.lora.targets")
    return chosen


def apply_lora(model: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.0,
               targets=("q_proj", "v_proj")) -> list[str]:
    """Wrap the Linear layers that `targets` selects in LoRALinear, in place; freeze every other parameter of the
    model. Returns the wrapped layers' qualified names."""
    names = find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        parent, _, leaf = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, leaf)
        new = LoRALinear(old, rank, alpha, dropout)
        if hasattr(old, "is_residual_proj"):
            new.is_residual_proj = old.is_residual_proj
        setattr(owner, leaf, new)
    return names


def lora_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + (alpha / r) B A (in place; returns the model).
    The merged weights keep the frozen base's requires_grad."""
    for n in lora_modules(model):
        parent, _, leaf = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, getattr(owner, leaf).merged())
    return model


def is_adapter(name: str) -> bool:
    return name.endswith(ckpt.ADAPTER_SUFFIXES)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only: `<layer>.lora_A` (r x in) and `<layer>.lora_B` (out x r)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter(k)}


def check_only_adapters_train(model: nn.Module) -> None:
    """A LoRA run stores only the adapters: any other parameter that trains would be lost at the checkpoint."""
    others = [n for n, p in model.named_parameters() if p.requires_grad and not is_adapter(n)]
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise ConfigError(f"with train.lora only the LoRA adapters train, but the task also trains {others[0]}{more}",
                          field="train.lora.rank")


# ---------------------------------------------------------------------------------------------------------------
# a LoRA run: what the trainer records and checks

def lora_checkpoint_section(model: nn.Module, cfg: LoRAConfig) -> dict:
    """config.json["lora"] of a run that trains `cfg`'s adapters on `model` (not yet wrapped): the settings, the
    layers the targets select, and the base the adapters belong to: the directory the model's weights were loaded
    from (`model.loaded_from`, set by lmforge.load and lmforge.checkpoint.load) and a hash of those weights.

    Everything is checked here, before the trainer makes the run directory: a pattern that selects nothing, a
    model that was not loaded from a checkpoint (nothing to refer to), and a model whose weights are no longer
    those of its lmforge checkpoint (changed after loading: the adapters would not fit the base on reload)."""
    modules = find_targets(model, cfg.targets)
    base = getattr(model, "loaded_from", None)
    if base is None:
        raise ConfigError("a LoRA run stores only its adapters and refers to the base model they belong to, but this "
                          "model was not loaded from a checkpoint: start from one (e.g. init_from=CHECKPOINT, or "
                          "the stage's --checkpoint)", field="train.lora.rank")
    base = str(Path(base).resolve())
    ours = ckpt.is_lmforge_checkpoint(base)
    if ours and ckpt.lora_section(base) is not None:
        raise ConfigError(f"the model was loaded from a LoRA checkpoint ({base}): merge it first (lmforge lora merge) "
                          "and train adapters on the merged checkpoint", field="train.lora.rank")
    digest = ckpt.weights_hash(model.state_dict())
    if ours:   # (a Hugging Face base is converted on loading: its files cannot be compared here)
        if ckpt.weights_hash(ckpt.read_weights(base)) != digest:
            raise ConfigError(f"the model's weights differ from those of its checkpoint {base} (changed after "
                              "loading?): a LoRA run refers to the base by path, so it must be trained on the base "
                              "as saved", field="train.lora.rank")
    return {"rank": cfg.rank, "alpha": float(cfg.alpha), "dropout": float(cfg.dropout),
            "targets": split_targets(cfg.targets),
            "modules": modules, "base": {"path": base, "weights_sha256": digest}}


def apply_lora_section(model: nn.Module, section: dict, file: str) -> list[str]:
    """Wrap exactly the layers a LoRA checkpoint's config.json["lora"] (read from `file`) names, so that its
    adapters load into them."""
    try:
        return apply_lora(model, int(section["rank"]), float(section["alpha"]), float(section.get("dropout", 0.0)),
                          [str(m) for m in section["modules"]])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"malformed 'lora' section ({type(e).__name__}: {e})", file=file) from None
    except ConfigError as e:   # the base has no such layer: the adapters belong to another model
        raise CheckpointError(f"the adapters do not fit the base model: {e.message}", file=file) from None


def resume_lora(path, model: nn.Module, section: dict) -> None:
    """Resume a LoRA run: its checkpoint at `path` must hold adapters of the same settings on the same base as
    `section` (what the resumed run is about to train), then they load into the wrapped `model`."""
    saved = ckpt.lora_section(path)
    where = str(ckpt.resolve(path) / "config.json")
    if saved is None:
        raise CheckpointError("this run trained every weight, not LoRA adapters: resume it without train.lora",
                              file=where)
    for key in ("rank", "alpha", "dropout", "modules"):
        if saved.get(key) != section[key]:
            raise CheckpointError(f"the run trained LoRA adapters with {key}={saved.get(key)}; resume it with the "
                                  f"same train.lora settings (got {section[key]})", file=where)
    if saved["base"].get("weights_sha256") != section["base"]["weights_sha256"]:
        raise CheckpointError(f"the base model's weights are not those the run's adapters were trained on "
                              f"({saved['base']['path']})", file=where)
    ckpt.load_adapters(path, model)
