"""What a training stage plugs into the one loop: a `Task`.

Pretraining, SFT, a reward model, DPO, PPO, GRPO, distillation: each is a subclass of `Task` handed to
`lmforge.train.trainer.train`. The loop owns the optimizer, schedule, precision, distribution, checkpoints and
logging; the task owns what differs between stages. The trainer calls every hook below, always, so a subclass
overrides what it needs and inherits a documented default for the rest.

Order of calls:
    frozen_modules()                 once: the trainer moves them to the device, freezes them, puts them in eval
    trainable(model)                 once: which parameters the optimizer sees
    setup(model, device)             once, before the first step (and after resume has loaded the weights)
    load_state_dict(d)               once, on resume
    each step:
        before_step(model, step)     in eval mode, under no_grad; the trainer restores train mode after it
        batch(step, micro), loss(model, batch)   once per micro-batch
        evaluate(model) / samples(model)         at their cadence, after the optimizer step
    state_dict()                     at every checkpoint
    evaluate(model, final=True)      at the end
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


class Task:
    """The hooks the trainer calls. `batch` and `loss` are the two every stage must define."""

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called once before the first step with the unwrapped model on `device` (e.g. to build an inference
        engine for rollouts). It must not add or remove parameters: the stage builds the model before
        `train()`. Default: nothing."""

    def before_step(self, model: nn.Module, step: int) -> None:
        """Called at every step before its batches are built, with the unwrapped model holding the weights of
        the previous optimizer step, in eval mode and under torch.no_grad(). An RL task generates its rollouts
        here, and `batch` then serves them. Default: nothing."""

    def batch(self, step: int, micro: int) -> Any:
        """The micro-batch `micro` of optimizer step `step`: anything `loss` understands. `micro` is the global
        micro-batch index (rank * micro-batches per rank + i), so K processes see the batches one process with
        K-fold accumulation sees. Make it a pure function of (seed, step, micro) and resume is exact."""
        raise NotImplementedError(f"{type(self).__name__} must define batch(step, micro)")

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
        """(scalar loss averaged over the micro-batch, metrics). Metrics are numbers averaged into the log;
        the optional key 'tokens' counts the tokens this micro-batch processed (throughput, max_tokens)."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch)")

    def trainable(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]] | None:
        """The (name, parameter) pairs the optimizer trains, e.g. a new head only. The trainer sets
        requires_grad=False on every other parameter of the model. Default None: every parameter that
        requires grad. LoRA needs no override: with `train.lora` the trainer has wrapped the model and frozen
        everything but the adapters before this hook runs, and refuses a task that trains anything else."""
        return None

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules the task holds besides the model (a DPO reference model, a distillation teacher). The trainer
        moves them to the device, puts them in eval mode with requires_grad=False, never optimises them and
        never saves them as part of the model. They must not share parameters with the model. Default: none."""
        return {}

    def evaluate(self, model: nn.Module, final: bool = False) -> dict:
        """Validation metrics ({"val_loss": ...}), computed in eval mode under no_grad; final=True once at the
        end of the run. Default: none."""
        return {}

    def samples(self, model: nn.Module) -> list[str]:
        """Texts to log and print at the sample cadence (model in eval mode). Default: none."""
        return []

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same data stream, saved with each checkpoint (JSON
        values). Default: nothing."""
        return {}

    def load_state_dict(self, d: dict) -> None:
        """Restore what `state_dict` returned; raise ConfigError when it belongs to a different run.
        Default: nothing."""
