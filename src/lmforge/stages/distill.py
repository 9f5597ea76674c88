"""Distillation: a small student learns from a bigger teacher's next-token distributions.

Logit distillation (`DistillTask`): on the same token windows pretraining uses (the shards and both batch modes of
`PretrainTask`), the student's loss is

    alpha * KD(student, teacher) + (1 - alpha) * CE(student, next token)

with KD one of the divergences of `lmforge.train.distill` (forward KL, reverse KL, generalized JSD) at temperature
τ. The teacher is a frozen module of the task: the trainer moves it to the device in eval mode without gradients,
never optimises it and never saves it — the checkpoint holds the student alone, loadable like any other. The
student predicts over the teacher's vocabulary with the teacher's tokenizer (a distribution is compared token by
token), so a student of another vocabulary size, or shards made by another tokenizer, is refused before anything
is written.

Sequence-level distillation (Kim & Rush 2016): the teacher answers the prompts of a conversation source (a JSONL
file of chats or a built-in source such as `chatterbot` or `arithmetic`) and the student is fine-tuned on those
answers as on any chat data. `teacher_conversations` makes that data with the inference engine: each
conversation's prompt is its messages before the first assistant turn, the teacher's reply runs to its
end-of-turn token, and a reply that never gets there within the token budget (or strays into chat markers) is
left out and counted, since fine-tuning would teach the student to end a turn the teacher never ended.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.eval.bpb import evaluate_bpb, token_byte_lengths
from lmforge.io import write_json
from lmforge.stages.pretrain import GENERATION_DEFAULTS, ModelSection, PretrainTask, build_model
from lmforge.train.distill import distill_loss
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train


class DistillTask(PretrainTask):
    """Pretraining's batches and evaluation; the loss mixes the teacher's soft targets with the hard ones.

    teacher: the frozen model whose distributions the student follows (same vocabulary). kind: 'fkl' | 'rkl' |
    'jsd'; temperature τ; beta for 'jsd'; alpha: weight of the distillation term (1 = teacher only, 0 = hard labels
    only, i.e. plain pretraining). The other arguments are PretrainTask's."""

    def __init__(self, teacher: torch.nn.Module, train_tokens, val_tokens, *, kind: str = "fkl",
                 temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.5, **pretrain_kwargs):
        super().__init__(train_tokens, val_tokens, **pretrain_kwargs)
        self.teacher = teacher
        self.kind, self.temperature, self.beta, self.alpha = kind, temperature, beta, alpha
        self._teacher_eval: dict | None = None

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.teacher}

    def loss(self, model, batch):
        x, y, mask = batch
        logits, ce = model(x, targets=y, loss_mask=mask)
        keep = y != -1 if mask is None else (y != -1) & mask.bool()
        if self.alpha > 0:
            with torch.no_grad():
                teacher_logits, _ = self.teacher(x)
            kd = distill_loss(logits, teacher_logits, keep, kind=self.kind, temperature=self.temperature,
                              beta=self.beta)
        else:   # hard labels alone: the teacher is not consulted (the baseline of the same run)
            kd = torch.zeros((), device=logits.device)
        loss = self.alpha * kd + (1.0 - self.alpha) * ce
        return loss, {"tokens": y.numel(), "kd": kd.detach(), "ce": ce.detach()}

    def evaluate(self, model, final: bool = False) -> dict:
        out = super().evaluate(model, final)
        if final:   # the teacher's own score on the same split, once: what the student is measured against
            if self._teacher_eval is None:
                res = evaluate_bpb(self.teacher, self.val_tokens, self.token_bytes, self.T, self.eval_batch_size,
                                   device=self.device)
                self._teacher_eval = {"teacher_val_loss": res["loss"], "teacher_val_bpb": res["bpb"]}
            out.update(self._teacher_eval)
        return out

    def state_dict(self):
        return {**super().state_dict(), "distill": self._settings()}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        if d.get("distill") != self._settings():
            raise ConfigError(f"the run was distilling with {d.get('distill')}; resuming with {self._settings()} "
                              f"would not continue it", field="distill")

    def _settings(self) -> dict:
        return {"loss": self.kind, "temperature": self.temperature, "beta": self.beta, "alpha": self.alpha}


# -- the `lmforge distill` verb ---------------------------------------------------------------------------

@dataclass
class DistillSection:
    loss: Literal["fkl", "rkl", "jsd"] = "fkl"
    temperature: float = 1.0
    beta: float = 0.5          # jsd: M = beta * p_teacher + (1 - beta) * p_student
    alpha: float = 0.5         # loss = alpha * KD + (1 - alpha) * hard-label cross-entropy

    def __post_init__(self):
        if not 0 < self.temperature < float("inf"):
            raise ConfigError(f"must be > 0, got {self.temperature}", field="temperature")
        if not 0 <= self.beta <= 1:
            raise ConfigError(f"must be in [0, 1], got {self.beta}", field="beta")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"must be in [0, 1], got {self.alpha}", field="alpha")


@dataclass
class DistillConfig:
    teacher: str = ""                    # the teacher's checkpoint or run directory (or a Hugging Face model dir)
    data: str = ""                       # token shards made with the teacher's tokenizer
    seq_len: int | None = None           # default: the teacher's max_seq_len
    mode: Literal["random", "packed"] = "packed"
    eval_tokens: int = 65536             # periodic eval on this many val tokens; the final eval uses all of val
    eval_batch_size: int = 16
    init_from: str = ""                  # start the student from this checkpoint's weights
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="tiny"))   # the student
    distill: DistillSection = field(default_factory=DistillSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError("must be ≥ 2", field="seq_len")


def check_teacher(teacher, tokenizer, seq_len: int, student_vocab: int) -> None:
    """What logit distillation needs of a teacher: the student's vocabulary and a long enough context."""
    vocab = teacher.config.vocab_size
    if student_vocab != vocab:
        raise ConfigError(f"the student's vocab_size {student_vocab} differs from the teacher's {vocab}: logit "
                          f"distillation compares distributions over one vocabulary (leave vocab_size unset)",
                          field="model.overrides.vocab_size")
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"the teacher's tokenizer has {tokenizer.vocab_size} tokens, its model only {vocab}",
                          field="teacher")
    if seq_len > teacher.config.max_seq_len:
        raise ConfigError(f"{seq_len} is longer than the teacher's context ({teacher.config.max_seq_len})",
                          field="seq_len")


def run_distill(dcfg: DistillConfig, teacher: torch.nn.Module, tokenizer) -> dict:
    """Logit distillation of a new student (model.*) from `teacher` (with its `tokenizer`) on token shards."""
    from lmforge import checkpoint as ckpt
    from lmforge.data.shards import load_shards
    from lmforge.runtime import detect_device

    if not dcfg.data:
        raise ConfigError("no token shards given (--data DIR, made by `lmforge data prepare` with the teacher's "
                          "tokenizer)", field="data")
    train_tokens, val_tokens, meta = load_shards(dcfg.data)
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash()):
        raise DataError("the shards were made with another tokenizer than the teacher's; distillation compares "
                        "distributions token by token: prepare them with the teacher's tokenizer "
                        "(lmforge data prepare --tokenizer TEACHER/tokenizer)",
                        file=str(Path(dcfg.data) / "meta.json"), field="tokenizer_hash")
    if dcfg.seq_len is None:
        dcfg.seq_len = teacher.config.max_seq_len
    cfg = dcfg.train
    torch.manual_seed(cfg.seed)
    model, mcfg = build_model(dcfg, teacher.config.vocab_size)
    check_teacher(teacher, tokenizer, dcfg.seq_len, mcfg.vocab_size)
    if dcfg.init_from:
        ckpt.load(dcfg.init_from, model)
    device = detect_device(cfg.device)
    d = dcfg.distill
    task = DistillTask(teacher, train_tokens, val_tokens, kind=d.loss, temperature=d.temperature, beta=d.beta,
                       alpha=d.alpha, seq_len=dcfg.seq_len, batch_size=cfg.batch_size, bos_id=tokenizer.bos_id,
                       token_bytes=token_byte_lengths(tokenizer), seed=cfg.seed, mode=dcfg.mode,
                       eval_tokens=dcfg.eval_tokens, eval_batch_size=dcfg.eval_batch_size, device=device,
                       grad_accum=cfg.grad_accum, progress=cfg.progress)
    spec = CheckpointSpec(model_config=mcfg.to_dict(), tokenizer=tokenizer, generation_config=GENERATION_DEFAULTS,
                          extra={"stage": "distill", "teacher": str(dcfg.teacher), "data": str(dcfg.data),
                                 "distill": task.state_dict()["distill"]})
    t0 = time.time()
    summary = train(model, task, cfg, checkpoint=spec, flops_per_token=model.flops_per_token(dcfg.seq_len))
    summary.update(params=model.num_params(), teacher_params=teacher.num_params(), wall_time=time.time() - t0)
    if int(os.environ.get("RANK", 0)) == 0:
        write_json(Path(cfg.out_dir) / "summary.json", json.loads(json.dumps(summary, default=str)))
    return summary


# -- sequence-level distillation: the teacher's answers as fine-tuning data ------------------------------

def prompt_conversations(sources: list[str], n: int | None = None, seed: int = 0) -> list[dict]:
    """The prompts of `sources` (JSONL files of conversations or built-in source names), at most n in all: each
    conversation cut before its first assistant message ({"messages": [...]}, "tools" kept when present)."""
    from lmforge.data import tasks
    from lmforge.data.chat import read_conversations

    out: list[dict] = []
    for src in sources:
        left = None if n is None else n - len(out)
        if left is not None and left <= 0:
            break
        if tasks.is_builtin(src):
            if left is None and tasks.source(src).kind == "task":
                raise ConfigError(f"{src!r} is procedural (endless): say how many prompts to take",
                                  field="generate.prompts")
            rows = tasks.conversations(src, split="train", n=left, seed=seed)
        else:
            rows = ({"messages": c.messages, "tools": c.tools} for c in read_conversations(src))
        for row in rows:
            first = next(i for i, m in enumerate(row["messages"]) if m.get("role") == "assistant")
            if first == 0:
                continue   # nothing to answer
            prompt = {"messages": row["messages"][:first]}
            if row.get("tools"):
                prompt["tools"] = row["tools"]
            out.append(prompt)
            if n is not None and len(out) >= n:
                break
    return out


def teacher_conversations(teacher, tokenizer, prompts: list[dict], params, *, max_batch: int = 32,
                          progress: bool = True) -> tuple[list[dict], dict]:
    """(conversations, counts): each prompt with the teacher's reply appended as the assistant message, and
    {"prompts", "kept", "unfinished", "stray_markers"}. `params` (SamplingParams) decide how the teacher samples;
    its replies stop at the tokenizer's end-of-turn token."""
    from tqdm import tqdm

    from lmforge.infer.engine import Engine
    from lmforge.tokenizer.chat import end_of_turn_id, render_chat

    end = end_of_turn_id(tokenizer)
    params = params.replace(stop_token_ids=sorted(set(params.stop_token_ids) | {end}))
    specials = set(tokenizer.special_tokens.values())
    engine = Engine(teacher, tokenizer, max_batch=max_batch)
    ids = [render_chat(tokenizer, p["messages"], p.get("tools"), add_generation_prompt=True)[0] for p in prompts]
    run = engine.start(ids, params, add_bos=False) if ids else None
    bar = tqdm(total=len(ids), disable=not progress, unit="reply", desc="teacher replies", dynamic_ncols=True)
    for _, _, delta in (run or ()):
        if delta.finish_reason is not None:
            bar.update(1)
    bar.close()
    rows, counts = [], {"prompts": len(prompts), "kept": 0, "unfinished": 0, "stray_markers": 0}
    for prompt, (res,) in zip(prompts, run.results if run else []):
        reply = res.token_ids
        if res.finish_reason != "stop" or not reply or reply[-1] != end:
            counts["unfinished"] += 1
            continue
        if any(t in specials for t in reply[:-1]):
            counts["stray_markers"] += 1
            continue
        rows.append({**prompt, "messages": [*prompt["messages"],
                                            {"role": "assistant", "content": tokenizer.decode(reply[:-1])}]})
    counts["kept"] = len(rows)
    return rows, counts
