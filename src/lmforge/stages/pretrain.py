"""Pretraining: next-token prediction on token shards, run through the one trainer loop.

`PretrainTask` is the whole of what makes this stage pretraining: how a batch is cut from the shards; the loss
is the model's own next-token cross-entropy (`model(x, targets=y, loss_mask=mask)`), so a masked-loss stage
such as SFT is this task with a mask in its batches. Two batch modes, both stateless functions of (seed, step, micro-batch), so a resumed run sees
exactly the batches the uninterrupted run would have seen:
  random  — nanoGPT style: B windows of T+1 tokens at random offsets of train.bin.
  packed  — every token once per epoch: the documents (each starts with BOS) are shuffled per epoch with the
            seed, laid end to end, and cut into consecutive rows of T+1 tokens (rows overlap by one token).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.eval.bpb import evaluate_bpb, token_byte_lengths
from lmforge.train.task import Task
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train


class PretrainTask(Task):
    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 bos_id: int, token_bytes: np.ndarray, seed: int = 0, mode: str = "random",
                 eval_tokens: int | None = 65536, eval_batch_size: int = 16, device="cpu", eval_stride=None,
                 sample_fn=None, grad_accum: int = 1, progress: bool = True):
        if len(train_tokens) < seq_len + 2:
            raise DataError(f"train split has {len(train_tokens)} tokens, fewer than seq_len+2 = {seq_len + 2}")
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.T, self.B, self.seed, self.mode = seq_len, batch_size, seed, mode
        self.bos_id, self.token_bytes = bos_id, token_bytes
        self.eval_tokens, self.eval_batch_size, self.eval_stride = eval_tokens, eval_batch_size, eval_stride
        self.device, self.sample_fn, self.grad_accum = torch.device(device), sample_fn, grad_accum
        self.progress = progress
        if mode == "packed":
            starts = np.flatnonzero(np.asarray(train_tokens) == bos_id)
            if len(starts) == 0 or starts[0] != 0:
                starts = np.concatenate([[0], starts])
            self.doc_starts = starts
            self.doc_lens = np.diff(np.append(starts, len(train_tokens)))
            self.rows_per_epoch = (len(train_tokens) - 1) // seq_len
            self._epoch, self._layout = -1, None
        elif mode != "random":
            raise ConfigError(f"{mode!r} is not one of random, packed", field="mode")

    # -- batches ------------------------------------------------------------------------------------------
    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(inputs, next-token targets, loss mask): pretraining weights every target, so no mask."""
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step, micro])
            starts = rng.integers(0, len(self.train_tokens) - self.T - 1, size=self.B)
            idx = starts[:, None] + np.arange(self.T + 1)[None, :]
        else:
            first_row = (step * self.grad_accum + micro) * self.B
            idx = np.stack([self._packed_row(r) for r in range(first_row, first_row + self.B)])
        rows = torch.from_numpy(np.asarray(self.train_tokens[idx.ravel()], dtype=np.int64).reshape(idx.shape))
        rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:], None

    def _packed_row(self, r: int) -> np.ndarray:
        epoch, r = divmod(r, self.rows_per_epoch)
        if epoch != self._epoch:  # lay out this epoch's shuffled documents
            perm = np.random.default_rng([self.seed, 7919, epoch]).permutation(len(self.doc_starts))
            self._layout = (self.doc_starts[perm], np.concatenate([[0], np.cumsum(self.doc_lens[perm])]))
            self._epoch = epoch
        starts, cum = self._layout
        pos = r * self.T + np.arange(self.T + 1)               # positions in the virtual shuffled stream
        doc = np.searchsorted(cum, pos, side="right") - 1
        return starts[doc] + (pos - cum[doc])

    # -- loss / eval / samples ---------------------------------------------------------------------------
    def loss(self, model, batch):
        x, y, mask = batch
        _, loss = model(x, targets=y, loss_mask=mask, return_logits=False)   # fp32 cross-entropy; targets -1 and mask 0 are ignored
        return loss, {"tokens": y.numel()}               # tokens processed (throughput, max_tokens)

    def evaluate(self, model, final: bool = False) -> dict:
        # periodic evals look at `eval_tokens` of val; the final one scores the whole split, also with the sliding
        # window when eval_stride is set (val_bpb stays the plain number, comparable across runs)
        res = evaluate_bpb(model, self.val_tokens, self.token_bytes, self.T, self.eval_batch_size,
                           max_tokens=None if final else self.eval_tokens, progress=final and self.progress, device=self.device)
        out = {"val_loss": res["loss"], "val_bpb": res["bpb"]}
        if final and self.eval_stride and self.eval_stride < self.T:
            slid = evaluate_bpb(model, self.val_tokens, self.token_bytes, self.T, self.eval_batch_size,
                                progress=self.progress, device=self.device, stride=self.eval_stride)
            out.update(val_loss_sliding=slid["loss"], val_bpb_sliding=slid["bpb"])
        return out

    def samples(self, model) -> list[str]:
        return self.sample_fn(model) if self.sample_fn else []

    def state_dict(self):
        return {"mode": self.mode, "seed": self.seed}  # batches are a pure function of (seed, step)

    def load_state_dict(self, d):
        if d.get("seed") != self.seed or d.get("mode") != self.mode:
            raise ConfigError("resuming with a different data seed/mode would not continue the same run",
                              field="seed")


# what `lmforge generate` uses for this checkpoint unless flags say otherwise (a base model: sample, don't argmax)
GENERATION_DEFAULTS = {"temperature": 0.8, "top_k": 50, "max_new_tokens": 256}


# -- the `lmforge pretrain` verb --------------------------------------------------------------------------

@dataclass
class ModelSection:
    preset: str = "cpu-small"
    overrides: dict = field(default_factory=dict)   # any ModelConfig field, e.g. {n_layer: 4}


@dataclass
class PretrainConfig:
    data: str = ""                       # token shards directory (lmforge data prepare)
    tokenizer: str = ""                  # tokenizer directory (default: DATA/tokenizer)
    seq_len: int = 256
    mode: Literal["random", "packed"] = "packed"
    eval_tokens: int = 65536             # periodic eval on this many val tokens; the final eval uses all of val
    eval_batch_size: int = 16
    eval_stride: int | None = None       # final eval also with a sliding window of this stride (every target then
                                         # sees >= seq_len - stride tokens of context; see eval/bpb.py)
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 48
    init_from: str = ""                  # start from this checkpoint's weights
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError("must be ≥ 2", field="seq_len")


def build_model(pcfg: PretrainConfig, vocab_size: int):
    from lmforge.model.config import get_preset
    from lmforge.model.transformer import Transformer
    over = {"vocab_size": vocab_size, "max_seq_len": pcfg.seq_len, **pcfg.model.overrides}
    mcfg = get_preset(pcfg.model.preset, **over)
    if mcfg.vocab_size < vocab_size:   # a larger one is fine: padding ids the sampler never draws
        raise ConfigError(f"{mcfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens",
                          field="model.overrides.vocab_size")
    return Transformer(mcfg), mcfg


def run_pretrain(pcfg: PretrainConfig) -> dict:
    from lmforge.data.shards import load_shards
    from lmforge.tokenizer.tokenizer import Tokenizer
    from lmforge import checkpoint as ckpt

    if not pcfg.data:
        raise ConfigError("no token shards given (data=DIR, made by `lmforge data prepare`)", field="data")
    train_tokens, val_tokens, meta = load_shards(pcfg.data)
    tok_dir = pcfg.tokenizer or str(Path(pcfg.data) / "tokenizer")
    tokenizer = Tokenizer.load(tok_dir)
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash()):
        raise DataError(f"shards were made with another tokenizer than {tok_dir}", file=str(Path(pcfg.data) / "meta.json"),
                        field="tokenizer_hash")
    cfg = pcfg.train
    torch.manual_seed(cfg.seed)
    model, mcfg = build_model(pcfg, tokenizer.vocab_size)
    if pcfg.init_from:
        ckpt.load(pcfg.init_from, model)
    from lmforge.runtime import detect_device
    device = detect_device(cfg.device)
    sample_fn = _make_sampler(tokenizer, pcfg) if pcfg.sample_prompts else None
    task = PretrainTask(train_tokens, val_tokens, seq_len=pcfg.seq_len, batch_size=cfg.batch_size,
                        bos_id=tokenizer.bos_id, token_bytes=token_byte_lengths(tokenizer), seed=cfg.seed,
                        mode=pcfg.mode, eval_tokens=pcfg.eval_tokens, eval_batch_size=pcfg.eval_batch_size,
                        eval_stride=pcfg.eval_stride,
                        device=device, sample_fn=sample_fn, grad_accum=cfg.grad_accum,
                        progress=cfg.progress)
    n = model.num_params()
    fpt = model.flops_per_token(pcfg.seq_len)
    t0 = time.time()
    spec = CheckpointSpec(model_config=mcfg.to_dict(), tokenizer=tokenizer, generation_config=GENERATION_DEFAULTS,
                          extra={"stage": "pretrain", "data": str(pcfg.data)})
    summary = train(model, task, cfg, checkpoint=spec, flops_per_token=fpt)
    summary.update(params=n, wall_time=time.time() - t0)
    if int(os.environ.get("RANK", 0)) == 0:
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _make_sampler(tokenizer, pcfg: PretrainConfig):
    def sample(model):
        from lmforge.infer.engine import generate
        from lmforge.infer.sampling import SamplingParams
        params = SamplingParams(temperature=0.8, top_k=50, max_tokens=pcfg.sample_tokens, seed=0)
        return [p + generate(model, tokenizer, p, params).text for p in pcfg.sample_prompts]
    return sample
