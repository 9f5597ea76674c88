"""Preference data, the reward model and DPO: formats, built-in pairs, training end to end through the CLI on tiny
models, and bad input."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import lmforge
from lmforge import checkpoint
from lmforge.cli import main
from lmforge.data.preference import parse_pair, read_pairs, task_pairs, wrong_variants
from lmforge.data.tasks import family
from lmforge.errors import DataError
from lmforge.model import ModelConfig, Transformer
from lmforge.stages.pairs import collate_pairs, render_pairs
from lmforge.tokenizer.bpe import GPT4_PATTERN
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["train.threads=1", "train.precision=fp32", "train.progress=false", "train.warmup_steps=2",
        "train.log_every=5", "val_fraction=0.2"]


def toy_pairs(n=40, seed=0):
    """A preference a tiny model learns in a few steps: replies that start with 'yes' beat those with 'no'."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sky", "sea", "sun", "moon", "tree", "rock", "bird", "fish"]
    rows = []
    for i in range(n):
        w = rng.choice(words) + str(i)
        rows.append({"prompt": f"{w}?", "chosen": f"yes {w}", "rejected": f"no {w}"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    tok = Tokenizer([], GPT4_PATTERN)        # bytes + the chat specials
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=48,
                                    max_seq_len=64, init_std=0.1))
    checkpoint.save(d / "base", model=model, model_config=model.config.to_dict(), tokenizer=tok)
    write_jsonl(d / "pairs.jsonl", toy_pairs())
    return d


# ---- formats ----------------------------------------------------------------------------------------------------
def test_the_three_trl_shapes_parse_to_the_same_pair():
    std = parse_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    conv = parse_pair({"prompt": [{"role": "user", "content": "2+2?"}],
                       "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}]})
    implicit = parse_pair({"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                           "rejected": [{"role": "user", "content": "2+2?"},
                                        {"role": "assistant", "content": "5"}]})
    for p in (std, conv, implicit):
        assert (p.prompt, p.chosen, p.rejected) == ([{"role": "user", "content": "2+2?"}],
                                                    [{"role": "assistant", "content": "4"}],
                                                    [{"role": "assistant", "content": "5"}])


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "the same"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": 3, "rejected": "a"}, "'chosen' must be a string"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
     "share no leading message"),
])
def test_bad_pairs_say_what_is_wrong(row, message):
    with pytest.raises(DataError, match=message):
        parse_pair(row)


def test_read_pairs_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", toy_pairs(3) + [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError) as e:
        read_pairs(f)
    assert e.value.file == str(f) and e.value.line == 4


def test_builtin_pairs_are_a_right_and_a_wrong_answer():
    fam = family("arithmetic:digits=2,ops=+,restate=true")
    pairs = task_pairs(fam, 50, seed=0, split="eval")
    assert len(pairs) == 50
    eval_keys = {p.key for p in fam.problems("eval", 10_000, 0)}
    for p in pairs:
        a, b = p.prompt[0]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert f"{a}+{b}" in eval_keys                                   # held-out problems only
        assert p.chosen[0]["content"].endswith(f"= {int(a) + int(b)}")
        assert not p.rejected[0]["content"].endswith(f"= {int(a) + int(b)}")
        assert p.rejected[0]["content"].rsplit("=", 1)[0] == p.chosen[0]["content"].rsplit("=", 1)[0]
    variants = wrong_variants("12 + 30 = 42", random.Random(0))
    assert "12 + 30 = 42" not in variants and {"12 + 30 = 43", "12 + 30 = 41", "12 + 30 = 24"} <= set(variants)


def test_builtin_tool_pairs_reject_a_miscopied_call():
    fam = family("arithmetic:digits=3,ops=+,tools=true")
    pairs = task_pairs(fam, 40, seed=0, split="eval")
    assert len(pairs) == 40
    kinds = set()
    for p in pairs:
        a, b = p.prompt[-1]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
        call = lambda turn: turn[0]["tool_calls"][0]["function"]["arguments"]["expression"]  # noqa: E731
        assert call(p.chosen) == f"{a}+{b}" and p.chosen[-1]["content"] == str(int(a) + int(b))
        a2, b2 = call(p.rejected).split("+")
        assert (a2 == a) != (b2 == b)                                    # exactly one operand miscopied
        wrong, right = (a2, a) if a2 != a else (b2, b)
        kinds.add("dropped" if len(wrong) < len(right) else "added" if len(wrong) > len(right) else "changed")
        # the wrong call's own result, in the tool message and the answer: the mistake is in the copying
        assert p.rejected[1]["content"] == p.rejected[2]["content"] == str(int(a2) + int(b2)) != p.chosen[2]["content"]
        assert p.tools == fam.tools
    assert kinds == {"dropped", "added", "changed"}


def test_own_tool_turns_become_pairs(base, monkeypatch):
    """With tools the model's own whole turns are sampled (through the batched tool loop); a problem with a wrong
    turn pairs it with a right turn of the model's own when there is one, else with the demonstration."""
    from lmforge.infer import assistant
    from lmforge.stages.pairs import PairsConfig, model_pairs, rendered_pairs
    from lmforge.model import ModelConfig, Transformer
    tok = lmforge.load(base / "base", device="cpu")[1]
    torch.manual_seed(0)                       # a context long enough for the tool declaration (byte tokens)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=512))
    fam = family("arithmetic:digits=3,tools=true")
    real = model_pairs(model, tok, fam, 3, seed=0, split="train", samples=2, max_tokens=8)
    assert len(real) == 3 and all(p.tools == fam.tools for p in real)   # random weights: the demonstration wins
    for p in real:
        problem = fam.make(*_operands(p.prompt[-1]["content"]))
        assert fam.score(problem, p.chosen[-1]["content"]) == 1.0 > fam.score(problem, p.rejected[-1]["content"])
    seen = []

    def fake_turns(model_, tok_, convs, tools=None, params=None, **kw):
        seen.append((tools, len(convs), {q.seed for q in params}))
        out = []
        for j, msgs in enumerate(convs):
            a, op, b = _operands(msgs[-1]["content"])
            right = j % 2 == 1                   # each problem's second sample is right
            out.append([{"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "calculator", "arguments": {"expression": f"{a}{op}{b}"}}}]},
                {"role": "tool", "tool_call_id": "call_0", "name": "calculator", "content": "R"},
                {"role": "assistant", "content": str(fam.make(a, op, b).answer) if right else "-1"}])
        return out
    monkeypatch.setattr(assistant, "run_chat_turns", fake_turns)
    cfg = PairsConfig(data=["arithmetic:digits=3,tools=true"], pairs_n=4, val_n=0, own_fraction=1.0, own_samples=2)
    rows, _ = rendered_pairs(cfg, model, tok, 0)
    assert len(rows) == 4 and seen[0][0] == ["calculator"] and len(seen[0][2]) == seen[0][1]  # own seed each
    for p in rows.pairs:
        assert p.chosen[-1]["content"] != "-1" and p.rejected[-1]["content"] == "-1"
        assert p.chosen[1]["content"] == "R"                     # the model's own right turn, not the demonstration


def _operands(question: str):
    a, op, b = question.removeprefix("What is ").removesuffix("?").split(" ")
    return int(a), op, int(b)


def test_completion_masks_cover_only_the_compared_reply():
    tok = Tokenizer([], GPT4_PATTERN)
    p = parse_pair({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "EARLIER"},
                               {"role": "user", "content": "b"}], "chosen": "yes", "rejected": "nope"})
    rows = render_pairs(tok, [p], 64)
    x, y, m, last = collate_pairs(rows, [0], 0, "cpu")
    for r, reply in ((0, "yes"), (1, "nope")):
        trained = tok.decode([int(t) for t, k in zip(y[r], m[r]) if k > 0])
        assert trained.startswith(reply) and "EARLIER" not in trained
        assert int(last[r]) == int((y[r] != -1).sum())                  # the last real token of x


# ---- reward model -----------------------------------------------------------------------------------------------
def test_reward_model_learns_the_preference_and_scores_files(base, tmp_path, capsys):
    out = tmp_path / "rm"
    rc = main(["reward", "train", "--checkpoint", str(base / "base"), "--data", str(base / "pairs.jsonl"),
               "--out", str(out), "train.max_steps=40", "train.lr=3e-3", "train.batch_size=8",
               "train.eval_every=20", *FAST])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = list(read_metrics(out / "metrics.jsonl"))
    assert rows[-1]["val_accuracy"] == 1.0 and rows[-1]["val_margin"] > 0.5
    assert any("accuracy" in r and "margin" in r for r in rows)
    assert checkpoint.read_config(out)["stage"] == "reward"
    model, _ = lmforge.load(out, device="cpu")
    assert model.config.score_dim == 1 and model.score is not None
    # score: both sides of pairs never seen in training, and single replies
    write_jsonl(tmp_path / "new.jsonl", toy_pairs(10, seed=7) + [{"prompt": "x?", "completion": "yes x"}])
    assert main(["reward", "score", "--checkpoint", str(out), "--data", str(tmp_path / "new.jsonl"),
                 "--json"]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["prefers_chosen"] for r in scored[:10]) and "reward" in scored[10]
    # exporting it to Hugging Face keeps the language model and says the score head is left out
    assert main(["export", "hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert "score head" in capsys.readouterr().err and (tmp_path / "hf" / "config.json").is_file()
    assert main(["export", "gguf", "--checkpoint", str(out), "--out", str(tmp_path / "rm.gguf")]) == 0
    assert "score head" in capsys.readouterr().err and (tmp_path / "rm.gguf").is_file()


def test_a_language_model_is_not_a_reward_model(base, tmp_path, capsys):
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "x", "completion": "y"}])
    assert main(["reward", "score", "--checkpoint", str(base / "base"), "--data", str(tmp_path / "s.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no score head" in err[0]


# ---- DPO --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_raises_the_chosen_over_the_rejected(base, tmp_path, capsys, loss):
    out = tmp_path / "dpo"
    rc = main(["dpo", "--checkpoint", str(base / "base"), "--data", str(base / "pairs.jsonl"), "--out", str(out),
               "--loss", loss, "--beta", "0.5", "train.max_steps=30", "train.lr=3e-3", "train.batch_size=8",
               "train.eval_every=15", *FAST, "train.log_every=1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = list(read_metrics(out / "metrics.jsonl"))
    first = next(r for r in rows if "rewards/margins" in r)
    # step 1 is computed before any update: the policy IS the reference, so every log-ratio is 0 and the loss is
    # log 2 (sigmoid) or (1 / (2 beta))^2 (ipo) — the precomputed reference log-probs match the policy's
    assert abs(first["rewards/margins"]) < 1e-4 and abs(first["rewards/chosen"]) < 1e-4
    assert first["loss"] == pytest.approx({"sigmoid": math.log(2), "ipo": 1.0}[loss], abs=1e-4)
    assert rows[-1]["val_rewards/accuracies"] == 1.0 and rows[-1]["val_rewards/margins"] > 0.5
    assert (out / "reference_logps.pt").is_file()
    assert checkpoint.read_config(out)["dpo"]["loss"] == loss
    # the trained policy itself prefers "yes" replies on held-out prompts: its log-prob margin grew
    from lmforge.stages.dpo import reference_logps
    from lmforge.stages.pairs import load_pairs
    tok = Tokenizer.load(base / "base" / "tokenizer")
    _, val = load_pairs([str(base / "pairs.jsonl")], n=1, val_fraction=0.2, val_n=0, seed=1337)
    rows_val = render_pairs(tok, val, 64)
    before = reference_logps(lmforge.load(base / "base", device="cpu")[0], rows_val, 0, "cpu", 8, "", False)
    after = reference_logps(lmforge.load(out, device="cpu")[0], rows_val, 0, "cpu", 8, "", False)
    assert ((after[:, 0] - after[:, 1]) > (before[:, 0] - before[:, 1]) + 1.0).all()


def test_bad_pair_file_is_one_line_and_writes_nothing(base, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", toy_pairs(3) + [{"prompt": "q", "chosen": "same", "rejected": "same"}])
    for verb in (["dpo"], ["reward", "train"]):
        out = tmp_path / ("o" + verb[0])
        rc = main([*verb, "--checkpoint", str(base / "base"), "--data", str(bad), "--out", str(out), *FAST])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"{bad}:4" in err[0] and "the same" in err[0]
        assert not out.exists()


# ---- best-of-N ----------------------------------------------------------------------------------------------------
def test_best_of_n_rules_pick_from_the_same_samples(base):
    from lmforge.eval.best_of import evaluate_best_of
    model, tok = lmforge.load(base / "base", device="cpu")
    fam = family("arithmetic:digits=1,ops=+")
    probs = fam.problems("eval", 6, 0)
    res = evaluate_best_of(model, tok, fam, probs, 4, max_tokens=4, progress=False,
                           scorers={"last": lambda prompts, replies: [i % 4 for i in range(len(replies))]})
    rows = res["problems"]
    assert all(len(r["samples"]) == 4 and r["picks"]["last"] == 3 and r["picks"]["first sample"] == 0 for r in rows)
    for rule, acc in res["accuracy"].items():
        assert acc == pytest.approx(sum(r["correct"][r["picks"][rule]] for r in rows) / len(rows)), rule
    assert res["accuracy"]["verifier"] == pytest.approx(sum(any(r["correct"]) for r in rows) / len(rows))
    again = evaluate_best_of(model, tok, fam, probs, 4, max_tokens=4, progress=False)
    assert [r["samples"] for r in again["problems"]] == [r["samples"] for r in rows]      # seeded


def test_best_of_n_with_tools_ranks_whole_turns(base, monkeypatch):
    """With tools every sample is a whole turn through the tool loop; a scorer (a reward model) sees the turn's
    messages; the mean log-prob is the assistant's tokens teacher-forced."""
    from lmforge.eval import best_of
    from lmforge.model import ModelConfig, Transformer
    tok = lmforge.load(base / "base", device="cpu")[1]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=512))
    fam = family("arithmetic:digits=3,tools=true")
    probs = fam.problems("eval", 3, 0)
    seen = []

    def scorer(prompts, replies):
        seen.extend(replies)
        return [float(len(r)) for r in replies]
    res = best_of.evaluate_best_of(model, tok, fam, probs, 3, max_tokens=6, progress=False, scorers={"rm": scorer})
    assert len(seen) == 9 and all(isinstance(r, list) and r[-1]["role"] == "assistant" for r in seen)
    assert all(r["samples"] == [t[-1]["content"] for t in seen[3 * i:3 * i + 3]] for i, r in enumerate(res["problems"]))
    # the teacher-forced mean log-prob of a turn is its tokens' mean under the model
    replies, means = best_of._sample_turns(model, tok, fam, probs[:1], 2, 0.8, 6, 0, 64, False)
    from lmforge.tokenizer.chat import render_chat
    ids, wrote = render_chat(tok, probs[0].messages + replies[0][1], fam.tools)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0], -1)
    picked = [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1) if wrote[t + 1]]
    assert means[0][1] == pytest.approx(sum(picked) / len(picked), abs=1e-5)


def test_self_consistency_votes_then_breaks_ties_by_logprob():
    from lmforge.eval.best_of import _vote
    assert _vote(["= 5", "= 7", "= 5", "none"], [-1.0, -0.1, -2.0, 0.0]) == 0     # two votes for 5; its best sample
    assert _vote(["= 5", "= 7"], [-1.0, -0.5]) == 1                                 # a tie: the likelier answer
    assert _vote(["no", "answer"], [-3.0, -1.0]) == 1                               # nothing votes: mean logprob


def test_eval_task_best_of_with_a_reward_model(base, tmp_path, capsys):
    rm = tmp_path / "rm"
    assert main(["reward", "train", "--checkpoint", str(base / "base"), "--data", str(base / "pairs.jsonl"),
                 "--out", str(rm), "train.max_steps=2", *FAST]) == 0
    capsys.readouterr()
    assert main(["eval", "task", "--checkpoint", str(base / "base"), "--task", "arithmetic:digits=1,ops=+",
                 "--n", "4", "--k", "0", "--max-tokens", "4", "--best-of", "3", "--reward-model", str(rm)]) == 0
    out = capsys.readouterr().out
    for rule in ("first sample", "mean logprob", "reward model", "verifier", "self-consistency"):
        assert rule in out
    assert main(["eval", "task", "--checkpoint", str(base / "base"), "--task", "arithmetic", "--reward-model",
                 str(rm)]) == 2
    assert "--best-of" in capsys.readouterr().err


def test_the_models_own_wrong_answers_become_rejected_sides(base):
    from lmforge.stages.pairs import model_pairs
    model, tok = lmforge.load(base / "base", device="cpu")
    fam = family("arithmetic:digits=1,ops=+")
    pairs = model_pairs(model, tok, fam, 5, seed=0, split="train", samples=2, max_tokens=6)
    assert len(pairs) == 5
    for p in pairs:
        a, b = p.prompt[-1]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
        problem = fam.make(int(a), "+", int(b))
        assert fam.score(problem, p.chosen[0]["content"]) == 1.0
        assert fam.score(problem, p.rejected[0]["content"]) == 0.0 and p.rejected[0]["content"].strip()


def test_dpo_with_lora_trains_only_adapters_and_learns(base, tmp_path, capsys):
    out = tmp_path / "dpo-lora"
    rc = main(["dpo", "--checkpoint", str(base / "base"), "--data", str(base / "pairs.jsonl"), "--out", str(out),
               "--beta", "0.5", "train.max_steps=30", "train.lr=1e-2", "train.batch_size=8", "train.eval_every=30",
               "train.lora.rank=8", "train.lora.alpha=16", *FAST, "train.log_every=1"])
    assert rc == 0, capsys.readouterr().out
    rows = list(read_metrics(out / "metrics.jsonl"))
    assert rows[-1]["val_rewards/accuracies"] == 1.0 and rows[-1]["val_rewards/margins"] > 0.2
    # the run reloads as the base with adapters; the base's own weights are untouched (only adapters trained)
    from lmforge.model.lora import lora_modules
    tuned, _ = lmforge.load(out, device="cpu")
    assert lora_modules(tuned)
    base_sd = lmforge.load(base / "base", device="cpu")[0].state_dict()
    frozen = {n.replace(".base.", "."): p for n, p in tuned.state_dict().items() if "lora_" not in n}
    shared = [n for n in base_sd if n in frozen]
    assert shared and all(torch.equal(base_sd[n], frozen[n]) for n in shared)
