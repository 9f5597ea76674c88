"""End to end through the CLI: quickstart on a small built-in corpus, then eval bpb / generate on its checkpoint."""
import json

import pytest

from lmforge.cli import main

TINY = ["sources=[python-docs]", "tokenizer.vocab_size=400", "markov_orders=[1,2]",
        "pretrain.seq_len=64", "pretrain.eval_tokens=2048", "pretrain.sample_tokens=8",
        "pretrain.model.preset=tiny", "pretrain.model.overrides={d_model: 64, n_head: 4, n_kv_heads: 2}",
        "pretrain.train.max_time=null", "pretrain.train.max_steps=40", "pretrain.train.batch_size=8",
        "pretrain.train.log_every=10", "pretrain.train.eval_every=20", "pretrain.train.save_every=0",
        "pretrain.train.threads=1"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    assert main(["quickstart", "--out", str(out), *TINY]) == 0
    return out


def test_quickstart_writes_every_stage_and_a_report(quickstart_run, capsys):
    out = quickstart_run
    for path in ("tokenizer/tokenizer.model", "data/train.bin", "data/meta.json", "pretrain/checkpoint/model.safetensors",
                 "pretrain/metrics.jsonl", "pretrain/loss.png", "report.md", "summary.json"):
        assert (out / path).exists(), path
    summary = json.loads((out / "summary.json").read_text())
    assert [r["order"] for r in summary["markov"]] == [1, 2]
    p = summary["pretrain"]
    assert p["step"] == 40 and 0 < p["val_bpb"] < 10
    report = (out / "report.md").read_text()
    assert "Markov order 2" in report and "Transformer" in report and "loss.png" in report
    assert len(summary["samples"]) == 2


def test_eval_bpb_matches_the_training_runs_final_eval(quickstart_run, capsys):
    out = quickstart_run
    assert main(["eval", "bpb", "--checkpoint", str(out / "pretrain"), "--data", str(out / "data"),
                 "--seq-len", "64"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    bpb = float(line.split()[1])
    summary = json.loads((out / "summary.json").read_text())
    # same split, same windows; training evaluated under autocast, so allow bf16 noise
    assert bpb == pytest.approx(summary["pretrain"]["val_bpb"], rel=0.02)
    assert "warning" not in line  # the scored targets cover exactly the bytes meta.json counts


def test_pretrain_cli_resume_and_errors(quickstart_run, tmp_path, capsys):
    data = quickstart_run / "data"
    args = ["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "seq_len=64", "model.preset=tiny",
            "train.max_steps=6", "train.batch_size=4", "train.progress=false", "train.threads=1"]
    assert main(args) == 0
    assert main(args[:-4] + ["train.max_steps=9", "train.batch_size=4", "train.progress=false",
                             "train.threads=1", "--resume"]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 9
    capsys.readouterr()
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "train.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main(["pretrain", "--data", str(data), "train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["eval", "bpb", "--checkpoint", str(tmp_path / "missing"), "--data", str(data)]) == 2
    assert "missing" in capsys.readouterr().err


def test_shipped_recipes_validate():
    from pathlib import Path
    from lmforge.config import load_config
    from lmforge.model.config import get_preset
    from lmforge.quickstart import QuickstartConfig, default_recipe
    from lmforge.stages.pretrain import PretrainConfig
    q = load_config(QuickstartConfig, default_recipe())
    get_preset(q.pretrain.model.preset, **q.pretrain.model.overrides)
    g = load_config(PretrainConfig, Path(default_recipe()).with_name("gpu-124m.yaml"))
    get_preset(g.model.preset)
    assert g.train.compile and g.seq_len == 1024
