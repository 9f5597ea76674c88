"""Tools: the safe calculator (results and refusals, through the API and `lmforge tool run`), lookup, the Python API
for user-defined tools, tool calls decoded under the grammar (valid under jsonschema whatever the weights), and the
loop that runs calls and appends tool messages."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.infer.assistant import generate_reply, run_chat_turn, run_chat_turns, run_tool, tool_call_grammar
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.tools import (CALCULATOR, MAX_DEPTH, MAX_EXPRESSION_CHARS, Tool, ToolError, calculate, get_tools,
                                 lookup, schema_problem, to_openai, tool)
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer.chat import END, TOOL_CALL, render_chat
from lmforge.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(autouse=True)
def pytorch_decode_step(monkeypatch):
    """The chat mechanics do not depend on the decode kernel: use the PyTorch step (same logits) rather than wait
    for the native one to be compiled (a one-time build, minutes on a loaded machine)."""
    monkeypatch.setenv("LMFORGE_NATIVE", "0")


# ---- calculator: results --------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,expected", [
    ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("2 ** 100", str(2 ** 100)), ("-7 // 2", "-4"), ("-7 % 3", "2"),
    ("7 / 2", "3.5"), ("1 / 3 * 3", "1"), ("1 / 3", "0.333333333333333"), ("2 ** -2", "0.25"), ("-2 ** 2", "-4"),
    ("(-2) ** 3", "-8"), ("+4 - -4", "8"), ("1_000 * 3", "3000"), ("1.5 * 2", "3"), ("0.1 + 0.2", repr(0.1 + 0.2)),
    ("2 ** 0.5", repr(2 ** 0.5)), ("10 ** 20 / 3", "33333333333333333333.333333"), ("123456 / 7", "17636.5714285714"),
    ("2 ** 3000", str(2 ** 3000)), ("2 ** (7 // 2)", "8"), ("  12345678901234567890 * 98765432109876543210  ",
                                                             str(12345678901234567890 * 98765432109876543210)),
])
def test_calculator_results(expr, expected):
    assert calculate(expr) == expected


def test_calculator_agrees_with_exact_arithmetic_on_random_expressions():
    """Random integer expressions of + - * // % ** and /, against Python's ints and Fractions."""
    rng = random.Random(0)

    def gen(depth):
        if depth == 0 or rng.random() < 0.3:
            n = rng.randint(0, 10 ** rng.randint(1, 12))
            return str(n), Fraction(n)
        op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
        (ta, a), (tb, b) = gen(depth - 1), gen(depth - 1)
        if op == "**":
            tb, b = str(rng.randint(0, 5)), None
            b = Fraction(int(tb))
        if op in ("/", "//", "%") and b == 0:
            tb, b = "7", Fraction(7)
        value = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                 "//": lambda: Fraction(a // b), "%": lambda: a % b, "**": lambda: a ** int(b)}[op]()
        return f"({ta} {op} {tb})", value

    checked = 0
    for _ in range(300):
        text, value = gen(3)
        if max(abs(value.numerator), value.denominator) >= 10 ** 1000:
            continue
        got = calculate(text)
        if value.denominator == 1:
            assert got == str(value.numerator), text
        else:
            assert Fraction(got) == pytest.approx(value, rel=1e-14), text
        checked += 1
    assert checked > 250


# ---- calculator: refusals -------------------------------------------------------------------------------------
REFUSED = {
    "__import__('os')": "function calls",
    "__import__('os').system('true')": "",
    "(1).real": "attribute access",
    "x": "names",
    "x + 1": "names",
    "'a' * 3": "only numbers",
    "True + 1": "only numbers",
    "1j * 1j": "only numbers",
    "[1, 2]": "not allowed",
    "lambda: 1": "not allowed",
    "1 if 1 else 2": "not allowed",
    "3 @ 4": "operator",
    "~1": "operator",
    "1 < 2": "not allowed",
    "9**9**9": "digits",
    "10 ** 1000": "digits",
    "(10 ** 600) * (10 ** 600)": "digits",
    "2 ** 10 ** 10": "digits",
    "1e308 * 10": "too large",
    "1 / 0": "division by zero",
    "0 ** -1": "division by zero",
    "(-8) ** 0.5": "not a real number",
    "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1): "nested too deeply",
    "-" * (MAX_DEPTH + 1) + "1": "nested too deeply",
    "1" + "+1" * MAX_EXPRESSION_CHARS: "too long",
    "": "empty",
    "1 +": "not an arithmetic expression",
    "1; 2": "not an arithmetic expression",
}


@pytest.mark.parametrize("expr", list(REFUSED), ids=[e if len(e) < 30 else e[:20] + "..." for e in REFUSED])
def test_calculator_refuses(expr):
    t0 = time.perf_counter()
    with pytest.raises(ToolError) as e:
        calculate(expr)
    assert time.perf_counter() - t0 < 1.0                  # refused before computing anything huge
    assert REFUSED[expr] in str(e.value) and "\n" not in str(e.value)


def test_chains_are_not_nesting():
    assert calculate("+".join(["1"] * 100)) == "100"       # 100 terms, left to right: not 100 levels deep
    assert calculate("(" * MAX_DEPTH + "2" + ")" * MAX_DEPTH) == "2"


@pytest.mark.parametrize("expr,why", [("__import__('os')", "function calls"), ("(1).real", "attribute access"),
                                      ("x", "names"), ("9**9**9", "digits"), ("(" * 40 + "1" + ")" * 40, "nested"),
                                      ("1+" * 200 + "1", "longer than 256")],
                         ids=["import", "attribute", "name", "huge-power", "deep", "long"])
def test_tool_run_refuses_in_one_line(expr, why, capsys):
    rc = main(["tool", "run", "calculator", json.dumps({"expression": expr})])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: calculator: ") and why in lines[0]


def test_tool_run_prints_the_result(capsys):
    assert main(["tool", "run", "calculator", '{"expression": "2**64 - 1"}']) == 0
    assert capsys.readouterr().out == f"{2 ** 64 - 1}\n"
    assert main(["tool", "run", "lookup", '{"query": "assert statement"}']) == 0
    assert 'The "assert" statement' in capsys.readouterr().out


def test_tool_run_as_a_real_program():
    """The installed entry point: exit code 2, one line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "lmforge", "tool", "run", "calculator",
                        '{"expression": "__import__(\'os\').system(\'echo pwned\')"}'],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "pwned" not in p.stderr
    assert p.stderr.count("\n") == 1 and "function calls are not allowed" in p.stderr


# ---- lookup ---------------------------------------------------------------------------------------------------
def test_lookup_finds_the_topic():
    assert lookup("assert statement").startswith('[The "assert" statement]')
    assert "[Lambdas]" in lookup("lambda anonymous function")
    assert len(lookup("import module")) < 1000
    assert lookup("zzzqqq").startswith("no passage matches")
    with pytest.raises(ToolError):
        lookup("  ?! ")


# ---- the Python API -------------------------------------------------------------------------------------------
def test_user_defined_tools():
    @tool(parameters={"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                      "required": ["city"], "additionalProperties": False})
    def forecast(city: str, days: int = 1):
        """Weather forecast for a city.

        More words."""
        return {"city": city, "days": days, "sky": "clear"}

    assert isinstance(forecast, Tool) and forecast.name == "forecast"
    assert forecast.description == "Weather forecast for a city."
    assert json.loads(forecast.run({"city": "Oslo", "days": 3})) == {"city": "Oslo", "days": 3, "sky": "clear"}
    assert json.loads(forecast.run('{"city": "Rome"}'))["days"] == 1
    for bad, why in [({"days": 2}, "required argument 'city'"), ({"city": "Oslo", "days": 9}, "out of range"),
                     ({"city": 3}, "type string"), ({"city": "x", "when": 1}, "unknown argument 'when'"),
                     ("{nope", "not valid JSON")]:
        with pytest.raises(ToolError, match=why):
            forecast.run(bad)
    assert to_openai(forecast) == {"type": "function", "function": {
        "name": "forecast", "description": "Weather forecast for a city.", "parameters": forecast.parameters}}

    double = tool(lambda n: str(2 * n), {"type": "object", "properties": {"n": {"type": "integer"}}},
                  name="double", description="Twice n.")
    assert double.run({"n": 21}) == "42" and to_openai(double)["function"]["name"] == "double"
    with pytest.raises(Exception, match="tool name"):
        tool(lambda: "", name="no spaces allowed")
    with pytest.raises(Exception, match="unknown tool"):
        get_tools("calculator,nope")
    assert [t.name for t in get_tools("lookup, calculator")] == ["lookup", "calculator"]


@pytest.mark.parametrize("value", [{"expression": "1"}, {}, {"expression": 1}, {"expression": "1", "x": 2},
                                   {"expression": "1" * (MAX_EXPRESSION_CHARS + 1)}, [], "s"])
def test_schema_check_agrees_with_jsonschema(value):
    valid = jsonschema.Draft202012Validator(CALCULATOR.parameters).is_valid(value)
    assert (schema_problem(CALCULATOR.parameters, value) is None) == valid


# ---- tool calls from a model ----------------------------------------------------------------------------------
TEXT = "The quick brown fox jumps over the lazy dog. 12 + 34 = 46. What is 7 * 8? It is 56.\n"


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.train([TEXT * 30], vocab_size=256 + 16 + 40, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=32,
                                    max_seq_len=2048, init_std=0.3))
    return model.eval(), tok


ADD = tool(lambda a, b: str(a + b), {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                     "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}, name="add", description="a + b")
UNITS = tool(lambda value, unit, exact, tags: f"{value} {unit}", {
    "type": "object", "properties": {"value": {"type": "number", "minimum": 0, "maximum": 1000},
                                     "unit": {"enum": ["m", "km", "mi"]}, "exact": {"type": "boolean"},
                                     "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                              "maxItems": 2}},
    "required": ["value", "unit", "exact", "tags"], "additionalProperties": False}, name="units", description="")


def _prompt(tok, tools, text="What is 12345 * 6789?"):
    return render_chat(tok, [{"role": "user", "content": text}], [to_openai(t) for t in tools],
                       add_generation_prompt=True)[0]


def _split(ids, sep):
    out = [[]]
    for t in ids:
        if t == sep:
            out.append([])
        else:
            out[-1].append(t)
    return out


def test_forced_calls_from_random_weights_always_validate(tiny):
    """Untrained weights, sampled at several temperatures: every call parses and validates against its tool's
    schema, and the reply is exactly the chat format's calls and <|end|>."""
    model, tok = tiny
    tools = [ADD, UNITS]
    engine, grammar = Engine(model, tok), tool_call_grammar(tok, tools)
    schemas = {t.name: t.parameters for t in tools}
    prompt = _prompt(tok, tools)
    n_calls, finishes = 0, []
    for seed in range(8):
        params = SamplingParams(seed=seed, temperature=[0.7, 1.0, 1.5][seed % 3], max_tokens=400)
        r = generate_reply(engine, tok, prompt, params, tools, tool_choice="required", grammar=grammar)
        finishes.append(r.finish_reason)
        if r.finish_reason != "stop":  # cut by the budget (random weights may chain many calls): no call kept
            assert r.finish_reason == "length" and r.tool_calls == [] and len(r.token_ids) == 400
            continue
        assert r.tool_calls and r.token_ids[-1] == tok.special_tokens[END]
        for c in r.tool_calls:
            jsonschema.validate(c["arguments"], schemas[c["name"]])
        # the reply's tokens are exactly the chat format: (<|tool_call|>{json})+ <|end|>, nothing else
        tc, end = tok.special_tokens[TOOL_CALL], tok.special_tokens[END]
        assert r.token_ids[0] == tc and r.token_ids.count(tc) == len(r.tool_calls) and r.token_ids.count(end) == 1
        segments = [tok.decode(seg) for seg in _split(r.token_ids[1:-1], tc)]
        assert [json.loads(s) for s in segments] == r.tool_calls
        assert all(s.startswith('{"name": "') and ", " in s and "\n" not in s for s in segments)  # compact layout
        n_calls += len(r.tool_calls)
    assert finishes.count("stop") >= 6 and n_calls >= 6


def test_builtin_calls_validate_or_are_dropped_when_cut(tiny):
    """Long free strings (calculator, lookup) from random weights: a call that completes validates; a reply cut by
    its budget inside a call keeps no call."""
    model, tok = tiny
    tools = get_tools("calculator,lookup")
    engine, grammar = Engine(model, tok), tool_call_grammar(tok, tools)
    prompt = _prompt(tok, tools)
    finishes = []
    for seed in range(16):
        r = generate_reply(engine, tok, prompt, SamplingParams(seed=seed, max_tokens=300), tools,
                           tool_choice="required", grammar=grammar)
        finishes.append(r.finish_reason)
        if r.finish_reason == "stop":
            assert r.tool_calls
            for c in r.tool_calls:
                jsonschema.validate(c["arguments"], {t.name: t.parameters for t in tools}[c["name"]])
        else:
            assert r.finish_reason == "length" and r.tool_calls == [] and len(r.token_ids) == 300
    assert "stop" in finishes


def test_a_call_the_model_starts_by_itself(tiny):
    """tool_choice auto: the model emits <|tool_call|> in its text phase (pushed there by a logit bias), the call
    is decoded under the grammar (the bias does not apply to it), and the text before it is the content."""
    model, tok = tiny
    tc = tok.special_tokens[TOOL_CALL]
    params = SamplingParams(seed=1, max_tokens=200, logit_bias={tc: 100.0})
    r = generate_reply(Engine(model, tok), tok, _prompt(tok, [ADD]), params, [ADD])
    assert r.finish_reason == "stop" and r.content == "" and r.token_ids[0] == tc
    assert len(r.tool_calls) >= 1 and all(c["name"] == "add" for c in r.tool_calls)
    # without tools (or tool_choice none) the same token just ends the reply
    r = generate_reply(Engine(model, tok), tok, _prompt(tok, [ADD]), params, [ADD], tool_choice="none")
    assert (r.content, r.tool_calls, r.token_ids, r.finish_reason) == ("", [], [tc], "stop")


def test_replies_stop_at_end_or_budget(tiny):
    model, tok = tiny
    engine = Engine(model, tok)
    end = tok.special_tokens[END]
    prompt = _prompt(tok, [])
    for seed in range(4):
        r = generate_reply(engine, tok, prompt, SamplingParams(seed=seed, max_tokens=30))
        assert (r.finish_reason == "stop" and tok.is_special(r.token_ids[-1])) or \
            (r.finish_reason == "length" and len(r.token_ids) == 30)
        assert r.finish_reason == "length" or r.token_ids[-1] == end or r.token_ids[-1] in tok.special_tokens.values()


def test_the_loop_runs_calls_and_appends_tool_messages(tiny):
    model, tok = tiny
    seen = []

    def add(a, b):
        seen.append((a, b))
        return str(a + b)

    add_tool = Tool("add", "a + b", ADD.parameters, add)
    boom = tool(lambda: 1 / 0, {"type": "object", "properties": {}}, name="boom", description="fails")
    calc = Tool("calculator", "", {"type": "object", "properties": {"expression": {"enum": ["2**10", "x"]}},
                                   "required": ["expression"], "additionalProperties": False}, calculate)
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Add 3 and 4."}]
    events = []
    new = run_chat_turn(model, tok, messages, [add_tool, boom, calc], SamplingParams(seed=3, max_tokens=300),
                        max_tool_rounds=1, tool_choice="required", on_event=lambda k, v: events.append((k, v)))
    assert messages == [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Add 3 and 4."}]
    first, *tool_msgs, last = new
    assert first["role"] == "assistant" and first["tool_calls"]
    assert [m["role"] for m in tool_msgs] == ["tool"] * len(first["tool_calls"])
    for call, result in zip(first["tool_calls"], tool_msgs):
        name, args = call["function"]["name"], call["function"]["arguments"]
        assert result["tool_call_id"] == call["id"] and result["name"] == name
        if name == "add":
            assert result["content"] == str(args["a"] + args["b"])
        elif name == "boom":
            assert result["content"] == "error: ZeroDivisionError: division by zero"
        else:
            assert result["content"] == ("1024" if args["expression"] == "2**10" else
                                         "error: calculator: names are not allowed ('x'): only numbers and "
                                         "+ - * / // % ** ( )")
    assert seen == [tuple(c["function"]["arguments"].values()) for c in first["tool_calls"]
                    if c["function"]["name"] == "add"]
    assert last["role"] == "assistant" and "tool_calls" not in last    # the round after the last: no tools
    assert [k for k, _ in events if k in ("tool_call", "tool_result")] == \
        ["tool_call"] * len(tool_msgs) + ["tool_result"] * len(tool_msgs)
    assert events[-1][0] == "finish"
    render_chat(tok, messages + new, [to_openai(add_tool)])             # the transcript is a valid conversation


def test_max_tool_rounds(tiny):
    """A model that always calls: exactly max_tool_rounds rounds, then a reply that may not call."""
    model, tok = tiny
    tc = tok.special_tokens[TOOL_CALL]
    only = Tool("answer", "", {"type": "object", "properties": {"n": {"enum": [42]}}, "required": ["n"],
                               "additionalProperties": False}, lambda n: f"n={n}")
    new = run_chat_turn(Engine(model, tok), tok, [{"role": "user", "content": "go"}], [only],
                        SamplingParams(temperature=0, max_tokens=60, logit_bias={tc: 100.0}), max_tool_rounds=2)
    roles = [m["role"] for m in new]
    assert roles[-1] == "assistant" and new[-1] == {"role": "assistant", "content": ""}
    assert roles.count("assistant") == 3 and all(m["content"] == "n=42" for m in new if m["role"] == "tool")
    ids = [c["id"] for m in new for c in m.get("tool_calls", [])]
    assert len(ids) == len(set(ids)) == roles.count("tool")


def test_many_turns_at_once_equal_each_turn_alone(tiny):
    """run_chat_turns shares one engine batch among conversations whose turns are at different phases (text,
    calls under the grammar, after tool results); each gets exactly what run_chat_turn gives it alone."""
    model, tok = tiny
    tc = tok.special_tokens[TOOL_CALL]
    tools = [ADD]
    convs = [[{"role": "user", "content": f"Add {i} and {2 * i}."}] for i in range(6)]
    params = [SamplingParams(seed=10 + i, temperature=1.0, max_tokens=120,
                             logit_bias={tc: 100.0} if i % 2 else None) for i in range(6)]
    events = []
    together = run_chat_turns(model, tok, convs, tools, params, max_tool_rounds=2,
                              on_event=lambda i, k, v: events.append((i, k)), max_batch=4)
    alone = [run_chat_turn(Engine(model, tok), tok, c, tools, p, max_tool_rounds=2) for c, p in zip(convs, params)]
    assert together == alone
    assert sum(m["role"] == "tool" for new in together for m in new) >= 3      # the odd ones called tools
    assert sorted(i for i, k in events if k == "finish") == list(range(6))
    # one params for all: greedy, the same as alone too
    greedy = SamplingParams(temperature=0, max_tokens=40, logit_bias={tc: 100.0})
    assert run_chat_turns(Engine(model, tok, max_batch=8), tok, convs[:3], tools, greedy, max_tool_rounds=1) == \
        [run_chat_turn(model, tok, c, tools, greedy, max_tool_rounds=1) for c in convs[:3]]
    with pytest.raises(ConfigError, match="2 sampling params for 6 conversations"):
        run_chat_turns(model, tok, convs, tools, params[:2])


def test_run_tool_never_raises():
    assert run_tool({}, "nope", {}) == "error: no tool named 'nope'"
    assert run_tool({"calculator": CALCULATOR}, "calculator", {"expression": "9**9**9"}).startswith("error: ")
    long = tool(lambda: "x" * 5000, {"type": "object", "properties": {}}, name="long")
    assert len(run_tool({"long": long}, "long", {})) == 2000


def test_a_template_of_its_own_ends_replies_at_its_end_of_turn_token(tiny, tmp_path):
    """An imported model's template: the reply stops at that template's end-of-turn token (here <|pad|>, which
    nothing else would stop at); tool calls need lmforge's format and are refused in one line."""
    model, tok = tiny
    tok.save(tmp_path / "tok")
    own = Tokenizer.load(tmp_path / "tok")     # a copy, given a template of its own
    own.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|pad|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    pad = own.special_tokens["<|pad|>"]
    prompt = render_chat(own, [{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]
    assert prompt[-1] == own.special_tokens["<|assistant|>"] and pad in prompt
    engine = Engine(model, own)
    r = generate_reply(engine, own, prompt, SamplingParams(temperature=0, max_tokens=20, logit_bias={pad: 100.0}))
    assert (r.content, r.token_ids, r.finish_reason) == ("", [pad], "stop")
    new = run_chat_turn(engine, own, [{"role": "user", "content": "hi"}],
                        params=SamplingParams(seed=0, max_tokens=20))
    assert len(new) == 1 and new[0]["role"] == "assistant"
    with pytest.raises(Exception, match="lmforge's chat tokens"):
        run_chat_turn(engine, own, [{"role": "user", "content": "hi"}], ["calculator"])

