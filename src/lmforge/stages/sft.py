"""Supervised fine-tuning for chat: conversations -> the chat template's ids + loss mask, run through the one trainer.

    lmforge sft --checkpoint BASE --data chats.jsonl arithmetic:digits=2 --out runs/sft train.max_steps=300

BASE is an lmforge checkpoint or a Hugging Face model directory (the verb loads it; a model imported from Hugging
Face keeps its own chat template). Data: JSONL files of conversations (lmforge.data.chat) and/or built-in
instruction sources (lmforge.data.tasks: arithmetic, chatterbot, rg:NAME).

`SFTTask` is pretraining's task with a mask: the loss is the model's own cross-entropy on the next token,
`model(x, targets=y, loss_mask=mask)`, weighted by the template's loss mask, so only what the assistant writes
(its text, tool calls and end-of-turn token) is learned; system, user and tool text is context only.

Batching: each micro-batch is B conversations right-padded to the longest of them, batches built from length
buckets (a shuffled chunk of 64 batches' worth of rows, sorted by length, cut into batches) so that rows of a
batch have similar lengths and little is padding. Right padding is exact: attention is causal, so a real token
never attends to the pads after it, and positions 0, 1, ... of a row are the same alone or in a batch; pad targets
are -1 (ignored). Each row's logits, loss and gradient are therefore those it has alone (tests check it).
Packing several conversations into one row would need a block-diagonal attention mask and positions restarting
per conversation, which takes attention off the fused causal kernel; with length buckets padding wastes little,
so padding it is.

Held-out data: a file's rows go to validation by a hash of their text (`val_fraction`, stable across runs), a
built-in source gives its own held-out `eval` split. `evaluate` reports the token-averaged masked loss on it;
`samples` answers a few held-out prompts greedily, stopping at the end-of-turn token.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lmforge.data.chat import Conversation, parse_row, read_conversations
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.io import atomic_write_text
from lmforge.tokenizer.chat import end_of_turn_id, pad_id, render_chat, uses_lmforge_template
from lmforge.train.task import Task
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train

BUCKET_BATCHES = 64      # batches per length bucket: rows are sorted by length within such a chunk


@dataclass
class SFTTrainConfig(TrainConfig):
    """The trainer's settings with fine-tuning defaults (shorter, gentler, no weight decay)."""
    max_steps: int | None = 300
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 16


@dataclass
class SFTConfig:
    checkpoint: str = ""                 # the base model (lmforge checkpoint or HF directory); read by the verb
    data: list[str] = field(default_factory=list)   # JSONL files and/or built-in source names
    seq_len: int | None = None           # longest conversation in tokens (default: the model's context)
    truncate: bool = False               # cut longer conversations to seq_len instead of refusing them
    source_n: int = 5000                 # training conversations drawn from each built-in source
    source_counts: dict[str, int] = field(default_factory=dict)   # per-source source_n, by the name in data
    val_fraction: float = 0.05           # share of each file's rows held out (by a hash of the row)
    val_n: int = 200                     # held-out conversations per built-in source (its eval split)
    max_val: int = 400                   # at most this many held-out conversations are scored
    eval_batch_size: int = 16
    # a token budget per micro-batch instead of a row count: each length bucket is cut into batches of at most
    # batch_tokens padded tokens, so short conversations come many to a batch and long ones few (train.batch_size
    # then only sets the bucket size); a step then costs about the same whatever the lengths
    batch_tokens: int | None = None
    sample_n: int = 3                    # held-out prompts answered greedily at each sample and at the end
    sample_tokens: int = 64
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)

    def __post_init__(self):
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError("must be ≥ 2", field="seq_len")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("must be in [0, 1)", field="val_fraction")
        if self.batch_tokens is not None and (isinstance(self.batch_tokens, bool) or self.batch_tokens < 1):
            raise ConfigError("must be ≥ 1 (or null for train.batch_size rows)", field="batch_tokens")
        for name in ("source_n", "eval_batch_size", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError("must be ≥ 1", field=name)
        for name in ("val_n", "max_val", "sample_n"):
            if getattr(self, name) < 0:
                raise ConfigError("must be ≥ 0", field=name)
        for src, n in self.source_counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"{src}: must be an integer ≥ 1, got {n!r}", field="source_counts")


# ---------------------------------------------------------------------------------------------------------------
# data: conversations -> (ids, mask) rows

@dataclass
class ChatRows:
    """Rendered conversations: row i is ids[i] (int64 tokens) with mask[i] (1 on assistant tokens)."""
    ids: list[np.ndarray]
    mask: list[np.ndarray]
    prompts: list[tuple[list[dict], list[dict] | None, str]]   # (messages before the last reply, tools, the reply)

    def __len__(self) -> int:
        return len(self.ids)


def load_conversations(sources: list[str], *, source_n: int, val_fraction: float, val_n: int,
                       seed: int, source_counts: dict[str, int] | None = None
                       ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out) conversations of every source: files split by a hash of each row, built-in sources by
    their own train / eval splits. source_counts: training conversations of some built-in sources (by the name
    as given in `sources`), instead of source_n (a mix: many short problems, fewer long tool demonstrations)."""
    from lmforge.data import tasks

    if not sources:
        raise ConfigError("no data given (--data FILE.jsonl or a built-in source: "
                          f"{', '.join(tasks.NAMES)})", field="data")
    source_counts = dict(source_counts or {})
    for src in source_counts:
        if src not in sources or not tasks.is_builtin(src) or Path(src).exists():
            raise ConfigError(f"{src!r} is not one of the built-in sources in data ({', '.join(sources)})",
                              field="source_counts")
    train_convs, val_convs = [], []
    for src in sources:
        is_file = Path(src).exists() or not tasks.is_builtin(src)
        if is_file:
            if not Path(src).exists() and "/" not in src and not src.endswith((".jsonl", ".json")):
                raise ConfigError(f"{src!r} is neither a file nor a built-in source (built-ins: "
                                  f"{', '.join(tasks.NAMES)})", field="data")
            for conv in read_conversations(src):
                (val_convs if _held_out(conv, val_fraction) else train_convs).append(conv)
            continue
        for split, n, out in (("train", source_counts.get(src, source_n), train_convs), ("eval", val_n, val_convs)):
            if n == 0:
                continue
            for i, row in enumerate(tasks.conversations(src, split=split, n=n, seed=seed)):
                conv = parse_row(row)
                conv.file, conv.line = f"{src} ({split})", i + 1
                out.append(conv)
    if not train_convs:
        raise DataError("no training conversations (every row went to the held-out split?)",
                        file=", ".join(sources))
    return train_convs, val_convs


def _held_out(conv: Conversation, fraction: float) -> bool:
    key = json.dumps([conv.messages, conv.tools], sort_keys=True, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") < fraction * 2 ** 64


def render_rows(tok, convs: list[Conversation], seq_len: int, *, truncate: bool = False,
                progress: bool = False, desc: str = "render") -> ChatRows:
    """The conversations through the chat template. A conversation longer than seq_len + 1 tokens (seq_len inputs
    and their targets) is a DataError naming where it came from, or with truncate=True is cut (and dropped when
    no assistant token is left)."""
    from tqdm import tqdm

    ids_out, mask_out, prompts = [], [], []
    for conv in tqdm(convs, desc=desc, unit="conv", disable=not progress, mininterval=1.0):
        try:
            ids, mask = render_chat(tok, conv.messages, conv.tools)
        except LmforgeError as e:
            raise DataError(e.message, file=conv.file, line=conv.line) from None
        if len(ids) > seq_len + 1:
            if not truncate:
                raise DataError(f"conversation of {len(ids)} tokens does not fit the context of {seq_len} tokens "
                                f"(training reads {len(ids) - 1}); shorten it, or pass --truncate to cut long "
                                "conversations", file=conv.file, line=conv.line)
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if not any(mask[1:]):
            continue   # truncated before any assistant token: nothing to learn from it
        ids_out.append(np.asarray(ids, dtype=np.int64))
        mask_out.append(np.asarray(mask, dtype=np.float32))
        last = max(i for i, m in enumerate(conv.messages) if m.get("role") == "assistant")
        prompts.append((conv.messages[:last], conv.tools, conv.messages[last].get("content") or ""))
    return ChatRows(ids_out, mask_out, prompts)


def collate(rows: ChatRows, index, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, loss mask) of the rows `index`, right-padded to the longest: pad targets are -1."""
    T = max(len(rows.ids[i]) for i in index) - 1
    x = torch.full((len(index), T), pad_id, dtype=torch.long)
    y = torch.full((len(index), T), -1, dtype=torch.long)
    m = torch.zeros((len(index), T), dtype=torch.float32)
    for r, i in enumerate(index):
        ids, mask = torch.from_numpy(rows.ids[i]), torch.from_numpy(rows.mask[i])
        n = len(ids) - 1
        x[r, :n], y[r, :n], m[r, :n] = ids[:-1], ids[1:], mask[1:]   # the mask of a target token
    return x.to(device), y.to(device), m.to(device)


# ---------------------------------------------------------------------------------------------------------------
# the task

class SFTTask(Task):
    def __init__(self, tok, train_rows: ChatRows, val_rows: ChatRows | None = None, *, batch_size: int,
                 seed: int = 0, grad_accum: int = 1, eval_batch_size: int = 16, sample_n: int = 3,
                 sample_tokens: int = 64, device="cpu", batch_tokens: int | None = None):
        if len(train_rows) == 0:
            raise DataError("no training conversations")
        self.tok, self.train_rows, self.val_rows = tok, train_rows, val_rows
        self.B, self.seed, self.grad_accum = batch_size, seed, grad_accum
        self.eval_batch_size, self.sample_n, self.sample_tokens = eval_batch_size, sample_n, sample_tokens
        self.device = torch.device(device)
        self.pad_id = pad_id(tok)
        self.eot = end_of_turn_id(tok)
        self.lengths = np.array([len(r) - 1 for r in train_rows.ids])     # tokens a row puts through the model
        self.batch_tokens = batch_tokens
        self._starts = [0]                   # global index of each epoch's first batch (epochs vary in count
        self._epoch, self._layout = -1, None  # when batches are cut by tokens)

    # -- batches: a pure function of (seed, step, micro) ------------------------------------------------------
    def batch(self, step: int, micro: int):
        g = step * self.grad_accum + micro
        while g >= self._starts[-1]:            # lay out epochs in turn until one holds batch g; keep the last
            self._epoch, self._layout = len(self._starts) - 1, self._epoch_batches(len(self._starts) - 1)
            self._starts.append(self._starts[-1] + len(self._layout))
        epoch = int(np.searchsorted(self._starts, g, side="right")) - 1
        if epoch != self._epoch:                # an earlier epoch (a step asked again): laid out anew
            self._layout, self._epoch = self._epoch_batches(epoch), epoch
        return collate(self.train_rows, self._layout[g - self._starts[epoch]], self.pad_id, self.device)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This epoch's batches: shuffle, sort by length within chunks of BUCKET_BATCHES batches, cut into
        batches, shuffle the batches (so lengths do not march in order through training)."""
        rng = np.random.default_rng([self.seed, 4099, epoch])
        perm = rng.permutation(len(self.lengths))
        chunk = self.B * BUCKET_BATCHES
        batches = []
        for c in range(0, len(perm), chunk):
            part = perm[c:c + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            if self.batch_tokens is None:
                batches += [part[i:i + self.B] for i in range(0, len(part), self.B)]
                continue
            i = 0
            while i < len(part):   # sorted ascending: a batch's padded size is its last row's length × rows
                j = i + 1
                while j < len(part) and self.lengths[part[j]] * (j + 1 - i) <= self.batch_tokens:
                    j += 1
                batches.append(part[i:j])
                i = j
        return [batches[i] for i in rng.permutation(len(batches))]

    def loss(self, model, batch):
        x, y, mask = batch
        _, loss = model(x, targets=y, loss_mask=mask, return_logits=False)   # mean over assistant targets; pads (-1) ignored
        return loss, {"tokens": int((y != -1).sum())}

    # -- held-out loss and sample answers -----------------------------------------------------------------------
    def evaluate(self, model, final: bool = False) -> dict:
        rows = self.val_rows
        if rows is None or len(rows) == 0:
            return {}
        order = np.argsort([len(r) for r in rows.ids], kind="stable")
        total, count = 0.0, 0.0
        for i in range(0, len(order), self.eval_batch_size):
            x, y, m = collate(rows, order[i:i + self.eval_batch_size], self.pad_id, self.device)
            _, loss_sum = model(x, targets=y, loss_mask=m, reduction="sum", return_logits=False)
            total += float(loss_sum)
            count += float((m * (y != -1)).sum())
        return {"val_loss": total / max(count, 1.0)}

    def samples(self, model) -> list[str]:
        return [f"{q!r} -> {a!r}" for q, a in self.answers(model)]

    def answers(self, model) -> list[tuple[str, str]]:
        """(the last prompt message, the greedy reply) for the first sample_n held-out conversations (training
        ones when nothing is held out); a reply that ended with the end-of-turn token shows it."""
        from lmforge.infer.engine import generate
        from lmforge.infer.sampling import SamplingParams

        rows = self.val_rows if self.val_rows is not None and len(self.val_rows) else self.train_rows
        params = SamplingParams(temperature=0.0, max_tokens=self.sample_tokens, stop_token_ids=[self.eot])
        out = []
        for messages, tools, _ in rows.prompts[:self.sample_n]:
            ids, _ = render_chat(self.tok, messages, tools, add_generation_prompt=True)
            room = model.config.max_seq_len - len(ids)
            if room < 1:
                continue
            res = generate(model, self.tok, ids, replace(params, max_tokens=min(self.sample_tokens, room)),
                           add_bos=False)
            ended = res.finish_reason == "stop" and res.stop_reason == self.eot
            out.append((messages[-1]["content"] if messages else "", res.text + (self.tok.decode([self.eot])
                                                                                 if ended else "")))
        return out

    def state_dict(self):
        return {"seed": self.seed, "train_rows": len(self.train_rows), "batch_size": self.B,
                "batch_tokens": self.batch_tokens}

    def load_state_dict(self, d):
        if (d.get("seed"), d.get("train_rows"), d.get("batch_size"), d.get("batch_tokens")) != \
                (self.seed, len(self.train_rows), self.B, self.batch_tokens):
            raise ConfigError("resuming with other data, seed or batch size would not continue the same run",
                              field="seed")


# ---------------------------------------------------------------------------------------------------------------
# the stage

def run_sft(cfg: SFTConfig, model, tok, base: str | None = None) -> dict:
    """Fine-tune `model` (with its tokenizer `tok`) on cfg.data; the checkpoint is a normal lmforge checkpoint
    (tokenizer included) marked as a chat model. Returns the trainer's summary plus data counts and answers."""
    from lmforge.runtime import detect_device

    tcfg = cfg.train
    context = model.config.max_seq_len
    seq_len = cfg.seq_len or context
    if seq_len > context:
        raise ConfigError(f"{seq_len} exceeds the model's context of {context} tokens", field="seq_len")
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
    render_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])  # has a template
    train_convs, val_convs = load_conversations(cfg.data, source_n=cfg.source_n, val_fraction=cfg.val_fraction,
                                                val_n=cfg.val_n, seed=tcfg.seed, source_counts=cfg.source_counts)
    main = int(os.environ.get("RANK", 0)) == 0
    show = tcfg.progress and main
    train_rows = render_rows(tok, train_convs, seq_len, truncate=cfg.truncate, progress=show, desc="render train")
    val_rows = render_rows(tok, val_convs[:cfg.max_val], seq_len, truncate=cfg.truncate, progress=show,
                           desc="render val")
    device = detect_device(tcfg.device)
    task = SFTTask(tok, train_rows, val_rows, batch_size=tcfg.batch_size, seed=tcfg.seed, grad_accum=tcfg.grad_accum,
                   eval_batch_size=cfg.eval_batch_size, sample_n=cfg.sample_n, sample_tokens=cfg.sample_tokens,
                   device=device, batch_tokens=cfg.batch_tokens)
    eot = task.eot
    chat = {"template": "lmforge" if uses_lmforge_template(tok) else "hf", "end_of_turn": tok.decode([eot]),
            "end_of_turn_id": eot}
    spec = CheckpointSpec(model_config=model.config.to_dict(), tokenizer=tok,
                          generation_config={"temperature": 0.7, "top_k": 50, "max_new_tokens": 256,
                                             "stop_token_ids": [eot]},
                          extra={"stage": "sft", "chat": chat, "base": str(base) if base else None,
                                 "data": list(cfg.data)})
    t0 = time.time()
    n_tokens = sum(len(r) - 1 for r in train_rows.ids)
    n_assistant = sum(float(m[1:].sum()) for m in train_rows.mask)
    summary = train(model, task, tcfg, checkpoint=spec)   # no MFU: its peak-FLOP/s probe would cost more than
                                                              # a short fine-tune, and padded rows blur it
    summary.update(params=model.num_params(), wall_time=time.time() - t0, train_conversations=len(train_rows),
                   val_conversations=len(val_rows), train_tokens=n_tokens,
                   assistant_fraction=n_assistant / max(n_tokens, 1), chat=chat)
    if main:
        model.eval()
        with torch.no_grad():
            summary["answers"] = task.answers(model)
        atomic_write_text(Path(tcfg.out_dir) / "summary.json",
                          json.dumps(summary, indent=2, default=str, ensure_ascii=False) + "\n")
    return summary
