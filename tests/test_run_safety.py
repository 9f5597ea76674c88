"""A run directory survives anything that can happen to a process: a second writer is refused by the real CLI, and
a kill at any file operation of a checkpoint save leaves a run that --resume continues from the last complete
checkpoint, ending exactly where an uninterrupted run ends."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmforge import checkpoint as ckpt
from lmforge.data.corpus import Corpus
from lmforge.data.shards import prepare_shards
from lmforge.train.metrics import read_metrics
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.trainer import CheckpointSpec, TrainConfig, train
from test_trainer import RegressionTask   # tests/ is on sys.path under pytest

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"


class Killed(BaseException):
    """The process dies here (not an Exception: no handler in the code under test may catch it)."""


def _run(out, steps, resume=False):
    torch.manual_seed(0)
    cfg = TrainConfig(out_dir=str(out), max_steps=steps, save_every=2, eval_every=0, progress=False,
                      precision="fp32", resume=resume, log_every=1)
    return train(torch.nn.Linear(8, 1), RegressionTask(), cfg, checkpoint=CheckpointSpec(model_config={}))


def test_a_kill_at_any_file_operation_of_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, monkeypatch):
    ops: list[str] = []
    kill_at = [0]

    def counted(name, fn):
        def op(*a, **k):
            ops.append(name)
            if len(ops) == kill_at[0]:
                raise Killed(name)
            return fn(*a, **k)
        return op
    # every file operation a save makes: writes of tensors and optimizer state, fsyncs, renames, removals
    for mod, name in ((os, "replace"), (os, "rename"), (os, "fsync"), (os, "unlink"), (shutil, "rmtree"),
                      (ckpt, "save_file"), (torch, "save")):
        monkeypatch.setattr(mod, name, counted(f"{getattr(mod, '__name__', mod)}.{name}", getattr(mod, name)))

    _run(tmp_path / "two", 2)
    first = len(ops)                                   # the ops of a run whose only save is at step 2
    ops.clear()
    _run(tmp_path / "ref", 6)
    ref = ckpt.load_trainer_state(tmp_path / "ref" / "checkpoint")[0]
    want = load_file(str(tmp_path / "ref" / "checkpoint" / "model.safetensors"))
    ops.clear()
    _run(tmp_path / "four", 4)
    second = range(first + 1, len(ops) + 1)            # the ops of the save at step 4
    assert len(second) >= 5, ops
    for k in second:
        out = tmp_path / f"kill{k}"
        ops.clear()
        kill_at[0] = k
        with pytest.raises(Killed):
            _run(out, 4)
        kill_at[0] = 0
        _run(out, 6, resume=True)                      # continues; never from scratch
        steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        assert steps.count(1) == 1, (k, steps)
        got = load_file(str(out / "checkpoint" / "model.safetensors"))
        assert all(torch.equal(got[n], want[n]) for n in want), f"kill at op {k} ({ops[k - 1]})"
        assert ckpt.load_trainer_state(out / "checkpoint")[0]["step"] == ref["step"] == 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    (d / "corpus.txt").write_text(TEXT * 400, encoding="utf-8")
    tok = Tokenizer.train([TEXT * 40], vocab_size=272 + 40, progress=False)
    prepare_shards(Corpus([str(d / "corpus.txt")]), tok, d / "data", val_fraction=0.1, seed=0, progress=False)
    tok.save(d / "data" / "tokenizer")
    return d / "data"


def test_two_pretrain_processes_on_one_out(tmp_path, shards):
    """The second `lmforge pretrain` on a running run's --out exits 2 in one line naming the holder; the first
    finishes untouched: one seed's steps, each once, and a complete checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--data", str(shards), "--out", str(out),
           "model.preset=tiny", "model.overrides={max_seq_len: 32}", "seq_len=32", "train.batch_size=4",
           "train.max_steps=600", "train.log_every=1", "train.eval_every=0", "train.save_every=200",
           "train.precision=fp32", "train.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():    # the first run holds the lock once it logs
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run(cmd + ["train.seed=1"], env=env, capture_output=True, text=True)
        assert first.poll() is None, "the first run ended before the second started: make it longer"
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "Traceback" not in second.stderr
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 601))
    assert ckpt.load_trainer_state(out / "checkpoint")[0]["step"] == 600
