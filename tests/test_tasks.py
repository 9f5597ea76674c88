"""Built-in instruction data and task families (lmforge.data.tasks) and task evaluation (lmforge.eval.task).

The held-out split is decided by a hash of a problem's text, so it is disjoint from training even where the
problem space is tiny, and it never moves (a golden list pins it); scorers, demonstrations under the chat
template's loss mask, chatterbot offline, reasoning-gym round trips, the pass@k estimator's golden values, and
`lmforge eval task` end to end on a scripted model whose every answer is known in advance.
"""
from __future__ import annotations

import json
import math
import socket
import sys

import pytest
import torch

from lmforge import checkpoint
from lmforge.cli import main
from lmforge.data.arithmetic import CALCULATOR_TOOL, ArithmeticFamily, final_number
from lmforge.data.problems import EVAL_FRACTION, split_of
from lmforge.data.tasks import conversations, family, list_sources, source
from lmforge.errors import ConfigError
from lmforge.eval.task import evaluate_task, format_table, pass_at_k, stop_ids
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.chat import render_chat
from lmforge.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    text = "What is 12 + 34? 46. What is 7 - 9? -2. Hello, how are you? I am fine, thank you. " * 30
    return Tokenizer.train([text], vocab_size=272 + 40, progress=False)


# ---- arithmetic: the split ------------------------------------------------------------------------------------
def test_split_is_disjoint_even_in_a_tiny_space():
    fam = family("arithmetic:digits=1")
    assert fam.space == 200
    evals = [p.key for p in fam.problems("eval", 1000, seed=0)]
    assert len(evals) == len(set(evals)) and 5 <= len(evals) <= 45       # all of the eval split, once each
    train = set()
    for seed in range(3):
        train |= {p.key for p in fam.problems("train", 2000, seed=seed)}
    assert not train & set(evals)
    assert len(train) + len(evals) == 200                                 # together: the whole space
    for seed in (1, 7):                                                  # the seed orders, it does not split
        assert sorted(p.key for p in fam.problems("eval", 1000, seed=seed)) == sorted(evals)
    # the rule itself: a stable hash of the expression
    assert all(split_of(k) == "eval" for k in evals) and all(split_of(k) == "train" for k in train)


def test_split_of_is_pinned():
    """SHA-256 of the canonical text, not Python's salted hash(): the same split on every machine, forever."""
    fam = family("arithmetic:digits=1")
    got = sorted(p.key for p in fam.problems("eval", 1000, seed=0))
    assert got == GOLDEN_EVAL, got
    assert abs(sum(split_of(f"q{i}") == "eval" for i in range(20000)) / 20000 - EVAL_FRACTION) < 0.01


# the held-out problems of arithmetic:digits=1 (ops + and -): fixed forever, or models trained before a change
# would have seen what a new evaluation holds out
GOLDEN_EVAL = ['0+4', '1-4', '1-9', '2+7', '4+3', '4-5', '5+0', '5+6', '5+9', '6-4', '6-7', '7-1', '8-9', '9+0', '9+3',
               '9-5', '9-9']


def test_split_disjoint_when_sampled_and_across_difficulties():
    fam3 = family("arithmetic:digits=3,ops=+-*")        # 3,000,000 problems: sampled, not listed
    assert fam3.space > 200_000
    ev = fam3.problems("eval", 300, seed=0)
    tr = fam3.problems("train", 3000, seed=0)
    assert len({p.key for p in ev}) == 300
    assert not {p.key for p in ev} & {p.key for p in tr}
    assert {p.meta["op"] for p in tr} == {"+", "-", "*"}
    # a smaller difficulty's held-out problems are held out from every arithmetic source's training split
    small = {p.key for p in family("arithmetic:digits=2").problems("eval", 5000)}
    assert small and not small & {p.key for p in tr}
    assert not small & {p.key for p in family("arithmetic:digits=2").problems("train", 20000, seed=3)}


def test_problems_are_deterministic_and_prefixes():
    fam = family("arithmetic:digits=2")
    a = [p.key for p in fam.problems("eval", 50, seed=4)]
    assert a == [p.key for p in family("arithmetic:digits=2").problems("eval", 50, seed=4)]
    assert a[:10] == [p.key for p in fam.problems("eval", 10, seed=4)]
    assert a != [p.key for p in fam.problems("eval", 50, seed=5)]
    rows = list(conversations("chatterbot:english", "train", n=20, seed=2))
    assert rows == list(conversations("chatterbot:english", "train", n=20, seed=2))
    assert rows != list(conversations("chatterbot:english", "train", n=20, seed=3))


def test_train_stream_is_endless_in_a_tiny_space():
    rows = list(conversations("arithmetic:digits=1", "train", n=500, seed=0))
    assert len(rows) == 500 and len({r["messages"][0]["content"] for r in rows}) < 200


def test_problem_text_and_answers():
    fam = ArithmeticFamily(3, "+-*")
    for p in fam.problems("train", 300, seed=1):
        a, op, b = p.meta["a"], p.meta["op"], p.meta["b"]
        assert p.messages == [{"role": "user", "content": f"What is {a} {op} {b}?"}]
        assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert 0 <= a < 1000 and 0 <= b < 1000
    assert family("arithmetic:digits=2,ops=x+").name == "arithmetic:digits=2,ops=+*"


# ---- arithmetic: scoring and demonstrations -------------------------------------------------------------------
@pytest.mark.parametrize("response,right", [
    ("432", True), ("47 + 385 = 432", True), ("The answer is 432.", True), ("432.0", True), ("  432\n", True),
    ("431", False), ("432 or 433", False), ("432 apples, 5 pears", False), ("", False), ("no idea", False),
    ("4320", False), ("43.2", False), ("-432", False),
])
def test_scorer_reads_the_final_number(response, right):
    p = family("arithmetic:digits=3").make(47, "+", 385)
    assert p.answer == "432"
    assert family("arithmetic:digits=3").score(p, response) == (1.0 if right else 0.0)


def test_scorer_negative_and_thousands():
    fam = family("arithmetic:digits=3,ops=+-*")
    neg = fam.make(47, "-", 385)
    assert fam.score(neg, "-338") == 1.0 and fam.score(neg, "338") == 0.0 and fam.score(neg, "47-385 = -338") == 1.0
    assert fam.score(neg, "\u2212338") == 1.0                      # a typographic minus
    big = fam.make(999, "*", 999)
    assert fam.score(big, "998,001") == 1.0 and fam.score(big, "998001") == 1.0 and fam.score(big, "998,00") == 0.0
    assert final_number("3-5") == 5 and final_number("答案是432") == 432


def test_demonstration_answer_is_under_the_loss_mask(tok):
    fam = family("arithmetic:digits=3")
    end = tok.special_tokens["<|end|>"]
    for p in fam.problems("train", 5, seed=0):
        demo = fam.demonstration(p)
        assert demo[:-1] == p.messages and demo[-1] == {"role": "assistant", "content": p.answer}
        ids, mask = render_chat(tok, demo)
        prompt, _ = render_chat(tok, p.messages, add_generation_prompt=True)
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        learned = [i for i, m in zip(ids, mask) if m]
        assert learned == tok.encode(p.answer) + [end]


def test_tool_demonstration_calls_the_calculator(tok):
    from lmforge.infer.tools import CALCULATOR, calculate, to_openai

    assert to_openai(CALCULATOR) == CALCULATOR_TOOL        # the runtime declares what the data declares
    fam = family("arithmetic:digits=4,ops=+-*,tools=true")
    assert fam.tools == [CALCULATOR_TOOL]
    for p in fam.problems("train", 30, seed=0):
        demo = fam.demonstration(p, tools=True)
        call = demo[-3]["tool_calls"][0]["function"]
        assert call == {"name": "calculator", "arguments": {"expression": p.meta["expression"]}}
        assert calculate(call["arguments"]["expression"]) == demo[-2]["content"] == demo[-1]["content"] == p.answer
        assert [m["role"] for m in demo] == ["user", "assistant", "tool", "assistant"]
    ids, mask = render_chat(tok, demo, tools=fam.tools)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    expr = p.meta["expression"]
    assert learned == (f'<|tool_call|>{{"name": "calculator", "arguments": {{"expression": "{expr}"}}}}<|end|>'
                       f"{p.answer}<|end|>")
    row = next(conversations("arithmetic:digits=4,tools=true", n=1))
    assert row["tools"] == [CALCULATOR_TOOL] and row["messages"][1]["tool_calls"]


def test_restated_answers_copy_the_problem_and_score_by_the_last_number(tok):
    plain, fam = family("arithmetic:digits=2"), family("arithmetic:digits=2,restate=true")
    assert fam.name == "arithmetic:digits=2,restate=true"
    probs = fam.problems("eval", 50, seed=3)
    assert [p.key for p in probs] == [p.key for p in plain.problems("eval", 50, seed=3)]   # the same problems
    for p in probs:
        answer = fam.demonstration(p)[-1]["content"]
        m = p.meta
        assert answer == f"{m['a']} {m['op']} {m['b']} = {p.answer}"
        assert fam.score(p, answer) == 1.0 and fam.score(p, f"{m['a']} {m['op']} {m['b']} = {int(p.answer) + 1}") == 0
    pad = family("arithmetic:digits=3,ops=+-*,restate=pad")
    assert pad.name == "arithmetic:digits=3,ops=+-*,restate=pad"
    for p in pad.problems("train", 200, seed=1):
        answer = pad.demonstration(p)[-1]["content"]
        left, right = answer.split(" = ")
        a, op, b = left.split(" ")
        assert len(a) == len(b) == 3 and int(a) == p.meta["a"] and int(b) == p.meta["b"] and op == p.meta["op"]
        assert len(right.lstrip("-")) >= 4 and pad.score(p, answer) == 1.0        # "-0321" reads as -321
    assert family("arithmetic:digits=2,ops=+,restate=pad").demonstration(
        family("arithmetic:digits=2,ops=+").make(7, "+", 5))[-1]["content"] == "07 + 05 = 012"
    tool = family("arithmetic:digits=3,tools=true,restate=true")
    p = tool.problems("train", 1, seed=0)[0]
    demo = tool.demonstration(p, tools=True)
    assert demo[-2]["content"] == p.answer and demo[-1]["content"].endswith(f" = {p.answer}")


def test_turns_put_several_problems_in_one_conversation(tok):
    one, two = family("arithmetic:digits=3,tools=true"), family("arithmetic:digits=3,tools=true,turns=2")
    assert two.name == "arithmetic:digits=3,tools=true,turns=2"
    assert [p.key for p in two.problems("eval", 10, seed=1)] == [p.key for p in one.problems("eval", 10, seed=1)]
    singles = list(conversations("arithmetic:digits=3,tools=true", n=6, seed=2))
    pairs = list(conversations("arithmetic:digits=3,tools=true,turns=2", n=3, seed=2))
    assert len(pairs) == 3
    for k, row in enumerate(pairs):   # the same problems in the same order, two per conversation, declared once
        assert row["messages"] == singles[2 * k]["messages"] + singles[2 * k + 1]["messages"]
        assert row["tools"] == [CALCULATOR_TOOL]
        ids, mask = render_chat(tok, row["messages"], tools=row["tools"])
        assert tok.decode(ids).count("<|tool|>") == 1 and tok.decode(ids).count("<|tool_call|>") == 2
    # a finite eval space ends in a short last group
    rows = list(conversations("arithmetic:digits=1,turns=3", split="eval", seed=0))
    n = len(family("arithmetic:digits=1").problems("eval", 1000, seed=0))
    assert sum(len(r["messages"]) // 2 for r in rows) == n and len(rows) == -(-n // 3)
    for bad in ("turns=0", "turns=17", "turns=x", "restate=maybe"):
        with pytest.raises(ConfigError, match="turns|restate"):
            family(f"arithmetic:digits=2,{bad}")


# ---- chatterbot ------------------------------------------------------------------------------------------------
def test_chatterbot_loads_offline_in_several_languages(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    src = source("chatterbot:english,chinese,german")
    rows = list(src.conversations("train")) + list(src.conversations("eval"))
    assert len(rows) == src.size() > 500
    for lang in ("english", "chinese", "german"):
        assert source(f"chatterbot:{lang}").size() > 20
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) <= 8
        assert all(m["content"].strip() for m in r["messages"])
    texts = {m["content"] for r in rows for m in r["messages"]}
    assert "Hello" in texts and any("\u4e00" <= c <= "\u9fff" for t in texts for c in t)
    train = {json.dumps(r) for r in src.conversations("train")}
    assert not train & {json.dumps(r) for r in src.conversations("eval")}
    assert len(list(conversations("chatterbot:english", n=7))) == 7
    with pytest.raises(ConfigError, match="unknown chatterbot-corpus language 'klingon'.*english"):
        source("chatterbot:klingon")
    with pytest.raises(ConfigError, match="has no scorer"):
        family("chatterbot")


# ---- reasoning-gym ---------------------------------------------------------------------------------------------
def test_reasoning_gym_round_trip(tok):
    fam = family("rg:basic_arithmetic")
    probs = fam.problems("eval", 10, seed=0)
    assert len({p.key for p in probs}) == 10
    for p in probs:
        demo = fam.demonstration(p)
        assert demo[0] == {"role": "user", "content": p.meta["entry"]["question"]}
        assert fam.score(p, demo[-1]["content"]) == 1.0
        assert fam.score(p, f"Let me think.<answer>{p.answer}</answer>") == 1.0
        assert fam.score(p, "<answer>123456789</answer>") < 1.0 and fam.score(p, "") == 0.0
        render_chat(tok, demo)
    assert fam.problems("eval", 10, seed=0)[3].key == probs[3].key       # deterministic by seed


def test_reasoning_gym_split_is_disjoint_in_a_tiny_space():
    fam = family("rg:chain_sum:min_terms=2,max_terms=2,min_digits=1,max_digits=1")
    assert fam.config == {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    ev = {p.key for p in fam.problems("eval", 1000, seed=0)}            # the space is ~200 questions
    tr = {p.key for p in fam.problems("train", 2000, seed=0)}
    assert ev and tr and not ev & tr


def test_reasoning_gym_bad_names_and_missing_package(monkeypatch):
    with pytest.raises(ConfigError, match="unknown reasoning-gym dataset 'basic_arithmetc'.*basic_arithmetic"):
        family("rg:basic_arithmetc")
    with pytest.raises(ConfigError, match="unknown option 'nonsense'"):
        family("rg:basic_arithmetic:nonsense=1")
    with pytest.raises(ConfigError, match="bad dataset options"):
        family("rg:chain_sum:min_terms=5,max_terms=2")
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)           # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'lmforge\[tasks\]'"):
        family("rg:basic_arithmetic")
    rows = {r["name"]: r for r in list_sources()}
    assert rows["rg"]["size"] is None and "lmforge[tasks]" in rows["rg"]["error"]


# ---- names ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,match", [
    ("nope", "unknown source 'nope'.*arithmetic.*chatterbot.*rg"),
    ("arithmetic:digits=0", "digits must be an integer in 1..9"),
    ("arithmetic:digits=two", "digits expects an integer"),
    ("arithmetic:ops=/", "ops must be made of"),
    ("arithmetic:color=red", "unknown option 'color'.*digits="),
    ("arithmetic:tools=maybe", "expects true/false"),
    ("rg:", "name a reasoning-gym dataset"),
])
def test_bad_names_are_config_errors(name, match):
    with pytest.raises(ConfigError, match=match):
        family(name)


def test_bad_split_and_n():
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        family("arithmetic").problems("val", 3)
    with pytest.raises(ConfigError, match="field 'n'"):
        list(conversations("arithmetic", n=0))


def test_list_sources_and_data_list(capsys, monkeypatch):
    rows = {r["name"]: r for r in list_sources()}
    assert rows["arithmetic"]["scorer"] and rows["arithmetic"]["size"] == "procedural"
    assert not rows["chatterbot"]["scorer"] and rows["chatterbot"]["size"] == source("chatterbot").size()
    assert rows["rg"]["scorer"] and "datasets" in rows["rg"]["size"]
    import lmforge.data.corpus
    monkeypatch.setattr(lmforge.data.corpus, "list_builtins", lambda: [])   # the corpora table: test_data's
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("NAME        KIND"):].splitlines()
    assert table[1].split()[:4] == ["arithmetic", "task", "(with", "scorer)"]
    assert table[2].split()[:4] == ["chatterbot", "instruction", "(no", "scorer)"]
    assert f"{rows['chatterbot']['size']:,} conversations" in table[2]


# ---- pass@k ----------------------------------------------------------------------------------------------------
def test_pass_at_k_golden_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)                   # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)         # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0 and pass_at_k(3, 1, 3) == 1.0
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


# ---- evaluation ------------------------------------------------------------------------------------------------
def scripted_model(tok, reply: str, seq_len: int = 256) -> Transformer:
    """A model that answers every prompt with `reply` then <|end|>: its blocks add nothing, so the logits depend
    only on the last token, a chain <|assistant|> -> reply[0] -> ... -> <|end|>."""
    chain = [tok.special_tokens["<|assistant|>"], *tok.encode(reply), tok.special_tokens["<|end|>"]]
    d = len(chain) + 1
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, d_model=d, d_ff=4,
                                    max_seq_len=seq_len, final_norm=False, tie_embeddings=False))
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.zero_()
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[:, d - 1] = 1.0                  # every other token: one shared direction
        model.lm_head.weight.zero_()
        for j, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            model.tok_emb.weight[cur] = 0.0
            model.tok_emb.weight[cur, j] = 1.0
            model.lm_head.weight[nxt, j] = 60.0
    return model


def test_evaluate_task_on_a_scripted_model(tok):
    fam = family("arithmetic:digits=1")
    model = scripted_model(tok, "7")
    res = evaluate_task(model, tok, fam, n=200, seed=0, k=2, samples=3, max_tokens=6, progress=False)
    probs = fam.problems("eval", 200, seed=0)
    right = sum(p.answer == "7" for p in probs)
    assert 0 < right < len(probs) and res["n"] == len(probs)
    g = res["greedy"]
    assert g["accuracy"] == right / len(probs) and g["ended_with_end_of_turn"] == 1.0 and g["mean_tokens"] == 2.0
    s = res["sampled"]
    assert s["pass@1"] == s["pass@2"] == right / len(probs) and s["ended_with_end_of_turn"] == 1.0
    assert [r["correct"] for r in res["problems"]] == [p.answer == "7" for p in probs]
    assert all(r["response"] == "7" and r["sampled_correct"] in (0, 3) for r in res["problems"])
    table = format_table(res)
    assert f"{100 * right / len(probs):.1f}%" in table and "100.0%" in table and "pass@2" in table


def test_evaluate_task_with_tools_goes_through_the_tool_loop(tok):
    """A family whose demonstrations call tools is answered with the tools declared in the prompt (the scripted
    model answers at once, without calling)."""
    fam = family("arithmetic:digits=1,tools=true")
    res = evaluate_task(scripted_model(tok, "7", seq_len=512), tok, fam, n=6, seed=0, max_tokens=4, progress=False)
    probs = fam.problems("eval", 6, seed=0)
    assert res["tools"] == ["calculator"] and res["greedy"]["tool_calls_per_answer"] == 0
    assert [r["correct"] for r in res["problems"]] == [p.answer == "7" for p in probs]
    assert res["greedy"]["ended_with_end_of_turn"] == 1.0 and res["greedy"]["mean_tokens"] == 2.0


def test_evaluate_task_answers_are_the_engine_answers(tok):
    """Batched answers equal one-at-a-time generation; a budget cut is not counted as ended; scores come from the
    family's scorer on exactly those texts."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=64,
                                    init_std=0.3))
    fam = family("arithmetic:digits=2")
    probs = fam.problems("eval", 12, seed=3)

    class Picky(ArithmeticFamily):        # full credit for exactly the answers a one-at-a-time run gives
        def score(self, problem, response):
            return 1.0 if response == expected[problem.key] and problem.key in lucky else 0.0

    params = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=stop_ids(tok))
    expected, ends = {}, {}
    for p in probs:
        r = generate(model, tok, render_chat(tok, p.messages, add_generation_prompt=True)[0], params, add_bos=False)
        expected[p.key] = r.text
        ends[p.key] = r.finish_reason == "stop" and r.stop_reason == tok.special_tokens["<|end|>"]
    lucky = {p.key for p in probs[::3]}
    res = evaluate_task(model, tok, Picky(2), problems=probs, max_tokens=5, batch_size=5, progress=False)
    assert [r["response"] for r in res["problems"]] == [expected[p.key] for p in probs]
    assert [r["ended"] for r in res["problems"]] == [ends[p.key] for p in probs]
    assert res["greedy"]["accuracy"] == len(lucky) / len(probs) and res["sampled"] is None
    assert all(r["tokens"] <= 5 for r in res["problems"])
    with pytest.raises(ConfigError, match="field 'samples'"):
        evaluate_task(model, tok, fam, n=3, k=4, samples=2, progress=False)


def test_eval_task_cli_writes_json(tok, tmp_path, capsys):
    model = scripted_model(tok, "7")
    checkpoint.save(tmp_path / "ck", model=model, model_config=model.config.to_dict(), tokenizer=tok)
    out = tmp_path / "res.json"
    assert main(["eval", "task", "--checkpoint", str(tmp_path / "ck"), "--task", "arithmetic:digits=1", "--n", "200",
                 "--k", "1", "--samples", "2", "--max-tokens", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["task"] == "arithmetic:digits=1" and res["n"] < 200 and res["checkpoint"] == str(tmp_path / "ck")
    assert set(res["greedy"]) >= {"accuracy", "mean_score", "ended_with_end_of_turn", "mean_tokens"}
    assert set(res["sampled"]) >= {"pass@1", "k", "samples", "temperature"}
    assert set(res["problems"][0]) >= {"prompt", "answer", "response", "correct", "ended", "tokens"}
    assert "greedy pass@1" in printed and f"holds only {res['n']} problems" in printed
    assert not (tmp_path / "res.json.tmp").exists()
