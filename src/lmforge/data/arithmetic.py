"""`arithmetic`: lmforge's own task family, integer problems such as "What is 47 + 385?".

    arithmetic                        operands of up to 2 digits, + and -
    arithmetic:digits=3               up to 3 digits (the difficulty)
    arithmetic:digits=3,ops=+-*       also products ('x' works for '*' too)
    arithmetic:digits=5,tools=true    demonstrations call the calculator tool instead of answering at once
    arithmetic:digits=2,restate=true  demonstrations restate the problem before the answer: "47 + 38 = 85"
    arithmetic:digits=2,restate=pad   ... with fixed-width numbers: "47 + 08 = 055" (each digit of the answer sits
                                      at the same distance from the digits it depends on)
    arithmetic:digits=3,turns=4       four problems per training conversation (a multi-turn chat): the tool
                                      declaration, the long part of a tools=true prompt, is paid once per four

Operands are drawn uniformly from 0 .. 10**digits - 1; a difference may be negative. The canonical text of a
problem is its expression ("47+385"), which decides its split (problems.split_of), so the held-out problems of
`arithmetic:digits=2` never appear in the training split of any arithmetic source. A space of at most
ENUMERATE problems is listed whole and shuffled by the seed (exact, no repeats within an eval draw); a larger one
is sampled.

The scorer takes the LAST number in the response ("47 + 385 = 432" counts as 432; thousands commas and a
trailing ".0" are read as numbers) and compares it with the exact result.
"""
from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation

from lmforge.data.problems import Problem, TaskFamily, check_split, parse_bool, parse_options, split_of
from lmforge.errors import ConfigError

OPS = "+-*"
MAX_DIGITS = 9
MAX_TURNS = 16
ENUMERATE = 200_000            # problem spaces up to this size are listed whole

# The calculator as the demonstrations declare it (OpenAI `tools` shape): the same declaration as the runtime
# tool lmforge.infer.tools.CALCULATOR (tests hold them equal), since the model sees it in every prompt. The results
# the demonstrations show are computed here, exactly (data does not import infer).
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Exact arithmetic: + - * / // % ** ( )",
        "parameters": {"type": "object",
                       "properties": {"expression": {"type": "string", "maxLength": 256}},
                       "required": ["expression"], "additionalProperties": False},
    },
}

# A number: its minus counts only when it is not a binary minus ("3-5" ends in 5, "= -338" in -338); thousands
# commas only in groups of three; digits glued to letters count ("x=12", "答案432").
_FINAL = re.compile(r"((?:(?<![\w.)])[-\u2212])?)(?<![\d.])((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?!\d)")


def final_number(text: str) -> Decimal | None:
    """The last number in `text` (see the module docstring), or None."""
    last = None
    for m in _FINAL.finditer(text):
        last = m
    if last is None:
        return None
    try:
        value = Decimal(last.group(2).replace(",", ""))
    except InvalidOperation:
        return None
    return -value if last.group(1) else value


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class ArithmeticFamily(TaskFamily):
    def __init__(self, digits: int = 2, ops: str = "+-", tools: bool = False, source: str | None = None,
                 restate: bool | str = False, turns: int = 1):
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
            raise ConfigError(f"{source or 'arithmetic'!r}: digits must be an integer in 1..{MAX_DIGITS}, "
                              f"got {digits!r}", field="source")
        norm = "".join(dict.fromkeys("*" if c in "x\u00d7" else c for c in ops if not c.isspace()))
        if not norm or any(c not in OPS for c in norm):
            raise ConfigError(f"{source or 'arithmetic'!r}: ops must be made of + - * (or x), got {ops!r}",
                              field="source")
        self.digits, self.ops = digits, "".join(c for c in OPS if c in norm)   # canonical order
        self.tools = [CALCULATOR_TOOL] if tools else None
        # restate: the answer copies the operands first, so each answer digit is computed next to the digits it
        # depends on, and the copying is the same skill a calculator call needs; the scorer reads the last number
        self.restate = restate
        if isinstance(turns, bool) or not isinstance(turns, int) or not 1 <= turns <= MAX_TURNS:
            raise ConfigError(f"{source or 'arithmetic'!r}: turns must be an integer in 1..{MAX_TURNS}, "
                              f"got {turns!r}", field="source")
        self.turns = turns
        opts = [f"digits={digits}"] + ([f"ops={self.ops}"] if self.ops != "+-" else []) + \
            (["tools=true"] if tools else []) + ([f"restate={'pad' if restate == 'pad' else 'true'}"] if restate
                                                 else []) + \
            ([f"turns={turns}"] if turns != 1 else [])
        self.name = "arithmetic:" + ",".join(opts)
        self.description = (f"integer {' '.join(self.ops)} with operands of up to {digits} digits"
                            + (", demonstrations call the calculator" if tools else "")
                            + (", answers restate the problem" if restate else "")
                            + (f", {turns} problems per conversation" if turns != 1 else ""))

    @classmethod
    def from_options(cls, text: str, source: str) -> "ArithmeticFamily":
        opts = parse_options(text, source, {"digits": "N (1..9, default 2)", "ops": "+-* (default +-)",
                                            "tools": "true|false", "restate": "true|pad|false",
                                            "turns": "N (1..16, default 1)"})
        try:
            digits = int(opts.get("digits", "2"))
        except ValueError:
            raise ConfigError(f"{source!r}: digits expects an integer, got {opts['digits']!r}",
                              field="source") from None
        tools = parse_bool(opts["tools"], source, "tools") if "tools" in opts else False
        restate = opts.get("restate", "false")
        restate = "pad" if restate.strip().lower() == "pad" else parse_bool(restate, source, "restate")
        try:
            turns = int(opts.get("turns", "1"))
        except ValueError:
            raise ConfigError(f"{source!r}: turns expects an integer, got {opts['turns']!r}",
                              field="source") from None
        return cls(digits, opts.get("ops", "+-"), tools, source=source, restate=restate, turns=turns)

    # ---- the problem space
    @property
    def space(self) -> int:
        return len(self.ops) * 10 ** (2 * self.digits)

    def make(self, a: int, op: str, b: int) -> Problem:
        key = f"{a}{op}{b}"
        return Problem([{"role": "user", "content": f"What is {a} {op} {b}?"}], str(_apply(a, op, b)), key,
                       {"a": a, "op": op, "b": b, "expression": key})

    def iter_problems(self, split: str, seed: int) -> Iterator[Problem]:
        check_split(split)
        rng = random.Random(f"arithmetic:{seed}:{split}")     # str seeds hash the same on every run
        if self.space <= ENUMERATE:
            items = list(_enumerated(self.digits, self.ops, split))
            if not items:
                return
            while True:           # eval: one pass over distinct problems; train: endless reshuffled epochs
                order = items[:]
                rng.shuffle(order)
                for a, op, b in order:
                    yield self.make(a, op, b)
                if split == "eval":
                    return
        top, seen, misses = 10 ** self.digits, set(), 0
        while misses < 100_000:   # the eval space is at least ENUMERATE/10 problems: misses end only a huge draw
            a, op, b = rng.randrange(top), rng.choice(self.ops), rng.randrange(top)
            key = f"{a}{op}{b}"
            if split_of(key) != split or (split == "eval" and key in seen):
                misses += 1
                continue
            misses = 0
            if split == "eval":
                seen.add(key)
            yield self.make(a, op, b)

    # ---- scoring and demonstrations
    def score(self, problem: Problem, response: str) -> float:
        got = final_number(response or "")
        return 1.0 if got is not None and got == Decimal(problem.answer) else 0.0

    def demonstration(self, problem: Problem, tools: bool = False) -> list[dict]:
        msgs = [dict(m) for m in problem.messages]
        answer = problem.answer
        if self.restate:
            m = problem.meta
            a, b, c = m["a"], m["b"], int(problem.answer)
            if self.restate == "pad":     # operands at `digits` digits, the result one wider (a sum's carry)
                w = self.digits
                answer = f"{a:0{w}d} {m['op']} {b:0{w}d} = {'-' if c < 0 else ''}{abs(c):0{w + 1}d}"
            else:
                answer = f"{a} {m['op']} {b} = {c}"
        if not tools:
            return msgs + [{"role": "assistant", "content": answer}]
        expression = problem.meta["expression"]
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
        return msgs + [{"role": "assistant", "content": "", "tool_calls": [call]},
                       {"role": "tool", "content": problem.answer},
                       {"role": "assistant", "content": answer}]


    def miscopied(self, problem: Problem, rng) -> list[dict] | None:
        """The tool demonstration with one operand miscopied into the call (a digit dropped, added, changed by one
        or swapped with its neighbour); the tool's result and the answer are those of the wrong call."""
        m = problem.meta
        a, b = str(m["a"]), str(m["b"])
        for _ in range(20):
            a2, b2 = (miscopy(a, rng), b) if rng.random() < 0.5 else (a, miscopy(b, rng))
            if (a2, b2) != (a, b):
                break
        else:
            return None
        wrong = Problem(problem.messages, str(_apply(int(a2), m["op"], int(b2))), problem.key,
                        {**m, "a": int(a2), "b": int(b2), "expression": f"{a2}{m['op']}{b2}"})
        return self.demonstration(wrong, tools=True)


def miscopy(digits: str, rng) -> str:
    """A digit string copied wrongly: one digit dropped, added, changed by one, or swapped with its neighbour."""
    d = list(digits)
    i = rng.randrange(len(d))
    kind = rng.randrange(4)
    if kind == 0 and len(d) > 1:
        del d[i]
    elif kind == 1:
        d[i] = str((int(d[i]) + rng.choice((1, 9))) % 10)
    elif kind == 2 and len(d) > 1:
        j = min(i + 1, len(d) - 1)
        d[j - 1], d[j] = d[j], d[j - 1]
    else:
        d.insert(i, str(rng.randrange(10)))
    return "".join(d).lstrip("0") or "0"


@functools.lru_cache(maxsize=16)
def _enumerated(digits: int, ops: str, split: str) -> tuple[tuple[int, str, int], ...]:
    top = 10 ** digits
    return tuple((a, op, b) for op in ops for a in range(top) for b in range(top)
                 if split_of(f"{a}{op}{b}") == split)
