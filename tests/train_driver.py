"""A tiny pretraining run on synthetic tokens, for the resume and torchrun tests.

usage: python tests/train_driver.py OUT_DIR [KEY=VALUE ...]   (TrainConfig overrides)
       LMFORGE_TEST_KILL_AT=K  -> the process SIGKILLs itself while building step K's batch
"""
import os
import signal
import sys

import numpy as np
import torch

from lmforge.config import build, parse_overrides
from lmforge.model.config import get_preset
from lmforge.model.transformer import Transformer
from lmforge.train.pretrain import PretrainTask
from lmforge.train.trainer import TrainConfig, train

VOCAB, BOS = 64, 63


def synthetic_stream(n_docs: int, seed: int) -> np.ndarray:
    """Documents that follow a fixed successor rule with 10% noise, each starting with BOS: quickly learnable."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        tok = int(rng.integers(0, 60))
        doc = []
        for _ in range(int(rng.integers(20, 90))):
            doc.append(tok)
            tok = (tok * 7 + 3) % 60 if rng.random() > 0.1 else int(rng.integers(0, 60))
        out += [BOS, *doc]
    return np.array(out, dtype=np.uint16)


class KillingTask(PretrainTask):
    def batch(self, step, micro):
        if step == int(os.environ.get("LMFORGE_TEST_KILL_AT", -1)):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().batch(step, micro)


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    values = {"out_dir": out, "max_steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 5,
              "precision": "fp32", "progress": False, "log_every": 1, "threads": 1, "seed": 0}
    values.update(parse_overrides(overrides))
    cfg = build(TrainConfig, values)
    torch.manual_seed(cfg.seed)
    mcfg = get_preset("tiny", vocab_size=VOCAB, n_layer=2, d_model=64, n_head=4, n_kv_heads=2, max_seq_len=32)
    model = Transformer(mcfg)
    train_tokens, val_tokens = synthetic_stream(200, 1), synthetic_stream(20, 2)
    token_bytes = np.ones(VOCAB, dtype=np.int64)
    token_bytes[BOS] = 0
    task = KillingTask(train_tokens, val_tokens, seq_len=32, batch_size=cfg.batch_size, bos_id=BOS,
                       token_bytes=token_bytes, seed=cfg.seed, mode=os.environ.get("LMFORGE_TEST_MODE", "packed"),
                       eval_tokens=512, grad_accum=cfg.grad_accum, progress=False)
    train(model, task, cfg, model_config=mcfg.to_dict())


if __name__ == "__main__":
    main()
