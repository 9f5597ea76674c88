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
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.preference import Pair, read_pairs, task_pairs
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.tokenizer.chat import render_chat


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


def load_pairs(sources: list[str], *, n: int, val_fraction: float, val_n: int, seed: int
               ) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) pairs: JSONL files split by a hash of each row, built-in task families (by name) give
    n pairs from their train split and val_n from their eval split."""
    from lmforge.data import tasks

    if not sources:
        raise ConfigError("no preference data given (--data PAIRS.jsonl or a built-in task such as "
                          "arithmetic:digits=2)", field="data")
    train, val = [], []
    for src in sources:
        if tasks.is_builtin(src):
            fam = tasks.family(src)
            train += task_pairs(fam, n, seed, "train")
            val += task_pairs(fam, val_n, seed, "eval") if val_n else []
            continue
        for p in read_pairs(src):
            key = json.dumps([p.prompt, p.chosen, p.rejected], sort_keys=True, ensure_ascii=False)
            h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
            (val if h < val_fraction else train).append(p)
    if not train:
        raise DataError("no training pairs (every pair went to validation: lower val_fraction)")
    return train, val


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


def pad_id(tok) -> int:
    """The id right-padded rows are filled with: the tokenizer's pad, else EOS, else 0 (any id would do: real
    tokens never attend to pads after them and pad targets are ignored)."""
    pad = tok.role_token("pad") or tok.role_token("eos")
    return tok.special_tokens[pad] if pad is not None else 0


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
