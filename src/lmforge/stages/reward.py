"""The reward model: the Transformer with a scalar head on the last token, trained on preference pairs.

    lmforge reward train --checkpoint runs/sft --data arithmetic:digits=2,ops=+,restate=true --out runs/rm
    lmforge reward score --checkpoint runs/rm --data pairs.jsonl

The model is the SFT model with a `score` head (ModelConfig.score_dim = 1: a linear map of the final hidden state
to one number) read at the last token of prompt + reply. Training minimises the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected - margin) over pairs (lmforge.train.objectives; the margin only where a row
gives one), and logs the pair accuracy (r_chosen > r_rejected) and the mean reward margin, on training batches and
on held-out pairs. The checkpoint is an ordinary lmforge checkpoint (the LM head is kept, untouched) marked
stage "reward"; `RewardModel` scores (prompt, reply) conversations with it in batches.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import DataError
from lmforge.infer.reward import RewardModel, pair_rewards  # noqa: F401  (RewardModel: scoring lives in infer)
from lmforge.io import atomic_write_text
from lmforge.stages.pairs import (PairRows, PairsConfig, PairTask, batch_index, collate_pairs, inherited,
                                  rendered_pairs)
from lmforge.tokenizer.chat import pad_id
from lmforge.train.objectives import bradley_terry_loss
from lmforge.train.metrics import plot_curves
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train


@dataclass
class RewardTrainConfig(TrainConfig):
    max_steps: int | None = 200
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 16            # pairs per micro-batch (2x rows)
    eval_every: int = 50


@dataclass
class RewardConfig(PairsConfig):
    use_margin: bool = True         # subtract the rows' "margin" in the loss (Llama 2)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)


class RewardTask(PairTask):
    def __init__(self, rows: PairRows, val: PairRows | None, *, batch_size: int, seed: int, pad_id: int,
                 device, use_margin: bool = True, eval_batch_size: int = 32):
        self.rows, self.val, self.B, self.seed, self.pad = rows, val, batch_size, seed, pad_id
        self.device, self.use_margin, self.eval_batch_size = device, use_margin, eval_batch_size
        self.micro_per_step = 1

    def trainable(self, model):
        # the LM head does not take part in a reward; when it is not tied to the embedding it stays as it was
        head = model.lm_head.weight
        tied = head is model.tok_emb.weight
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad and (tied or p is not head)]

    def batch(self, step, micro):
        index = batch_index(len(self.rows), self.B, self.seed, step * self.micro_per_step + micro)
        x, _, _, last = collate_pairs(self.rows, index, self.pad, self.device)
        margin = torch.from_numpy(self.rows.margin[index]).to(self.device) if self.use_margin else None
        return x, last, margin

    def loss(self, model, batch):
        x, last, margin = batch
        r = pair_rewards(model, x, last)
        rc, rr = r.chunk(2)
        loss = bradley_terry_loss(rc, rr, margin).mean()
        rc, rr = rc.detach(), rr.detach()
        return loss, {"accuracy": float((rc > rr).float().mean()), "margin": float((rc - rr).mean()),
                      "reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean()),
                      "tokens": int((x != self.pad).sum())}

    def evaluate(self, model, final=False):
        if self.val is None or not len(self.val):
            return {}
        return pair_metrics(model, self.val, self.pad, self.device, self.eval_batch_size, self.use_margin)


@torch.no_grad()
def pair_metrics(model, rows: PairRows, pad_id: int, device, batch_size: int = 32, use_margin: bool = True) -> dict:
    """Held-out Bradley-Terry loss, pair accuracy and mean margin of a reward model."""
    rc_all, rr_all, losses = [], [], []
    for s in range(0, len(rows), batch_size):
        index = list(range(s, min(s + batch_size, len(rows))))
        x, _, _, last = collate_pairs(rows, index, pad_id, device)
        rc, rr = pair_rewards(model, x, last).chunk(2)
        margin = torch.from_numpy(rows.margin[index]).to(device) if use_margin else None
        losses.append(bradley_terry_loss(rc, rr, margin))
        rc_all.append(rc)
        rr_all.append(rr)
    rc, rr = torch.cat(rc_all), torch.cat(rr_all)
    return {"val_loss": float(torch.cat(losses).mean()), "val_accuracy": float((rc > rr).float().mean()),
            "val_margin": float((rc - rr).mean())}


def add_score_head(model) -> None:
    """Give a language model a one-number score head (in place), if it has none."""
    if getattr(model, "score", None) is not None:
        return
    from dataclasses import replace
    model.config = replace(model.config, score_dim=1)
    head = torch.nn.Linear(model.config.d_model, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=model.config.init_std)
    dev = model.tok_emb.weight.device
    model.score = head.to(dev, model.tok_emb.weight.dtype)


def run_reward_train(cfg: RewardConfig, model, tok, base: str | None = None) -> dict:
    from lmforge.runtime import detect_device

    tcfg = cfg.train
    rows, val = rendered_pairs(cfg, model, tok, tcfg.seed)
    add_score_head(model)
    device = detect_device(tcfg.device)
    task = RewardTask(rows, val, batch_size=tcfg.batch_size, seed=tcfg.seed, pad_id=pad_id(tok), device=device,
                      use_margin=cfg.use_margin, eval_batch_size=cfg.eval_batch_size)
    task.micro_per_step = tcfg.grad_accum
    spec = CheckpointSpec(model_config=model.config.to_dict(), tokenizer=tok,
                          extra={"stage": "reward", "base": str(base) if base else None, "data": list(cfg.data),
                                 "chat": inherited(base)[0]})
    t0 = time.time()
    summary = train(model, task, tcfg, checkpoint=spec)
    summary.update(train_pairs=len(rows), val_pairs=len(val) if val else 0, wall_time=time.time() - t0)
    if int(os.environ.get("RANK", 0)) == 0:
        run = Path(tcfg.out_dir)
        plot_curves(run / "metrics.jsonl", run / "accuracy.png", title=run.name,
                    keys=("accuracy", "val_accuracy"), ylabel="pair accuracy")
        atomic_write_text(Path(tcfg.out_dir) / "summary.json",
                          json.dumps(summary, indent=2, default=str, ensure_ascii=False) + "\n")
    return summary


def score_file(rm: RewardModel, path: str) -> list[dict]:
    """Rewards for every row of a JSONL file: preference rows get chosen and rejected rewards; {prompt,
    completion} (or {prompt, response}) rows one reward."""
    from lmforge.data.chat import read_jsonl_items
    from lmforge.data.preference import as_messages, parse_pair

    def parse(row):
        if isinstance(row, dict) and "chosen" in row:
            p = parse_pair(row)
            return _Scored("pair", p.prompt, [p.chosen, p.rejected], p.tools)
        if isinstance(row, dict) and "prompt" in row and ("completion" in row or "response" in row):
            reply = row.get("completion", row.get("response"))
            return _Scored("single", as_messages(row["prompt"], "prompt"),
                           [as_messages(reply, "completion", "assistant")], None)
        raise DataError("expected a preference row {prompt?, chosen, rejected} or {prompt, completion}")

    items = list(read_jsonl_items(path, parse))
    if not items:
        raise DataError("no rows to score", file=str(path))
    prompts = [it.prompt for it in items for _ in it.replies]
    replies = [r for it in items for r in it.replies]
    rewards = iter(rm.rewards(prompts, replies))
    out = []
    for it in items:
        rs = [next(rewards) for _ in it.replies]
        row = {"line": it.line, "prompt": it.prompt[-1]["content"]}
        if it.kind == "pair":
            row.update(reward_chosen=rs[0], reward_rejected=rs[1], prefers_chosen=rs[0] > rs[1])
        else:
            row.update(reward=rs[0])
        out.append(row)
    return out


@dataclass
class _Scored:
    kind: str
    prompt: list[dict]
    replies: list[list[dict]]
    tools: list[dict] | None
    file: str | None = None
    line: int | None = None


def summarize_scores(rows: list[dict]) -> str:
    pairs = [r for r in rows if "reward_chosen" in r]
    singles = [r for r in rows if "reward" in r]
    parts = []
    if pairs:
        acc = np.mean([r["prefers_chosen"] for r in pairs])
        margin = np.mean([r["reward_chosen"] - r["reward_rejected"] for r in pairs])
        parts.append(f"{len(pairs)} pairs: accuracy {100 * acc:.1f}%, mean margin {margin:.3f}")
    if singles:
        parts.append(f"{len(singles)} replies: mean reward {np.mean([r['reward'] for r in singles]):.3f}")
    return "; ".join(parts)
