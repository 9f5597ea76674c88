"""The one training loop: a second loss, loss decreases, exact resume after SIGKILL (dropout, accumulation, AdamW and
Muon), atomic checkpoints, torchrun. The Task hooks themselves: tests/test_task.py."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import checkpoint as ckpt
from lmforge.errors import CheckpointError, ConfigError, WriteError
from lmforge.runtime import measured_peak_flops
from lmforge.train.metrics import read_metrics
from train_driver import assert_identical_runs, run_driver  # tests/ is on sys.path under pytest
from lmforge.train.task import Task
from lmforge.train.trainer import CheckpointSpec, TrainConfig, lr_at, train

DRIVER = str(Path(__file__).with_name("train_driver.py"))


class RegressionTask(Task):
    """A different stage in miniature: fit y = x·w with an MSE loss through the same loop."""

    def __init__(self, dim=8):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(dim, 1, generator=g)
        self.dim = dim

    def batch(self, step, micro):
        g = torch.Generator().manual_seed(step * 1000 + micro)
        x = torch.randn(32, self.dim, generator=g)
        return x, x @ self.w

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y), {"tokens": len(x), "mse": 0.0}

    def evaluate(self, model, final=False):
        x, y = self.batch(10**6, 0)
        return {"val_mse": torch.nn.functional.mse_loss(model(x), y).item()}


def test_second_loss_runs_through_the_same_loop(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=150, lr=0.05, warmup_steps=5, weight_decay=0.0,
                      precision="fp32", progress=False, log_every=10)
    summary = train(model, RegressionTask(), cfg, checkpoint=CheckpointSpec(model_config={"kind": "linear"}))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.01 * losses[0]
    assert summary["val_mse"] < 1e-2
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=100)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(0.1)            # warmup is linear from lr/warmup
    assert lr_at(cfg, 9, 0.09) == pytest.approx(1.0)
    assert lr_at(cfg, 50, 1.0) == pytest.approx(0.1)           # cosine ends at min_lr
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.55)
    wsd = TrainConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0, max_steps=10)
    assert lr_at(wsd, 5, 0.5) == 1.0 and lr_at(wsd, 9, 0.9) == pytest.approx(0.5)


def test_pretrain_loss_decreases(tmp_path):
    r = run_driver(tmp_path, "max_steps=60", "lr=1e-2", "log_every=5")
    assert r.returncode == 0, r.stderr
    rows = [x for x in read_metrics(tmp_path / "metrics.jsonl") if "loss" in x]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, (rows[0], rows[-1])   # ln(64)=4.16 → well below
    final = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert final["val_loss"] < 3.5


# Every pair of (optimizer, dropout, accumulation) values meets in one of these four runs. With dropout every step
# draws from the global RNG; mfu=true makes the trainer measure peak FLOP/s (random matrices) on start, as real
# pretraining does: nothing the trainer runs before the first resumed step may shift that random stream.
RESUME_CASES = [("adamw", 0.0, 1, False), ("adamw", 0.1, 2, False), ("muon", 0.0, 2, False), ("muon", 0.1, 1, True)]


@pytest.mark.parametrize("optimizer,dropout,grad_accum,mfu", RESUME_CASES,
                         ids=[f"{o}-dropout{p}-accum{a}" for o, p, a, _ in RESUME_CASES])
def test_kill_and_resume_is_bitwise_identical(tmp_path, optimizer, dropout, grad_accum, mfu):
    env = {"LMFORGE_TEST_MODE": "packed"}
    run = ["max_steps=16", f"optimizer={optimizer}", f"model.dropout={dropout}", f"grad_accum={grad_accum}",
           f"mfu={str(mfu).lower()}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run_driver(full, *run, env=env)
    assert r.returncode == 0, r.stderr
    r = run_driver(killed, *run, "save_every=8", env={**env, "LMFORGE_TEST_KILL_AT": "11"})
    assert r.returncode == -9, r.stderr  # SIGKILL mid-run, three steps after the step-8 checkpoint
    state = json.loads((killed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 8
    r = run_driver(killed, *run, "save_every=8", "resume=true", env=env)
    assert r.returncode == 0, r.stderr
    assert_identical_runs(full, killed)
    if optimizer == "muon":  # the momentum buffers were saved and reloaded too (a fresh Muon would have diverged)
        opt = torch.load(killed / "checkpoint" / "optimizer.pt", weights_only=True)
        assert set(opt) == {"muon", "adamw"} and len(opt["muon"]["state"]) == 14


def test_measuring_peak_flops_leaves_the_global_rng_alone():
    """The trainer measures before the first step; drawing from the global RNG there would shift dropout."""
    before = torch.get_rng_state()
    # a precision string of its own, so the measurement runs rather than answering from the cache
    assert measured_peak_flops(torch.device("cpu"), "fp32-rng-test") > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_interrupted_checkpoint_write_keeps_last_good(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    good = ckpt.save(tmp_path / "checkpoint", model=model, model_config={"v": 1})
    before = load_file(str(good / "model.safetensors"))

    def crash(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(ckpt, "save_file", crash)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(WriteError, match="disk full"):
        ckpt.save(tmp_path / "checkpoint", model=model, model_config={"v": 2})
    assert ckpt.read_config(tmp_path / "checkpoint")["model"] == {"v": 1}
    after = load_file(str(ckpt.resolve(tmp_path) / "model.safetensors"))
    assert torch.equal(before["weight"], after["weight"])
    # a crash between the two renames leaves only checkpoint.old: still found
    shutil.move(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert ckpt.resolve(tmp_path / "checkpoint") == tmp_path / "checkpoint.old"


def test_torchrun_two_processes_match_one_process_with_accumulation(tmp_path):
    """DDP and FSDP2 (gloo, 2 processes x 1 micro-batch) follow 1 process x 2 micro-batches."""
    one = tmp_path / "one"
    r = run_driver(one, "max_steps=12", "grad_accum=2")
    assert r.returncode == 0, r.stderr
    la = [r["loss"] for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    wa = load_file(str(one / "checkpoint" / "model.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("ddp", []), ("fsdp", ["fsdp=true"])):
        two = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            DRIVER, str(two), "max_steps=12", "grad_accum=2", *extra],
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        lb = [r["loss"] for r in read_metrics(two / "metrics.jsonl") if "loss" in r]
        assert len(la) == len(lb) == 12
        # same batches and the same averaged gradient; only float summation order may differ (gloo all-reduce)
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4, (name, list(zip(la, lb)))
        wb = load_file(str(two / "checkpoint" / "model.safetensors"))  # rank 0 wrote full, unsharded weights
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4, name


def test_a_second_writer_of_a_run_directory_is_refused_with_the_holders_pid(tmp_path):
    # a real process holds the run directory (as a running `pretrain` does); ours must not write into it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lmforge.io import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = TrainConfig(out_dir=str(tmp_path), max_steps=2, progress=False, precision="fp32")
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            train(torch.nn.Linear(8, 1), RegressionTask(), cfg, checkpoint=CheckpointSpec(model_config={}))
        assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the OS released the killed holder's lock: the directory is usable again
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=2, progress=False, precision="fp32")
    train(torch.nn.Linear(8, 1), RegressionTask(), cfg, checkpoint=CheckpointSpec(model_config={}))
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def test_resume_without_a_checkpoint_is_an_error_and_keeps_the_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=2, progress=False, precision="fp32", resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(torch.nn.Linear(8, 1), RegressionTask(), cfg, checkpoint=CheckpointSpec(model_config={}))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


@pytest.mark.parametrize("field", ["max_steps", "max_tokens", "max_time"])
def test_budgets_must_be_positive(field):
    with pytest.raises(ConfigError, match="must be > 0") as e:
        TrainConfig(**{field: -1})
    assert e.value.field == field
