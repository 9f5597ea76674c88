"""Distillation: a small student learns from a bigger teacher — its next-token distributions, or its replies.

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
class GenerateSection:
    """How the teacher answers the prompts (sequence mode)."""
    prompts: int | None = None           # conversations taken from the sources in all (None: every one of finite
                                         # sources; procedural ones need a number)
    max_new_tokens: int = 256
    temperature: float = 0.0             # 0 = greedy: the teacher's most likely reply (Kim & Rush take the beam's)
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_batch: int = 32                  # replies decoded together

    def __post_init__(self):
        if self.prompts is not None and self.prompts < 1:
            raise ConfigError("must be ≥ 1 (or null for every conversation)", field="prompts")
        for name in ("max_new_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError("must be ≥ 1", field=name)


STUDENT_DEFAULT = ModelSection(preset="tiny")


@dataclass
class DistillConfig:
    teacher: str = ""                    # the teacher's checkpoint or run directory (or a Hugging Face model dir)
    data: list[str] = field(default_factory=list)   # logit mode: one shards directory made with the teacher's
                                         # tokenizer; sequence mode: conversation sources (JSONL files, built-ins)
    sequence: bool = False               # sequence-level distillation: fine-tune on the teacher's replies
    seq_len: int | None = None           # default: the shorter of the teacher's and the student's context
    mode: Literal["random", "packed"] = "packed"
    eval_tokens: int = 65536             # periodic eval on this many val tokens; the final eval uses all of val
    eval_batch_size: int = 16
    init_from: str = ""                  # the student is this lmforge checkpoint (its architecture and weights)
                                         # instead of a new model.* one
    model: ModelSection = field(default_factory=lambda: ModelSection(preset=STUDENT_DEFAULT.preset))   # student
    distill: DistillSection = field(default_factory=DistillSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    sft: dict = field(default_factory=dict)   # sequence mode: more keys of the SFT stage (val_fraction, sample_n...)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError("must be ≥ 2", field="seq_len")


def check_teacher(teacher, tokenizer, seq_len: int, student_vocab: int) -> None:
    """What distillation needs of a teacher: the student's vocabulary and a long enough context."""
    vocab = teacher.config.vocab_size
    if student_vocab != vocab:
        raise ConfigError(f"the student's vocab_size {student_vocab} differs from the teacher's {vocab}: the "
                          f"student predicts over the teacher's vocabulary with its tokenizer (leave vocab_size "
                          f"unset)", field="model.overrides.vocab_size")
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"the teacher's tokenizer has {tokenizer.vocab_size} tokens, its model only {vocab}",
                          field="teacher")
    if seq_len > teacher.config.max_seq_len:
        raise ConfigError(f"{seq_len} is longer than the teacher's context ({teacher.config.max_seq_len})",
                          field="seq_len")


def build_student(dcfg: DistillConfig, teacher, tokenizer):
    """(student, its ModelConfig): a new model from model.* over the teacher's vocabulary, or the checkpoint
    init_from (which must share the teacher's tokenizer). Sets dcfg.seq_len when it was left to the default."""
    from lmforge import checkpoint as ckpt
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer.tokenizer import Tokenizer

    if dcfg.init_from:
        if dcfg.model != STUDENT_DEFAULT:
            raise ConfigError("give the student either as model.* keys or as a checkpoint (init_from), not both",
                              field="init_from")
        path = ckpt.resolve(dcfg.init_from)
        mcfg = ModelConfig.from_checkpoint(path)
        if Tokenizer.load(path / "tokenizer").hash() != tokenizer.hash():
            raise ConfigError("the student checkpoint's tokenizer is not the teacher's", field="init_from")
        dcfg.seq_len = dcfg.seq_len or min(teacher.config.max_seq_len, mcfg.max_seq_len)
        if dcfg.seq_len > mcfg.max_seq_len:
            raise ConfigError(f"{dcfg.seq_len} is longer than the student's context ({mcfg.max_seq_len})",
                              field="seq_len")
        model = Transformer(mcfg)
        ckpt.load(path, model)
    else:
        dcfg.seq_len = dcfg.seq_len or teacher.config.max_seq_len
        model, mcfg = build_model(dcfg, teacher.config.vocab_size)
    check_teacher(teacher, tokenizer, dcfg.seq_len, mcfg.vocab_size)
    return model, mcfg


def run_distill(dcfg: DistillConfig, teacher: torch.nn.Module, tokenizer) -> dict:
    """Distil `teacher` (with its `tokenizer`) into a student: logit distillation on token shards, or with
    dcfg.sequence, fine-tuning on the teacher's replies (run_sequence_distill)."""
    if dcfg.sequence:
        return run_sequence_distill(dcfg, teacher, tokenizer)
    from lmforge.data.shards import load_shards
    from lmforge.runtime import detect_device

    if len(dcfg.data) != 1:
        raise ConfigError(f"logit distillation reads one directory of token shards (made by `lmforge data prepare` "
                          f"with the teacher's tokenizer), got {len(dcfg.data)} data arguments (conversation "
                          f"sources are for sequence mode: --sequence)", field="data")
    data = dcfg.data[0]
    train_tokens, val_tokens, meta = load_shards(data)
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash()):
        raise DataError("the shards were made with another tokenizer than the teacher's; distillation compares "
                        "distributions token by token: prepare them with the teacher's tokenizer "
                        "(lmforge data prepare --tokenizer TEACHER/tokenizer)",
                        file=str(Path(data) / "meta.json"), field="tokenizer_hash")
    cfg = dcfg.train
    torch.manual_seed(cfg.seed)
    model, mcfg = build_student(dcfg, teacher, tokenizer)
    device = detect_device(cfg.device)
    d = dcfg.distill
    task = DistillTask(teacher, train_tokens, val_tokens, kind=d.loss, temperature=d.temperature, beta=d.beta,
                       alpha=d.alpha, seq_len=dcfg.seq_len, batch_size=cfg.batch_size, bos_id=tokenizer.bos_id,
                       token_bytes=token_byte_lengths(tokenizer), seed=cfg.seed, mode=dcfg.mode,
                       eval_tokens=dcfg.eval_tokens, eval_batch_size=dcfg.eval_batch_size, device=device,
                       grad_accum=cfg.grad_accum, progress=cfg.progress)
    spec = CheckpointSpec(model_config=mcfg.to_dict(), tokenizer=tokenizer, generation_config=GENERATION_DEFAULTS,
                          extra={"stage": "distill", "teacher": str(dcfg.teacher), "data": str(data),
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
                          max_len: int | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """(conversations, counts): each prompt with the teacher's reply appended as the assistant message, and
    {"prompts", "kept", "unfinished", "stray_markers", "too_long"}. `params` (SamplingParams) decide how the
    teacher samples; its replies stop at the tokenizer's end-of-turn token. max_len: the most tokens a whole
    conversation may take (the student's context + 1): replies get what room their prompt leaves, and a prompt
    that leaves none is skipped."""
    from tqdm import tqdm

    from lmforge.infer.engine import Engine
    from lmforge.tokenizer.chat import end_of_turn_id, render_chat

    end = end_of_turn_id(tokenizer)
    params = params.replace(stop_token_ids=sorted(set(params.stop_token_ids) | {end}))
    specials = set(tokenizer.special_tokens.values())
    engine = Engine(teacher, tokenizer, max_batch=max_batch)
    counts = {"prompts": len(prompts), "kept": 0, "unfinished": 0, "stray_markers": 0, "too_long": 0}
    todo, ids, per_params = [], [], []
    for p in prompts:
        pid = render_chat(tokenizer, p["messages"], p.get("tools"), add_generation_prompt=True)[0]
        room = params.max_tokens if max_len is None else min(params.max_tokens or max_len, max_len - len(pid))
        if room is not None and room < 1:
            counts["too_long"] += 1
            continue
        todo.append(p)
        ids.append(pid)
        per_params.append(params.replace(max_tokens=room))
    run = engine.start(ids, per_params, add_bos=False) if ids else None
    bar = tqdm(total=len(ids), disable=not progress, unit="reply", desc="teacher replies", dynamic_ncols=True)
    for _, _, delta in (run or ()):
        if delta.finish_reason is not None:
            bar.update(1)
    bar.close()
    rows = []
    for prompt, (res,) in zip(todo, run.results if run else []):
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


TEACHER_DATA = "teacher_conversations.jsonl"   # in the run directory: the fine-tuning data, reusable by `lmforge sft`


def run_sequence_distill(dcfg: DistillConfig, teacher: torch.nn.Module, tokenizer) -> dict:
    """Sequence-level distillation: the teacher answers the prompts of dcfg.data, its conversations are written to
    OUT/teacher_conversations.jsonl, and the student (model.* or init_from) is fine-tuned on them by the SFT
    stage (train.* as for any run; more SFT keys in dcfg.sft). On resume the file written then is read again."""
    from dataclasses import fields

    from lmforge.config import build
    from lmforge.errors import CheckpointError
    from lmforge.infer.sampling import SamplingParams
    from lmforge.io import atomic_write_text
    from lmforge.stages.sft import SFTConfig, SFTTrainConfig, run_sft
    from lmforge.tokenizer.chat import end_of_turn_id

    if not dcfg.data:
        raise ConfigError("no conversation sources given (--data FILE.jsonl and/or a built-in source such as "
                          "chatterbot or arithmetic:digits=2)", field="data")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError(f"sequence mode generates in one process; run it without torchrun, or fine-tune on its "
                          f"{TEACHER_DATA} with `torchrun ... lmforge sft`", field="sequence")
    end_of_turn_id(tokenizer)    # the teacher chats: a template with an end-of-turn token (else a one-line error)
    cfg = dcfg.train
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("exists and is not a directory: a run needs a directory of its own", file=str(out))
    reserved = {"checkpoint", "data", "seq_len", "train"} & set(dcfg.sft)
    if reserved:
        raise ConfigError(f"{', '.join(sorted(reserved))} come from the distill config itself (data, seq_len, "
                          f"train.*), not from sft", field="sft")
    torch.manual_seed(cfg.seed)
    student, _ = build_student(dcfg, teacher, tokenizer)
    # the SFT settings are checked before the teacher spends its time answering
    scfg = build(SFTConfig, dict(dcfg.sft), prefix="sft.")
    scfg.data, scfg.seq_len = [str(out / TEACHER_DATA)], dcfg.seq_len
    scfg.train = SFTTrainConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainConfig)})

    path, g = out / TEACHER_DATA, dcfg.generate
    if cfg.resume:
        if not path.is_file():
            raise CheckpointError("nothing to resume: no teacher conversations in this run directory (drop "
                                  "--resume to start a new run)", file=str(path))
        counts = None
    else:
        prompts = prompt_conversations(dcfg.data, g.prompts, g.seed)
        params = SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, max_tokens=g.max_new_tokens,
                                seed=g.seed)
        rows, counts = teacher_conversations(teacher, tokenizer, prompts, params, max_batch=g.max_batch,
                                             max_len=dcfg.seq_len + 1, progress=cfg.progress)
        if not rows:
            raise DataError(f"the teacher ended none of its {counts['prompts']} replies with its end-of-turn token "
                            f"within generate.max_new_tokens={g.max_new_tokens} ({counts}): nothing to fine-tune "
                            f"on", file=", ".join(dcfg.data))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if cfg.progress:
            print(f"teacher: {counts['kept']} of {counts['prompts']} replies kept ({counts['unfinished']} unfinished "
                  f"within {g.max_new_tokens} tokens, {counts['stray_markers']} with stray chat markers, "
                  f"{counts['too_long']} prompts too long); {path}", flush=True)
    summary = run_sft(scfg, student, tokenizer, base=dcfg.init_from or None)
    summary.update(teacher=str(dcfg.teacher), teacher_params=teacher.num_params(), teacher_data=str(path),
                   teacher_replies=counts, stage="distill (sequence)")
    write_json(out / "summary.json", json.loads(json.dumps(summary, default=str, ensure_ascii=False)))
    return summary
