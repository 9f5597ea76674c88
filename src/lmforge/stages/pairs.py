"""Preference pairs as token rows, shared by the reward model and DPO.

    train, val = load_pairs(["pairs.jsonl", "arithmetic:digits=2"], n=2000, val_fraction=0.05, val_n=200, seed=0)
    rows = render_pairs(tok, train, seq_len)          # PairRows: chosen and rejected rows, completion masks
    x, y, mask, last = collate_pairs(rows, [0, 1, 2], pad_id, device)   # 2B rows: B chosen then B rejected

A side of a pair renders as the chat template of prompt + that side; its completion mask is 1 on the tokens the
assistant writes AFTER the prompt (the compared reply), so earlier assistant turns in a multi-turn prompt are
context. Rows are right-padded: attention is causal, so a real token never sees the pads after it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from lmforge.data.preference import Pair, read_pairs, task_pairs
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.tokenizer.chat import render_chat
from lmforge.train.task import Task


@dataclass
class PairsConfig:
    """The data settings the reward model and DPO share."""
    checkpoint: str = ""            # the model the stage starts from; read by the verb
    data: list[str] = field(default_factory=list)   # preference JSONL files and/or built-in task names
    pairs_n: int = 4000             # training pairs drawn from each built-in task
    val_n: int = 200                # held-out pairs per built-in task (its eval split)
    val_fraction: float = 0.05      # share of each file's pairs held out (by a hash of the pair)
    # built-in tasks: this share of the pairs rejects the starting model's OWN wrong answer (sampled
    # own_samples times per problem at own_temperature), the rest a hand-made wrong one
    own_fraction: float = 0.0
    own_samples: int = 4
    own_temperature: float = 1.0
    own_max_tokens: int = 32
    seq_len: int | None = None      # longest side of a pair in tokens (default: the model's context)
    eval_batch_size: int = 32

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("must be in [0, 1)", field="val_fraction")
        if not 0 <= self.own_fraction <= 1:
            raise ConfigError("must be in [0, 1]", field="own_fraction")
        for name in ("pairs_n", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError("must be ≥ 1", field=name)
        if self.val_n < 0:
            raise ConfigError("must be ≥ 0", field="val_n")


def rendered_pairs(cfg: PairsConfig, model, tok, seed: int) -> tuple["PairRows", "PairRows | None"]:
    """(training rows, held-out rows or None) of cfg.data for `model`'s context (the model also answers for the
    own_fraction pairs)."""
    seq_len = cfg.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise ConfigError(f"{seq_len} exceeds the model's context of {model.config.max_seq_len} tokens",
                          field="seq_len")
    train_pairs, val_pairs = load_pairs(cfg.data, n=cfg.pairs_n, val_fraction=cfg.val_fraction, val_n=cfg.val_n,
                                        seed=seed, model=model, tok=tok, own_fraction=cfg.own_fraction,
                                        own_samples=cfg.own_samples, own_temperature=cfg.own_temperature,
                                        own_max_tokens=cfg.own_max_tokens)
    return render_pairs(tok, train_pairs, seq_len), (render_pairs(tok, val_pairs, seq_len) if val_pairs else None)


class PairTask(Task):
    """What the pair stages' Tasks share: a run continues only on the same pairs, seed and batch size."""
    rows: "PairRows"
    seed: int
    B: int

    def state_dict(self):
        return {"seed": self.seed, "pairs": len(self.rows), "batch_size": self.B}

    def load_state_dict(self, d):
        if (d.get("seed"), d.get("pairs"), d.get("batch_size")) != (self.seed, len(self.rows), self.B):
            raise ConfigError("resuming with other data, seed or batch size would not continue the same run",
                              field="seed")


@dataclass
class PairRows:
    chosen: list[np.ndarray]          # token ids of prompt + chosen
    rejected: list[np.ndarray]
    chosen_mask: list[np.ndarray]     # 1 on the chosen reply's assistant tokens
    rejected_mask: list[np.ndarray]
    margin: np.ndarray                # per pair (0 where none was given)
    pairs: list[Pair]

    def __len__(self) -> int:
        return len(self.chosen)


def load_pairs(sources: list[str], *, n: int, val_fraction: float, val_n: int, seed: int, model=None, tok=None,
               own_fraction: float = 0.0, own_samples: int = 4, own_temperature: float = 1.0,
               own_max_tokens: int = 32) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) pairs: JSONL files split by a hash of each row, built-in task families (by name) give
    n pairs from their train split and val_n from their eval split. With own_fraction > 0 (and the model), that
    share of a family's pairs have the MODEL's own wrong answer as the rejected side (`model_pairs`); the rest
    are made wrong by hand (lmforge.data.preference.task_pairs)."""
    from lmforge.data import tasks

    if not sources:
        raise ConfigError("no preference data given (--data PAIRS.jsonl or a built-in task such as "
                          "arithmetic:digits=2)", field="data")
    train, val = [], []
    for src in sources:
        if tasks.is_builtin(src):
            fam = tasks.family(src)
            for split, count, out in (("train", n, train), ("eval", val_n, val)):
                own = round(count * own_fraction) if model is not None else 0
                mine = model_pairs(model, tok, fam, own, seed, split, own_samples, own_temperature, own_max_tokens)
                out += mine
                if count > len(mine):
                    out += task_pairs(fam, count - len(mine), seed + 1, split)
            continue
        for p in read_pairs(src):
            key = json.dumps([p.prompt, p.chosen, p.rejected], sort_keys=True, ensure_ascii=False)
            h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
            (val if h < val_fraction else train).append(p)
    if not train:
        raise DataError("no training pairs (every pair went to validation: lower val_fraction)")
    return train, val


def model_pairs(model, tok, family, n: int, seed: int, split: str, samples: int = 4, temperature: float = 1.0,
                max_tokens: int = 32, batch: int = 64) -> list[Pair]:
    """Up to n pairs whose rejected side is the model's own wrong answer: `samples` turns per problem of the
    split at `temperature` (whole tool-using turns for a family with tools); a problem with a wrong turn gives
    (a right turn of the model's own, or the demonstration when it has none; that wrong turn). What a policy
    actually gets wrong is the most useful thing to learn to avoid (on-policy negatives)."""
    from lmforge.infer.assistant import run_chat_turns
    from lmforge.infer.sampling import SamplingParams

    if n < 1:
        return []
    tools = family.tools or None
    names = [t["function"]["name"] for t in tools] if tools else None
    pairs: list[Pair] = []
    problems = family.iter_problems(split, seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        while len(pairs) < n:
            chunk = [p for _, p in zip(range(batch), problems)]
            if not chunk:
                break
            base = seed * 7919 + len(pairs) * 131
            params = [SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                     seed=(base + i * samples + j) % 2 ** 63)
                      for i in range(len(chunk)) for j in range(samples)]
            turns = run_chat_turns(model, tok, [p.messages for p in chunk for _ in range(samples)], names, params,
                                   max_batch=len(params))
            for i, p in enumerate(chunk):
                mine = turns[i * samples:(i + 1) * samples]
                score = [family.score(p, t[-1].get("content") or "") for t in mine]
                wrong = next((t for t, s in zip(mine, score) if s < 1.0 and (t[-1].get("content") or "").strip()),
                             None)
                if wrong is None:
                    continue
                right = next((t for t, s in zip(mine, score) if s >= 1.0), None)
                chosen = right or family.demonstration(p, tools=bool(tools))[len(p.messages):]
                if chosen != wrong:
                    pairs.append(Pair(list(p.messages), chosen, wrong, tools=tools,
                                      file=f"{family.name} (model samples)"))
                if len(pairs) >= n:
                    break
    model.train(was_training)
    return pairs


def _side(tok, pair: Pair, side: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        ids, mask = render_chat(tok, pair.prompt + side, pair.tools)
        before, _ = render_chat(tok, pair.prompt, pair.tools)
    except LmforgeError as e:
        raise DataError(e.message, file=pair.file, line=pair.line) from None
    if ids[:len(before)] != before:
        raise DataError("the chat template renders the prompt differently inside the conversation",
                        file=pair.file, line=pair.line)
    if len(ids) > seq_len:
        raise DataError(f"pair of {len(ids)} tokens does not fit the context of {seq_len} tokens",
                        file=pair.file, line=pair.line)
    mask = np.asarray(mask, dtype=np.float32)
    mask[:len(before)] = 0
    if not mask.any():
        raise DataError("the reply renders to no assistant tokens", file=pair.file, line=pair.line)
    return np.asarray(ids, dtype=np.int64), mask


def render_pairs(tok, pairs: list[Pair], seq_len: int) -> PairRows:
    rows = PairRows([], [], [], [], np.zeros(len(pairs), dtype=np.float32), list(pairs))
    for i, p in enumerate(pairs):
        c, cm = _side(tok, p, p.chosen, seq_len)
        r, rm = _side(tok, p, p.rejected, seq_len)
        if np.array_equal(c, r):
            raise DataError("chosen and rejected render to the same tokens", file=p.file, line=p.line)
        rows.chosen.append(c)
        rows.chosen_mask.append(cm)
        rows.rejected.append(r)
        rows.rejected_mask.append(rm)
        rows.margin[i] = p.margin or 0.0
    return rows


def collate_pairs(rows: PairRows, index, pad_id: int, device):
    """(x, y, mask, last) for the pairs `index`: 2B right-padded rows, the B chosen sides then the B rejected.
    x: input ids (B2, T); y: next-token targets (-1 on pads); mask: the completion mask of each target;
    last: the index in x of each row's last real token (where a reward model reads its score)."""
    seqs = [rows.chosen[i] for i in index] + [rows.rejected[i] for i in index]
    masks = [rows.chosen_mask[i] for i in index] + [rows.rejected_mask[i] for i in index]
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    m = torch.zeros((len(seqs), T), dtype=torch.float32)
    last = torch.empty(len(seqs), dtype=torch.long)
    for r, (s, mk) in enumerate(zip(seqs, masks)):
        n = len(s)
        x[r, :n] = torch.from_numpy(s)
        y[r, :n - 1] = x[r, 1:n]
        m[r, :n - 1] = torch.from_numpy(mk[1:])
        last[r] = n - 1
    return x.to(device), y.to(device), m.to(device), last.to(device)


def pair_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The pairs' order in an epoch: a pure function of (seed, epoch), so a resumed run sees the same batches."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_index(n: int, batch: int, seed: int, k: int) -> list[int]:
    """The pairs of the k-th micro-batch (epochs of shuffled pairs, the last incomplete batch of an epoch
    dropped)."""
    per_epoch = max(n // batch, 1)
    epoch, j = divmod(k, per_epoch)
    order = pair_order(n, seed, epoch)
    return [int(i) for i in order[j * batch:(j + 1) * batch]] or [int(i) for i in order[:batch]]


def inherited(base) -> tuple[dict | None, dict | None]:
    """(config.json["chat"], generation_config.json) of the checkpoint a stage starts from, which the model it
    trains keeps (its chat template and end-of-turn stop). (None, None) for a Hugging Face directory, whose
    template lives in its tokenizer, or no base."""
    if not base:
        return None, None
    from lmforge import checkpoint as ckpt
    try:
        path = ckpt.resolve(base)
        chat = ckpt.read_config(path).get("chat")
        f = path / "generation_config.json"
        return chat, (json.loads(f.read_text()) if f.is_file() else None)
    except (LmforgeError, OSError, ValueError):
        return None, None
