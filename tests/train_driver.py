"""A tiny pretraining run on synthetic tokens, for the resume and torchrun tests.

usage: python tests/train_driver.py OUT_DIR [KEY=VALUE ...]
       KEY=VALUE: a TrainConfig field, model.FIELD (a ModelConfig field, e.g. model.dropout=0.1), or mfu=true
       (pass flops_per_token, so the trainer measures peak FLOP/s as a real pretraining run does), or
       base=CHECKPOINT (start from its weights: a LoRA run, lora.rank=R, needs a base to refer to)
       LMFORGE_TEST_KILL_AT=K  -> the process SIGKILLs itself while building step K's batch
"""
import os
import signal
import subprocess
import sys

import numpy as np
import torch

from lmforge import checkpoint as ckpt
from lmforge.config import build, parse_overrides
from lmforge.data.synthetic import BOS, VOCAB, successor_stream
from lmforge.model.config import get_preset
from lmforge.model.transformer import Transformer
from lmforge.train.metrics import read_metrics
from lmforge.stages.pretrain import PretrainTask
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train

def run_driver(out, *overrides, env=None):
    """Run this script in a fresh single-threaded process (what the resume and torchrun tests compare)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, __file__, str(out), *overrides], env=e, capture_output=True, text=True)


def assert_identical_runs(a_dir, b_dir):
    """Same final weights bit for bit, and the same logged loss at every step."""
    from safetensors.torch import load_file
    a = load_file(str(a_dir / "checkpoint" / "model.safetensors"))
    b = load_file(str(b_dir / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [r["loss"] for r in read_metrics(a_dir / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(b_dir / "metrics.jsonl") if "loss" in r]
    assert la == lb  # the resumed log has each step once, with identical losses


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
    model_overrides, mfu, base = values.pop("model", {}), values.pop("mfu", False), values.pop("base", None)
    cfg = build(TrainConfig, values)
    torch.manual_seed(cfg.seed)
    mcfg = get_preset("tiny", **{"vocab_size": VOCAB, "n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_heads": 2,
                                 "max_seq_len": 32, **model_overrides})
    model = Transformer(mcfg)
    if base:
        ckpt.load(base, model)
    train_tokens, val_tokens = successor_stream(200, 1), successor_stream(20, 2)
    token_bytes = np.ones(VOCAB, dtype=np.int64)
    token_bytes[BOS] = 0
    task = KillingTask(train_tokens, val_tokens, seq_len=32, batch_size=cfg.batch_size, bos_id=BOS,
                       token_bytes=token_bytes, seed=cfg.seed, mode=os.environ.get("LMFORGE_TEST_MODE", "packed"),
                       eval_tokens=512, grad_accum=cfg.grad_accum, progress=False)
    train(model, task, cfg, checkpoint=CheckpointSpec(model_config=mcfg.to_dict()),
          flops_per_token=model.flops_per_token(32) if mfu else None)


if __name__ == "__main__":
    main()
