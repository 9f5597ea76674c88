"""The one training loop.

Every stage — pretraining, SFT, reward model, DPO, PPO, GRPO, distillation — runs through `train()`. A stage
differs only in its task, a `lmforge.train.task.Task`: how a batch is built, which loss, which parameters train,
which modules ride along frozen, what happens before each step. The loop owns everything else: optimizer, LR
schedule, gradient accumulation, clipping, mixed precision, torch.compile, DDP/FSDP, stopping by steps / tokens /
wall-clock, periodic eval and samples, progress bar, metrics.jsonl + PNG plots, and atomic checkpoints (what
they hold besides weights: a `CheckpointSpec`) with exact resume. With `train.lora.rank > 0` (lmforge.model.lora)
the loop wraps the targeted layers in LoRA adapters before it builds the optimizer, trains only them, and saves only
them with a reference to the base model — for whichever stage runs.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from lmforge import checkpoint as ckpt
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import run_lock
from lmforge.model.lora import (LoRAConfig, apply_lora, check_only_adapters_train, lora_checkpoint_section,
                                lora_state_dict, resume_lora)
from lmforge.runtime import (Dist, all_reduce_mean, autocast, init_distributed, keep_freed_memory,
                             measured_peak_flops, resolve_precision)
from lmforge.train.metrics import MetricsLog, plot_curves
from lmforge.train.rng import rng_state, set_rng_state
from lmforge.train.task import Task


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    # when to stop (whichever comes first; at least one must be set)
    max_steps: int | None = 1000
    max_tokens: int | None = None
    max_time: float | None = None          # seconds of training proper (eval/checkpoint time excluded)
    # batch: `batch_size` rows per micro-batch per process; `grad_accum` micro-batches per optimizer step IN TOTAL
    # (divided among processes), so the same config means the same math on 1 or K processes
    batch_size: int = 16
    grad_accum: int = 1
    # optimizer + schedule
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2            # wsd: the last fraction of training decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0                 # 0 disables
    # optimizer="muon": Muon (train/muon.py) for the hidden weight matrices, AdamW at `lr` for embeddings, LM
    # head, norms, biases. Muon's peak lr is `muon_lr` and follows the same schedule shape (× muon_lr / lr).
    # Works with DDP; not with FSDP (Newton–Schulz needs whole matrices).
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # runtime
    precision: str = "auto"                # auto | bf16 | fp16 | fp32
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False
    threads: int = 0                       # torch intra-op threads on CPU (0 = leave as is)
    seed: int = 1337
    # cadence (0 = only at the end)
    log_every: int = 10
    eval_every: int = 0
    sample_every: int = 0
    save_every: int = 0
    resume: bool = False
    progress: bool = True
    # LoRA (lmforge.model.lora): rank > 0 trains only low-rank adapters on the layers `targets` selects
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        for name in ("max_steps", "max_tokens", "max_time"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"must be > 0 (or null for no limit of this kind), got {value}", field=name)
        if not (self.max_steps or self.max_tokens or self.max_time):
            raise ConfigError("set at least one of max_steps, max_tokens, max_time", field="max_steps")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError("must be ≥ 1", field=name)
        if self.lr <= 0:
            raise ConfigError("must be > 0", field="lr")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("must be in [0, 1]", field="min_lr_ratio")
        if self.warmup_steps < 0:
            raise ConfigError("must be ≥ 0", field="warmup_steps")
        if self.muon_lr <= 0:
            raise ConfigError("must be > 0", field="muon_lr")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError("must be in [0, 1)", field="muon_momentum")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("Muon needs whole matrices and does not support FSDP; use DDP (fsdp=false) "
                              "or optimizer=adamw", field="optimizer")


@dataclass
class CheckpointSpec:
    """What every checkpoint of the run holds besides the weights and the trainer state."""
    model_config: dict                       # config.json["model"]: what the loader rebuilds the model from
    tokenizer: Any = None                    # saved to tokenizer/ when given
    generation_config: dict | None = None    # default sampling settings of `lmforge generate`
    extra: dict | None = None                # more config.json keys, e.g. {"stage": "pretrain"}


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Warmup by steps, then decay by `progress` ∈ [0, 1] (fraction of the step/token/time budget used)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - lo) * p
    if cfg.schedule == "wsd":
        start = 1 - cfg.decay_fraction
        return cfg.lr if p < start else cfg.lr - (cfg.lr - lo) * (p - start) / max(cfg.decay_fraction, 1e-9)
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * p))  # cosine


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (≥2-D: linears, embeddings); never norms or biases."""
    if hasattr(model, "param_groups"):
        return model.param_groups(weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    fused = device.type in ("cuda", "cpu") and not cfg.fsdp
    if cfg.optimizer == "muon":
        from lmforge.train.muon import build_muon_with_adamw
        return build_muon_with_adamw(model, groups, lr=cfg.lr, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum,
                                     betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def mark_updated(optimizer) -> None:
    """Bump the version counter of every parameter the optimizer holds. Fused AdamW writes the new weights in
    place without bumping them, and inference caches that key on versions (combined and transposed weight copies,
    the decode fast path's packed weights) would then serve the previous weights to anything that samples
    between steps: RL rollouts, samples, periodic evaluations."""
    from torch.autograd.graph import increment_version
    for g in optimizer.param_groups:
        for p in g["params"]:
            increment_version(p)


def freeze_modules(task: Task, model: nn.Module, device: torch.device) -> None:
    """Move the task's frozen modules to `device` in eval mode with requires_grad=False."""
    own = {id(p) for p in model.parameters()}
    for name, module in task.frozen_modules().items():
        # a shared tensor would be trained through the model while the task believes it fixed
        if any(id(p) in own for p in module.parameters()):
            raise ConfigError(f"frozen module {name!r} shares parameters with the model being trained")
        module.to(device).eval().requires_grad_(False)


def select_trainable(task: Task, model: nn.Module) -> None:
    """Apply task.trainable(model): requires_grad on for exactly those parameters, off for every other one."""
    chosen = task.trainable(model)
    if chosen is not None:
        chosen = list(chosen)
        own = {id(p) for p in model.parameters()}
        foreign = [name for name, p in chosen if id(p) not in own]
        if foreign:
            raise ConfigError(f"trainable() named parameters that are not the model's: {', '.join(foreign[:3])}")
        keep = {id(p) for _, p in chosen}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("no parameter of the model is trainable")


def _wrap_distributed(model: torch.nn.Module, cfg: TrainConfig, d: Dist, device: torch.device):
    if not d.enabled:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _full_state_dict_model(model: torch.nn.Module, cfg: TrainConfig, d: Dist) -> torch.nn.Module:
    """The module whose state_dict() is the full (unsharded) weights; with FSDP gather them first."""
    if not (cfg.fsdp and d.enabled):
        return ckpt.unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # gathered copies no longer share storage: drop tied aliases (e.g. lm_head.weight) by name instead
    unique = dict(model.named_parameters())
    full = {k: v for k, v in full.items()
            if k in unique or k not in dict(model.named_parameters(remove_duplicate=False))}

    class _Holder(torch.nn.Module):  # a stand-in exposing the gathered tensors through state_dict()
        def state_dict(self, *a, **k):
            return full
    return _Holder()


def train(model: nn.Module, task: Task, cfg: TrainConfig, *, checkpoint: CheckpointSpec,
          flops_per_token: float | None = None) -> dict:
    """Run the loop; returns a summary (steps, tokens, seconds, last metrics, checkpoint path).

    `model` is trained in place; parameters outside task.trainable(model) are left with requires_grad=False.
    `flops_per_token` (forward + backward) turns on the MFU metric. The writing process holds the run directory
    exclusively (lmforge.io.run_lock) from start to end."""
    ckpt_dir = Path(cfg.out_dir) / "checkpoint"
    if cfg.resume and not ckpt.is_checkpoint(ckpt_dir):
        # never silently start again from step 1 over a run's metrics
        raise CheckpointError("nothing to resume: no complete checkpoint in this run directory (drop --resume / "
                              "train.resume to start a new run)", file=str(ckpt_dir))
    # LoRA's targets and base are checked before anything is written
    lora = lora_checkpoint_section(ckpt.unwrap(model), cfg.lora) if cfg.lora.rank else None
    if int(os.environ.get("RANK", 0)) != 0:      # only rank 0 writes
        return _train(model, task, cfg, checkpoint, flops_per_token, lora)
    with run_lock(cfg.out_dir):
        return _train(model, task, cfg, checkpoint, flops_per_token, lora)


def _train(model: nn.Module, task: Task, cfg: TrainConfig, checkpoint: CheckpointSpec,
           flops_per_token: float | None, lora: dict | None) -> dict:
    d, device = init_distributed(cfg.device)
    if cfg.grad_accum % d.world_size:
        raise ConfigError(f"grad_accum={cfg.grad_accum} must be a multiple of the {d.world_size} processes",
                          field="grad_accum")
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()
    precision = resolve_precision(cfg.precision, device)
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoint"

    # -- the model, what trains, what rides along frozen, and the state to resume from --------------------
    model.to(device)
    freeze_modules(task, model, device)
    if lora is not None:                    # adapters on the base, before the optimizer sees the parameters
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, lora["modules"])
    step, tokens_seen, train_time = 0, 0, 0.0
    resume_state = opt_state = None
    if cfg.resume:                          # train() checked there is a checkpoint
        resume_state, opt_state = ckpt.load_trainer_state(ckpt_dir)
        saved_opt = (resume_state.get("config") or {}).get("optimizer", "adamw")
        if saved_opt != cfg.optimizer:
            raise CheckpointError(f"the checkpoint was trained with optimizer={saved_opt}; resume with the same "
                                  f"optimizer (got {cfg.optimizer})", file=str(ckpt_dir / "trainer_state.json"))
        if lora is not None:
            resume_lora(ckpt_dir, model, lora)      # the same adapters on the same base, then their weights
        elif ckpt.lora_section(ckpt_dir) is not None:
            raise CheckpointError("this run trained LoRA adapters: resume it with the same train.lora settings",
                                  file=str(ckpt_dir / "config.json"))
        else:
            ckpt.load(ckpt_dir, model)
        step, tokens_seen, train_time = resume_state["step"], resume_state["tokens"], resume_state["train_time"]
    select_trainable(task, model)           # before wrapping: DDP records which parameters need gradients
    if lora is not None:
        check_only_adapters_train(model)
    raw_model = model
    model = _wrap_distributed(model, cfg, d, device)
    optimizer = build_optimizer(model, cfg, device)  # over the parameters that require grad
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    clipped = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP's sharded parameters
    task.setup(raw_model, device)
    if resume_state is not None:
        task.load_state_dict(resume_state.get("task") or {})
    fwd_model = torch.compile(model) if cfg.compile else model

    micro_per_rank = cfg.grad_accum // d.world_size
    log = MetricsLog(out, enabled=d.is_main, append=resume_state is not None)
    if resume_state is not None:
        log.truncate_after(step)
    peak = measured_peak_flops(device, precision) if flops_per_token else None

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and d.is_main), unit="step",
               dynamic_ncols=True, desc=Path(cfg.out_dir).name)
    info_acc: dict[str, float] = {}
    loss_acc, n_acc, win_tokens, win_time = 0.0, 0, 0, 0.0
    last: dict = {}

    def progress_fraction() -> float:
        fr = [step / cfg.max_steps if cfg.max_steps else 0.0,
              tokens_seen / cfg.max_tokens if cfg.max_tokens else 0.0,
              train_time / cfg.max_time if cfg.max_time else 0.0]
        return max(fr)

    def done() -> bool:
        return progress_fraction() >= 1.0

    def run_eval(tag: str) -> dict:
        raw_model.eval()
        with torch.no_grad(), autocast(device, precision):
            res = task.evaluate(raw_model if not cfg.fsdp else model, final=tag == "final")
        raw_model.train()
        return res

    def save() -> None:
        state_model = _full_state_dict_model(model, cfg, d)
        opt_sd = optimizer.state_dict() if not (cfg.fsdp and d.enabled) else None
        if not d.is_main:
            return
        ts = {"step": step, "tokens": tokens_seen, "train_time": train_time, "rng": rng_state(),
              "task": task.state_dict(), "config": asdict(cfg), "world_size": d.world_size}
        extra = checkpoint.extra if lora is None else {**(checkpoint.extra or {}), "lora": lora}
        ckpt.save(ckpt_dir, model=state_model, model_config=checkpoint.model_config, tokenizer=checkpoint.tokenizer,
                  generation_config=checkpoint.generation_config, trainer_state=ts, optimizer_state=opt_sd,
                  extra=extra, state_dict=lora_state_dict(state_model) if lora is not None else None)

    raw_model.train()
    # The RNGs are restored last, right before the first step: anything above may draw random numbers, and the
    # resumed run must continue from exactly the generators the uninterrupted run had after the saved step.
    if resume_state is not None:
        set_rng_state(resume_state["rng"])
    while not done():
        t0 = time.perf_counter()
        lr = lr_at(cfg, step, progress_fraction())
        for g in optimizer.param_groups:
            g["lr"] = lr
        raw_model.eval()
        with torch.no_grad():
            task.before_step(raw_model, step)
        raw_model.train()
        step_loss = torch.zeros((), device=device)
        step_tokens = 0
        for i in range(micro_per_rank):
            batch = task.batch(step, d.rank * micro_per_rank + i)
            sync = i == micro_per_rank - 1 or not d.enabled or cfg.fsdp
            ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else nullcontext()
            with ctx:
                with autocast(device, precision):
                    loss, info = task.loss(fwd_model, batch)
                (loss / micro_per_rank).backward()
            step_loss += loss.detach() / micro_per_rank
            step_tokens += int(info.get("tokens", 0))
            for k, v in info.items():
                if k != "tokens":
                    info_acc[k] = info_acc.get(k, 0.0) + float(v) / micro_per_rank
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(clipped, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark_updated(optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step += 1
        tokens_seen += step_tokens * d.world_size
        train_time += dt
        loss_acc += float(all_reduce_mean(step_loss, d))
        n_acc += 1
        win_tokens += step_tokens * d.world_size
        win_time += dt
        bar.update(1)

        if step % cfg.log_every == 0 or done():
            tps = win_tokens / max(win_time, 1e-9)
            row = {"step": step, "loss": loss_acc / n_acc, "lr": lr, "tokens": tokens_seen,
                   "tok_per_s": tps, "train_time": train_time}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            row.update({k: v / n_acc for k, v in info_acc.items()})
            if peak:
                row["mfu"] = flops_per_token * tps / (peak * d.world_size)
            log.log(**row)
            last.update(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}",
                            **({"mfu": f"{row['mfu']:.0%}"} if peak else {}))
            loss_acc, n_acc, win_tokens, win_time, info_acc = 0.0, 0, 0, 0.0, {}
        if cfg.eval_every and step % cfg.eval_every == 0 and not done():
            res = run_eval("periodic")
            if res:
                log.log(step=step, **res)
                last.update(res)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        if cfg.sample_every and step % cfg.sample_every == 0 and d.is_main:
            raw_model.eval()
            with torch.no_grad():
                texts = task.samples(raw_model)
            raw_model.train()
            if texts:
                log.log(step=step, samples=texts)
            for t in texts:
                bar.write(f"  sample: {t!r}")
        if cfg.save_every and step % cfg.save_every == 0 and not done():
            save()
    bar.close()

    res = run_eval("final")
    if res:
        log.log(step=step, **res)
        last.update(res)
    save()
    if d.is_main:
        plot_curves(out / "metrics.jsonl", out / "loss.png", title=Path(cfg.out_dir).name)
    avg = {"tok_per_s_avg": tokens_seen / max(train_time, 1e-9)}   # the whole run (the last window may be one step)
    if peak:
        avg["mfu_avg"] = flops_per_token * avg["tok_per_s_avg"] / (peak * d.world_size)
    return {"step": step, "tokens": tokens_seen, "train_time": train_time, "precision": precision,
            "device": str(device), "world_size": d.world_size, "checkpoint": str(ckpt_dir), **last, **avg}
