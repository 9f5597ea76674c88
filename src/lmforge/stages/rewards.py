"""Reward functions for RL, named on the command line: `--reward verifier|RM_DIR|module:function[,...]`.

    verifier          the task family's scorer (1.0 right, 0.0 wrong, partial credit where the family has it);
                      needs problems from a task (--task NAME)
    RM_DIR            a reward model checkpoint (lmforge reward train): its score of prompt + reply (with tools,
                      the whole turn: calls, results and answer, rendered with the tools declared)
    module:function   your own, called as TRL calls reward functions:
                          function(prompts=[messages...], completions=[text...], **columns) -> list of floats
                      `columns` are the prompt rows' other keys (e.g. answer=[...]), one list entry per completion

Several functions are summed with weights (`reward_weights`, default 1 each); each one's mean is logged under its
name. A function that raises, returns the wrong number of values, or returns NaN/inf stops the run with a
RewardError naming it — nothing is trained on a broken reward.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from lmforge.errors import ConfigError, LmforgeError


class RewardError(LmforgeError):
    """A reward function failed: raised, returned NaN/inf, or the wrong number of values."""


@dataclass
class RewardFn:
    name: str
    weight: float
    fn: Callable          # fn(prompts, completions, problems, columns, turns) -> list[float]


def resolve_rewards(specs: list[str], weights: list[float] | None, *, family=None,
                    load_model: Callable | None = None) -> list[RewardFn]:
    """RewardFns for the specs (see the module docstring); a ConfigError naming a spec that means nothing.
    load_model(path) -> (model, tokenizer) reads a reward model directory (the verbs pass lmforge.load)."""
    if not specs:
        raise ConfigError("no reward given (--reward verifier | RM_DIR | module:function)", field="reward")
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"{len(weights)} weights for {len(specs)} reward functions", field="reward_weights")
    out = []
    for i, spec in enumerate(specs):
        w = 1.0 if weights is None else float(weights[i])
        out.append(RewardFn(spec, w, _resolve(spec, family, load_model)))
    return out


def _resolve(spec: str, family, load_model) -> Callable:
    if spec == "verifier":
        if family is None:
            raise ConfigError("the verifier is the task family's scorer: give --task NAME", field="reward")
        return lambda prompts, completions, problems, columns, turns: [
            float(family.score(p, c)) for p, c in zip(problems, completions)]
    if os.path.isdir(spec):
        from lmforge.stages.reward import RewardModel
        if load_model is None:
            raise ConfigError(f"reward {spec!r}: a reward model directory needs a loader", field="reward")
        rm = RewardModel(*load_model(spec))
        tools = family.tools if family is not None else None
        return lambda prompts, completions, problems, columns, turns: rm.rewards(
            prompts, turns or [[{"role": "assistant", "content": c}] for c in completions], tools)
    module, colon, name = spec.partition(":")
    if not colon or not module or not name:
        raise ConfigError(f"reward {spec!r} is not 'verifier', a reward model directory, or module:function",
                          field="reward")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward {spec!r}: cannot import: {e}", field="reward") from None
    if not callable(fn):
        raise ConfigError(f"reward {spec!r} is not callable", field="reward")
    return lambda prompts, completions, problems, columns, turns: fn(prompts=prompts, completions=completions,
                                                                    **columns)


def compute_rewards(funcs: list[RewardFn], prompts, completions, problems, columns,
                    turns: list[list[dict]] | None = None) -> tuple[torch.Tensor, dict]:
    """(weighted sum per completion (N,), {name: mean}) of every function on the N completions. turns: each
    completion's whole turn as messages when it went through the tool loop (completions are then its final
    answers)."""
    n = len(completions)
    total = torch.zeros(n, dtype=torch.float64)
    means = {}
    for f in funcs:
        try:
            values = f.fn(prompts, completions, problems, columns, turns)
        except LmforgeError:
            raise
        except Exception as e:   # the user's code: any failure is reported as theirs, by name
            raise RewardError(f"reward function {f.name!r} raised {type(e).__name__}: {e}") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardError(f"reward function {f.name!r} must return a list of numbers") from None
        if len(values) != n:
            raise RewardError(f"reward function {f.name!r} returned {len(values)} values for {n} completions")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise RewardError(f"reward function {f.name!r} returned {values[bad]} for completion {bad} "
                              f"({completions[bad][:60]!r})")
        t = torch.tensor(values, dtype=torch.float64)
        total += f.weight * t
        means[f.name] = float(t.mean())
    return total, means
