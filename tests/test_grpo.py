"""GRPO end to end on tiny models: learning from a reward function, rollouts from the current weights, the
verifier of a task family, kill-and-resume bit for bit, and broken reward functions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmforge import checkpoint
from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.bpe import GPT4_PATTERN
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# a reward a tiny random model can learn: the share of ASCII characters in the reply (random bytes: about half)
REWARDS = textwrap.dedent("""
    import math, os, signal
    calls = 0

    def ascii_share(prompts, completions, **columns):
        global calls
        calls += 1
        if calls == int(os.environ.get("KILL_AT_CALL", "0")):
            os.kill(os.getpid(), signal.SIGKILL)
        return [sum(c.isascii() for c in t) / max(len(t), 1) for t in completions]

    def length_bonus(prompts, completions, target, **columns):
        return [1.0 if len(t) >= int(x) else 0.0 for t, x in zip(completions, target)]

    def broken(prompts, completions, **columns):
        raise KeyError("label")

    def nan(prompts, completions, **columns):
        return [math.nan] * len(completions)

    def short(prompts, completions, **columns):
        return [1.0]
""")

FAST = ["train.threads=1", "train.precision=fp32", "train.progress=false", "train.log_every=1", "val_n=0",
        "group_size=4", "prompts_per_step=4", "max_new_tokens=6", "train.eval_every=0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    tok = Tokenizer([], GPT4_PATTERN)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=48,
                                    max_seq_len=64, init_std=0.1))
    checkpoint.save(d / "base", model=model, model_config=model.config.to_dict(), tokenizer=tok)
    (d / "rmod.py").write_text(REWARDS)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}?", "target": 3}) + "\n"
                                             for i in range(12)))
    return d


@pytest.fixture
def on_path(base, monkeypatch):
    monkeypatch.syspath_prepend(str(base))
    sys.modules.pop("rmod", None)


def grpo(base, out, reward, *overrides):
    return main(["grpo", "--checkpoint", str(base / "base"), "--prompts", str(base / "prompts.jsonl"),
                 "--out", str(out), "--reward", reward, *FAST, *overrides])


def test_the_reward_goes_up(base, tmp_path, on_path, capsys):
    out = tmp_path / "run"
    assert grpo(base, out, "rmod:ascii_share", "train.max_steps=80", "train.lr=1e-2") == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert all("clip_fraction" in r and "entropy" in r and "zero_std_groups" in r for r in rows)
    assert checkpoint.read_config(out)["stage"] == "grpo"
    assert "grpo: 80 steps" in capsys.readouterr().out


def test_several_reward_functions_weighted_with_columns(base, tmp_path, on_path):
    out = tmp_path / "run"
    assert grpo(base, out, "rmod:ascii_share,rmod:length_bonus", "reward_weights=[1.0,0.5]",
                "train.max_steps=2") == 0
    r = next(r for r in read_metrics(out / "metrics.jsonl") if "reward" in r)
    a, b = r["rewards/rmod:ascii_share"], r["rewards/rmod:length_bonus"]
    assert r["reward"] == pytest.approx(a + 0.5 * b, abs=1e-9)


def test_rollouts_use_the_current_weights(base, on_path):
    from lmforge.stages.grpo import GRPOConfig, GRPOTask
    from lmforge.stages.rewards import resolve_rewards
    from lmforge.data.preference import read_prompts
    import lmforge
    model, tok = lmforge.load(base / "base", device="cpu")
    cfg = GRPOConfig(prompts=str(base / "prompts.jsonl"), reward=["rmod:ascii_share"], group_size=4,
                     prompts_per_step=2, max_new_tokens=6, val_n=0)
    task = GRPOTask(cfg, tok, prompt_rows=read_prompts(cfg.prompts), device="cpu", seed=0,
                    reward_fns=resolve_rewards(cfg.reward, None))
    model.eval()
    task.setup(model, "cpu")
    with torch.no_grad():
        a = task._generate(model, 0).x.clone()
        again = task._generate(model, 0).x.clone()
        for p in model.parameters():             # an optimizer step would do this: same step, new weights
            p.add_(torch.randn_like(p) * 0.3)
        b = task._generate(model, 0).x.clone()
    assert torch.equal(a, again)                 # the same step samples the same completions
    assert not torch.equal(a, b)                 # ... unless the weights changed


def test_verifier_on_a_task_family(base, tmp_path):
    out = tmp_path / "run"
    rc = main(["grpo", "--checkpoint", str(base / "base"), "--task", "arithmetic:digits=1,ops=+", "--out",
               str(out), "--reward", "verifier", *FAST, "val_n=5", "train.max_steps=2", "train.eval_every=2"])
    assert rc == 0
    rows = list(read_metrics(out / "metrics.jsonl"))
    train_rows = [r for r in rows if "reward" in r]
    assert train_rows and all(0 <= r["accuracy"] <= 1 and r["reward"] == pytest.approx(r["accuracy"])
                              for r in train_rows)
    assert any("val_accuracy" in r for r in rows)


def run_cli(base, out, *extra, env=None):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(base), *sys.path]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmforge", "grpo", "--checkpoint", str(base / "base"), "--prompts",
                           str(base / "prompts.jsonl"), "--out", str(out), "--reward", "rmod:ascii_share", *FAST,
                           "train.lr=3e-3", "num_iterations=2", "beta=0.05", "train.save_every=3", *extra],
                          env=e, capture_output=True, text=True)


def test_kill_and_resume_is_bitwise_identical(base, tmp_path):
    """Killed inside a rollout (the reward function SIGKILLs the process), resumed from the last checkpoint —
    taken between the two iterations on one rollout batch — the run ends with the same weights."""
    from safetensors.torch import load_file
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = "train.max_steps=8"
    r = run_cli(base, full, steps)
    assert r.returncode == 0, r.stderr
    # rollouts at steps 0, 2, 4, 6 (two iterations each); checkpoints after steps 3 and 6. The 3rd reward call is
    # step 4's rollout: the last checkpoint then is step 3's, taken between the two iterations on step 2's batch
    r = run_cli(base, killed, steps, env={"KILL_AT_CALL": "3"})
    assert r.returncode == -9
    state = json.loads((killed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["task"]["rollout"]["step"] == 2
    r = run_cli(base, killed, steps, "train.resume=true")
    assert r.returncode == 0, r.stderr
    a = load_file(str(full / "checkpoint" / "model.safetensors"))
    b = load_file(str(killed / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fn, message", [("broken", "'rmod:broken' raised KeyError"),
                                         ("nan", "'rmod:nan' returned nan"),
                                         ("short", "returned 1 values for 16 completions")])
def test_a_broken_reward_function_is_named(base, tmp_path, on_path, capsys, fn, message):
    out = tmp_path / "run"
    assert grpo(base, out, f"rmod:{fn}", "train.max_steps=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "checkpoint").exists()


def test_bad_arguments(base, tmp_path, capsys):
    assert main(["grpo", "--checkpoint", str(base / "base"), "--out", str(tmp_path / "o")]) == 2
    assert "--task NAME" in capsys.readouterr().err
    assert main(["grpo", "--checkpoint", str(base / "base"), "--prompts", str(base / "prompts.jsonl"),
                 "--reward", "verifier", "--out", str(tmp_path / "o")]) == 2
    assert "give --task" in capsys.readouterr().err
    assert main(["grpo", "--checkpoint", str(base / "base"), "--task", "arithmetic", "group_size=1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "group_size" in capsys.readouterr().err


def test_sampling_between_training_steps_sees_the_new_weights(tmp_path):
    """The trainer's fused AdamW updates weights in place; whatever samples between steps (a rollout here) must
    see the new weights, not an inference cache of the old ones: each step's engine output equals that of a
    fresh copy of the model (which has no caches)."""
    import copy

    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.train.task import Task
    from lmforge.train.trainer import CheckpointSpec, TrainConfig, train

    tok = Tokenizer([], GPT4_PATTERN)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=32))
    params = SamplingParams(temperature=1.0, n=4, max_tokens=6, seed=3)
    seen = []

    class Probe(Task):
        def before_step(self, m, step):
            live = [r.token_ids for r in Engine(m, tok).generate([[1, 2, 3]], params)[0]]
            fresh = [r.token_ids for r in Engine(copy.deepcopy(m), tok).generate([[1, 2, 3]], params)[0]]
            seen.append(live == fresh)

        def batch(self, step, micro):
            return torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(step))

        def loss(self, m, x):
            _, loss = m(x, targets=x)
            return loss, {}

    train(model, Probe(), TrainConfig(out_dir=str(tmp_path / "run"), max_steps=4, lr=1e-2, warmup_steps=0,
                                      progress=False, precision="fp32", threads=1),
          checkpoint=CheckpointSpec(model_config=model.config.to_dict()))
    assert seen == [True] * 4


# ---- PPO ----------------------------------------------------------------------------------------------------------
PPO_FAST = ["train.threads=1", "train.precision=fp32", "train.progress=false", "train.log_every=1", "val_n=0",
            "prompts_per_step=8", "max_new_tokens=6", "train.eval_every=0", "ppo_epochs=2", "num_mini_batches=2"]


def test_ppo_with_a_reward_model_raises_its_score(base, tmp_path, capsys):
    """RLHF end to end: a reward model trained to prefer replies starting with 'yes', then PPO against it."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                             for i in range(40)))
    rm = tmp_path / "rm"
    assert main(["reward", "train", "--checkpoint", str(base / "base"), "--data", str(pairs), "--out", str(rm),
                 "train.max_steps=40", "train.lr=3e-3", "train.batch_size=8", "train.threads=1",
                 "train.progress=false", "val_fraction=0"]) == 0
    out = tmp_path / "ppo"
    assert main(["ppo", "--checkpoint", str(base / "base"), "--reward-model", str(rm), "--prompts",
                 str(base / "prompts.jsonl"), "--out", str(out), *PPO_FAST, "train.max_steps=48",
                 "train.lr=3e-3"]) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "score" in r]
    first, last = sum(r["score"] for r in rows[:4]) / 4, sum(r["score"] for r in rows[-4:]) / 4
    assert last > first + 0.5, (first, last)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["kl"] > 0   # starts AT the reference
    for key in ("clip_fraction", "value_loss", "entropy", "approx_kl", "non_score_reward"):
        assert key in rows[-1]
    assert checkpoint.read_config(out)["stage"] == "ppo"
    assert "ppo: 48 steps" in capsys.readouterr().out


def test_ppo_minibatches_cover_the_rollout_each_epoch(base, on_path):
    from lmforge.stages.ppo import PPOConfig, PPOTask
    from lmforge.stages.rewards import resolve_rewards
    from lmforge.data.preference import read_prompts
    import lmforge
    from lmforge.stages.reward import add_score_head
    model, tok = lmforge.load(base / "base", device="cpu")
    add_score_head(model)
    cfg = PPOConfig(prompts=str(base / "prompts.jsonl"), reward=["rmod:ascii_share"], prompts_per_step=8,
                    max_new_tokens=4, ppo_epochs=2, num_mini_batches=4, val_n=0)
    import copy
    task = PPOTask(cfg, tok, prompt_rows=read_prompts(cfg.prompts), device="cpu", seed=0,
                   reward_fns=resolve_rewards(cfg.reward, None), reference=copy.deepcopy(model))
    model.eval()
    with torch.no_grad():
        task.before_step(model, 0)
    ro = task.rollout
    assert ro.adv.shape == ro.mask.shape and float((ro.adv * (1 - ro.mask)).abs().sum()) == 0
    assert abs(float(ro.adv[ro.mask > 0].mean())) < 1e-5                        # whitened over the tokens
    for epoch in range(2):
        seen = []
        for mb in range(4):
            b = task.batch(epoch * 4 + mb, 0)
            seen += [tuple(r.tolist()) for r in b["x"]]
        assert sorted(seen) == sorted(tuple(r.tolist()) for r in ro.x)            # every row once per epoch
    with torch.no_grad():
        task.before_step(model, 3)
    assert task.rollout is ro                                                     # mid-cycle: same rollout
    with torch.no_grad():
        task.before_step(model, 8)
    assert task.rollout is not ro and task.rollout.step == 8


def test_tool_episodes_train_the_assistant_tokens_only(base, monkeypatch):
    """On a family with tools each completion is a whole turn through the tool loop; the tool's result is context,
    not trained. The loop is replaced by a fixed turn so the rows can be checked token by token."""
    import lmforge
    from lmforge.data import tasks
    from lmforge.infer import assistant
    from lmforge.stages.grpo import GRPOConfig, GRPOTask
    from lmforge.stages.rewards import resolve_rewards
    from lmforge.tokenizer.chat import render_chat
    tok = lmforge.load(base / "base", device="cpu")[1]
    torch.manual_seed(0)                       # a context long enough for the tool declaration (byte tokens)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=512))
    family = tasks.family("arithmetic:digits=1,ops=+,tools=true")
    calls = []

    def fake_turns(engine, tok_, conversations, tools=None, params=None, **kw):
        out = []
        for messages, p in zip(conversations, params):
            calls.append(p.seed)
            a, b = (int(s) for s in messages[-1]["content"].split("What is ")[1].rstrip("?").split(" + "))
            right = len(calls) % 2 == 0            # every other completion answers right
            call = {"id": "call_0", "type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": f"{a}+{b}"}}}
            out.append([{"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "call_0", "name": "calculator", "content": "TOOLRESULT"},
                        {"role": "assistant", "content": str(a + b if right else a + b + 1)}])
        return out
    monkeypatch.setattr(assistant, "run_chat_turns", fake_turns)
    cfg = GRPOConfig(task="arithmetic:digits=1,ops=+,tools=true", group_size=4, prompts_per_step=2,
                     max_new_tokens=32, val_n=0)
    import copy
    from lmforge.infer.sampling import SamplingParams
    # a reward model is given the whole turn (call, result, answer) rendered with the tools declared
    from lmforge.infer.reward import RewardModel
    from lmforge.stages.reward import add_score_head
    rm_model = copy.deepcopy(model)
    add_score_head(rm_model)
    torch.nn.init.normal_(rm_model.score.weight, std=1.0)
    fns = resolve_rewards(["verifier", str(base)], [1.0, 0.0], family=family, load_model=lambda path: (rm_model, tok))
    task = GRPOTask(cfg, tok, family=family, device="cpu", seed=0, reward_fns=fns)
    model.eval()
    with torch.no_grad():
        ro = task._generate(model, 0)
        prompts = [m for m, _, _ in task._prompts(0) for _ in range(4)]
        calls.clear()
        turns = fake_turns(None, tok, prompts, params=[SamplingParams(seed=i) for i in range(8)])
        expected = RewardModel(rm_model, tok).rewards(prompts, turns, family.tools)
    assert task.last_stats[f"rewards/{base}"] == pytest.approx(sum(expected) / 8, abs=1e-5)
    assert len(set(expected)) > 1
    assert len(set(calls)) == 8                                   # each completion its own seed
    assert task.last_stats["accuracy"] == 0.5
    assert torch.equal(ro.adv.view(2, 4) > 0, torch.tensor([[False, True, False, True]] * 2))
    for r in range(ro.x.size(0)):
        n = int((ro.y[r] >= 0).sum())
        trained = tok.decode([int(t) for t, m in zip(ro.y[r, :n], ro.mask[r, :n]) if m])
        context = tok.decode([int(t) for t in ro.y[r, :n]])
        assert "TOOLRESULT" in context and "TOOLRESULT" not in trained
        assert '"expression"' in trained and "<|tool_call|>" in trained and trained.endswith("<|end|>")
        # the prompt is not trained: the first trained target is the first token after the generation prompt
        messages = task._prompts(0)[r // 4][0]
        prompt = render_chat(tok, messages, family.tools, add_generation_prompt=True)[0]
        assert int(ro.mask[r].nonzero()[0]) == len(prompt) - 1
        assert ro.x[r, :len(prompt)].tolist() == prompt


def test_grpo_with_lora_adapters_learns_and_leaves_the_base(base, tmp_path, on_path):
    import lmforge
    from lmforge.model.lora import lora_modules
    out = tmp_path / "run"
    assert grpo(base, out, "rmod:ascii_share", "train.max_steps=60", "train.lr=3e-2", "train.lora.rank=8",
                "train.lora.alpha=16", "train.lora.targets=*_proj") == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.1, (first, last)
    tuned, _ = lmforge.load(out, device="cpu")
    assert lora_modules(tuned)
    base_sd = lmforge.load(base / "base", device="cpu")[0].state_dict()
    sd = tuned.state_dict()
    assert all(torch.equal(base_sd[n], sd[n]) for n in base_sd)       # only the adapters were trained
