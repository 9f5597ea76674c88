"""End to end through the CLI: quickstart on a small built-in corpus, then eval bpb / generate on its checkpoint."""
import json

import jsonschema
import pytest

from lmforge.cli import main
from lmforge.data.arithmetic import CALCULATOR_TOOL
from lmforge.infer.tools import CALCULATOR as calculator

# seq_len 320: a tool-use conversation (the calculator's declaration, the call, its result) takes ~310 tokens with
# this small vocabulary
TINY = ["sources=[python-docs]", "tokenizer.vocab_size=400", "markov_orders=[1,2]",
        "pretrain.seq_len=384", "pretrain.eval_tokens=2048", "pretrain.sample_tokens=8", "pretrain.eval_stride=null",
        "pretrain.model.preset=tiny", "pretrain.model.overrides={d_model: 64, n_head: 4, n_kv_heads: 2}",
        "pretrain.train.max_time=null", "pretrain.train.max_steps=40", "pretrain.train.batch_size=2",
        "pretrain.train.log_every=10", "pretrain.train.eval_every=20", "pretrain.train.save_every=0",
        "pretrain.train.threads=1",
        # mostly tool demonstrations, so that this tiny model learns to open a call in a few steps
        "sft.data=[arithmetic:digits=1, 'arithmetic:digits=3,tools=true,turns=2']", "sft.source_n=16",
        "sft.source_counts={'arithmetic:digits=3,tools=true,turns=2': 24}", "sft.val_n=4", "sft.max_val=8",
        "sft.sample_n=0", "sft.train.max_steps=30", "sft.train.batch_size=8", "sft.train.lr=2e-2",
        "sft.train.log_every=10", "sft.train.threads=1",
        "chat_eval.task=arithmetic:digits=1", "chat_eval.tool_task='arithmetic:digits=2,tools=true'",
        "chat_eval.n=8", "chat_eval.tool_n=3", "chat_eval.max_tokens=6", "chat_eval.tool_max_tokens=64",
        "chat_eval.samples=1", "chat_eval.sample_tokens=64",
        "grpo.train.max_steps=3", "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=4",
        "grpo.train.batch_size=4", "grpo.train.threads=1",
        "rag.books=[Ruth]", "rag.n=10", "rag.k=2", "rag.chunk_tokens=24"]


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
    # retrieval: Ruth indexed without 10 held-out verses, the cloze table, a cited answer whose sources are chunks
    assert (out / "rag.sqlite").exists()
    assert "## Retrieval with citations" in report and "| hybrid |" in report and "**Q:** Who built the ark" in report
    assert "- [1] " in summary["rag"] and "Ruth " in summary["rag"]


def test_quickstart_fine_tunes_for_chat_and_scores_it(quickstart_run):
    """SFT of the pretrained model on the mix (per-source counts), chat samples of held-out prompts, the task
    table: base and SFT on the same problems, the SFT model without and with the calculator, every call checked."""
    out = quickstart_run
    summary = json.loads((out / "summary.json").read_text())
    f = summary["sft"]
    assert f["step"] == 30 and f["train_conversations"] == 16 + 24 and 0 < f["assistant_fraction"] < 1
    assert (out / "sft" / "checkpoint" / "model.safetensors").exists()
    cfg = json.loads((out / "sft" / "checkpoint" / "config.json").read_text())
    assert cfg["stage"] == "sft" and cfg["base"].endswith("pretrain/checkpoint")
    # one held-out prompt per source, the tool source's with the calculator offered
    chats = summary["chat_samples"]
    assert [c["source"] for c in chats] == ["arithmetic:digits=1", "arithmetic:digits=3,tools=true,turns=2"]
    assert all(c["transcript"].startswith("user: What is ") for c in chats)
    te = summary["task_eval"]
    evals = {k: json.loads((out / "eval" / f"{k}.json").read_text())
             for k in ("base", "sft", "grpo", "base_tools", "sft_no_tools", "sft_tools")}
    assert [p["prompt"] for p in evals["base"]["problems"]] == [p["prompt"] for p in evals["sft"]["problems"]] == \
        [p["prompt"] for p in evals["grpo"]["problems"]]
    # GRPO from the SFT checkpoint on the direct task, rewarded by its verifier
    g = summary["grpo"]
    assert g["step"] == 3 and "reward" in g and (out / "grpo" / "checkpoint" / "model.safetensors").exists()
    gcfg = json.loads((out / "grpo" / "checkpoint" / "config.json").read_text())
    assert gcfg["stage"] == "grpo" and gcfg["task"] == "arithmetic:digits=1" and gcfg["reward"] == ["verifier"]
    assert [p["prompt"] for p in evals["sft_no_tools"]["problems"]] == \
        [p["prompt"] for p in evals["sft_tools"]["problems"]] == [p["prompt"] for p in evals["base_tools"]["problems"]]
    assert evals["base_tools"]["tools"] == ["calculator"]
    assert te["base"]["n"] == 8 and te["sft_tools"]["n"] == 3
    assert evals["sft_tools"]["tools"] == ["calculator"] and evals["sft_no_tools"]["tools"] is None
    for k, e in evals.items():
        assert te[k]["accuracy"] == sum(p["correct"] for p in e["problems"]) / e["n"]
    calls = [c for p in evals["sft_tools"]["problems"] for c in p["calls"]]
    assert te["tool_calls"]["calls"] == len(calls) == sum(p["tool_calls"] for p in evals["sft_tools"]["problems"])
    assert len(calls) > 0 and te["tool_calls"]["valid"] == len(calls)   # the grammar makes every call valid
    for c in calls:     # checked again with the reference validator; the result is the calculator's
        jsonschema.validate(c["arguments"], CALCULATOR_TOOL["function"]["parameters"])
        if not c["result"].startswith("error:"):
            assert c["result"] == calculator.run(c["arguments"])
    assert te["tool_calls"]["tool_errors"] == sum(c["result"].startswith("error:") for c in calls)
    assert "<|tool_call|>" in chats[1]["transcript"] and "\ntool: " in chats[1]["transcript"]
    report = (out / "report.md").read_text()
    assert "## Chat: supervised fine-tuning" in report and "Chat samples" in report
    assert "Reinforcement learning: GRPO" in report
    for label in ("| base (pretrained) | arithmetic:digits=1 | 8 |", "| SFT | arithmetic:digits=1 | 8 |",
                  "| SFT + GRPO | arithmetic:digits=1 | 8 |",
                  "| base (pretrained) + tools | arithmetic:digits=2,tools=true, tools: calculator | 3 |",
                  "| SFT, no tools |", "| SFT + tools | arithmetic:digits=2,tools=true, tools: calculator | 3 |"):
        assert label in report, label


def test_eval_task_reproduces_the_quickstart_table(quickstart_run, tmp_path, capsys):
    """`lmforge eval task` on the SFT checkpoint answers the quickstart's held-out problems identically."""
    out = quickstart_run
    assert main(["eval", "task", "--checkpoint", str(out / "sft"), "--task", "arithmetic:digits=1", "--n", "8",
                 "--max-tokens", "6", "--out", str(tmp_path / "t.json")]) == 0
    mine = json.loads((tmp_path / "t.json").read_text())
    theirs = json.loads((out / "eval" / "sft.json").read_text())
    assert [(p["prompt"], p["response"]) for p in mine["problems"]] == \
        [(p["prompt"], p["response"]) for p in theirs["problems"]]
    assert f"{100 * theirs['greedy']['accuracy']:.1f}%" in capsys.readouterr().out


def test_quickstart_refuses_a_context_too_short_for_tool_use(tmp_path, capsys):
    """The tool conversations must fit pretraining's context: said right after the tokenizer, not after
    pretraining; a task without tools as the tool task is refused before any work."""
    args = ["quickstart", "--out", str(tmp_path / "qs"), *TINY]
    assert main(args + ["pretrain.seq_len=64"]) == 2
    err = capsys.readouterr().err        # the tokenizer's progress bars, then the one-line error
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "pretrain.seq_len" in last and "tools=true" in last
    assert not (tmp_path / "qs" / "pretrain").exists()
    assert main(args + ["chat_eval.tool_task=arithmetic:digits=3"]) == 2
    assert "declares no tools" in capsys.readouterr().err


def test_eval_bpb_matches_the_training_runs_final_eval(quickstart_run, capsys):
    out = quickstart_run
    assert main(["eval", "bpb", "--checkpoint", str(out / "pretrain"), "--data", str(out / "data"),
                 "--seq-len", "320"]) == 0
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


def test_quickstart_without_the_rag_extra_stops_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "apsw" else real(name, *a))
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rag_step" in err[0] and "lmforge" in err[0] and ".[rag]" in err[0]
    assert not (out / "tokenizer").exists()
