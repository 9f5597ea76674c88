"""Direct preference optimisation: learn from preference pairs without a reward model.

    lmforge dpo --checkpoint runs/sft --data pairs.jsonl --out runs/dpo --loss sigmoid --beta 0.1

The policy starts as the SFT model; the reference is the SFT model frozen. Its summed log-probs of each side's
reply (the completion mask of lmforge.stages.pairs) are computed ONCE, before training, for the training and the
held-out pairs, so no reference model is kept in memory during the run. Each step takes B pairs (2B rows, one
forward), sums the policy's log-probs over each reply and applies the loss of lmforge.train.objectives.dpo_loss
(sigmoid = DPO, ipo, hinge, robust; label smoothing). Logged as TRL names them: rewards/chosen, rewards/rejected
(beta * log-ratio), rewards/accuracies (chosen reward > rejected), rewards/margins, logps/chosen, logps/rejected;
held out: the same with a val_ prefix. The checkpoint is an ordinary chat checkpoint, stage "dpo".
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.errors import ConfigError
from lmforge.io import atomic_write_text
from lmforge.stages.pairs import (PairRows, PairsConfig, PairTask, batch_index, collate_pairs, inherited,
                                  rendered_pairs)
from lmforge.tokenizer.chat import pad_id
from lmforge.train.objectives import DPO_LOSSES, dpo_loss
from lmforge.train.metrics import plot_curves
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train


@dataclass
class DPOTrainConfig(TrainConfig):
    max_steps: int | None = 200
    lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 16            # pairs per micro-batch
    eval_every: int = 50
    min_lr_ratio: float = 0.0


@dataclass
class DPOConfig(PairsConfig):
    loss: str = "sigmoid"           # sigmoid | ipo | hinge | robust
    beta: float = 0.1
    label_smoothing: float = 0.0
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r} (losses: {', '.join(DPO_LOSSES)})", field="loss")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ConfigError(f"must be > 0, got {self.beta!r}", field="beta")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("must be in [0, 0.5)", field="label_smoothing")


def reply_logps(model, x, y, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's reply tokens, reply token count): (rows,), (rows,)."""
    _, per_token = model(x, targets=y, loss_mask=mask, reduction="none")   # -log p on reply targets, 0 elsewhere
    return -per_token.sum(-1), mask.sum(-1)


@torch.no_grad()
def reference_logps(model, rows: PairRows, pad: int, device, batch_size: int, desc: str,
                    progress: bool = True) -> torch.Tensor:
    """(pairs, 2) summed reply log-probs (chosen, rejected) under `model`, fp32, on the CPU."""
    out = torch.empty(len(rows), 2)
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        index = list(range(s, min(s + batch_size, len(rows))))
        x, y, m, _ = collate_pairs(rows, index, pad, device)
        lp, _ = reply_logps(model, x, y, m)
        c, r = lp.float().cpu().chunk(2)
        out[index, 0], out[index, 1] = c, r
    model.train(was_training)
    return out


class DPOTask(PairTask):
    def __init__(self, rows: PairRows, ref: torch.Tensor, val: PairRows | None, val_ref: torch.Tensor | None, *,
                 loss: str, beta: float, label_smoothing: float, batch_size: int, seed: int, pad_id: int, device,
                 grad_accum: int = 1, eval_batch_size: int = 32):
        self.rows, self.ref, self.val, self.val_ref = rows, ref, val, val_ref
        self.loss_type, self.beta, self.smoothing = loss, beta, label_smoothing
        self.B, self.seed, self.pad, self.device = batch_size, seed, pad_id, device
        self.grad_accum, self.eval_batch_size = grad_accum, eval_batch_size

    def batch(self, step, micro):
        index = batch_index(len(self.rows), self.B, self.seed, step * self.grad_accum + micro)
        x, y, m, _ = collate_pairs(self.rows, index, self.pad, self.device)
        return x, y, m, self.ref[index].to(self.device)

    def _loss(self, model, x, y, m, ref):
        lp, n = reply_logps(model, x, y, m)
        pc, pr = lp.float().chunk(2)
        nc, nr = n.chunk(2)
        losses, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta=self.beta, loss_type=self.loss_type,
                                  label_smoothing=self.smoothing, chosen_tokens=nc, rejected_tokens=nr)
        return losses, rc, rr, pc.detach(), pr.detach()

    def loss(self, model, batch):
        x, y, m, ref = batch
        losses, rc, rr, pc, pr = self._loss(model, x, y, m, ref)
        return losses.mean(), {"rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
                               "rewards/accuracies": float((rc > rr).float().mean()),
                               "rewards/margins": float((rc - rr).mean()), "logps/chosen": float(pc.mean()),
                               "logps/rejected": float(pr.mean()), "tokens": int((y != -1).sum())}

    def evaluate(self, model, final=False):
        if self.val is None or not len(self.val):
            return {}
        losses, rcs, rrs = [], [], []
        for s in range(0, len(self.val), self.eval_batch_size):
            index = list(range(s, min(s + self.eval_batch_size, len(self.val))))
            x, y, m, _ = collate_pairs(self.val, index, self.pad, self.device)
            loss, rc, rr, _, _ = self._loss(model, x, y, m, self.val_ref[index].to(self.device))
            losses.append(loss)
            rcs.append(rc)
            rrs.append(rr)
        rc, rr = torch.cat(rcs), torch.cat(rrs)
        return {"val_loss": float(torch.cat(losses).mean()), "val_rewards/accuracies": float((rc > rr).float().mean()),
                "val_rewards/margins": float((rc - rr).mean())}


def run_dpo(cfg: DPOConfig, model, tok, base: str | None = None) -> dict:
    from lmforge import checkpoint as ckpt
    from lmforge.runtime import detect_device

    tcfg = cfg.train
    rows, val = rendered_pairs(cfg, model, tok, tcfg.seed)
    device = detect_device(tcfg.device)
    pad = pad_id(tok)
    show = tcfg.progress and int(os.environ.get("RANK", 0)) == 0
    out = Path(tcfg.out_dir)
    # the reference's log-probs, once: cached in the run directory so a resumed run does not recompute them
    cache = out / "reference_logps.pt"
    if tcfg.resume and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        ref, val_ref = saved["train"], saved.get("val")
    else:
        model.to(device)
        ref = reference_logps(model, rows, pad, device, cfg.eval_batch_size, "reference log-probs", show)
        val_ref = reference_logps(model, val, pad, device, cfg.eval_batch_size, "reference log-probs (val)",
                                  show) if val is not None else None
        if int(os.environ.get("RANK", 0)) == 0:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.torch_save({"train": ref, **({"val": val_ref} if val_ref is not None else {})}, cache)
    task = DPOTask(rows, ref, val, val_ref, loss=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                   batch_size=tcfg.batch_size, seed=tcfg.seed, pad_id=pad, device=device,
                   grad_accum=tcfg.grad_accum, eval_batch_size=cfg.eval_batch_size)
    chat, generation = inherited(base)
    spec = CheckpointSpec(model_config=model.config.to_dict(), tokenizer=tok, generation_config=generation,
                          extra={"stage": "dpo", "chat": chat, "base": str(base) if base else None,
                                 "data": list(cfg.data), "dpo": {"loss": cfg.loss, "beta": cfg.beta,
                                                                 "label_smoothing": cfg.label_smoothing}})
    t0 = time.time()
    summary = train(model, task, tcfg, checkpoint=spec)
    summary.update(train_pairs=len(rows), val_pairs=len(val) if val else 0, wall_time=time.time() - t0)
    if int(os.environ.get("RANK", 0)) == 0:
        plot_curves(out / "metrics.jsonl", out / "rewards.png", title=out.name,
                    keys=("rewards/accuracies", "val_rewards/accuracies", "rewards/margins", "val_rewards/margins"),
                    ylabel="implicit reward accuracy / margin")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str, ensure_ascii=False) + "\n")
    return summary

