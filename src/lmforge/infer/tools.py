"""Tools a chat model may call: the `Tool` record, a Python API for your own, and the built-ins.

    from lmforge.infer.tools import tool, to_openai, builtin_tools

    @tool(parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    def weather(city: str) -> str:
        "Today's weather in a city."
        return f"sunny in {city}"

    weather.run({"city": "Oslo"})       # -> "sunny in Oslo"; arguments are checked against the schema first
    to_openai(weather)                  # -> the entry of an OpenAI `tools` list

A tool is a function called with the keyword arguments of its JSON-schema `parameters`; what it returns becomes
the content of the `tool` message (a string as it is, anything else as JSON). A tool refuses an input by raising
`ToolError`, one line that the chat loop hands back to the model ("error: ...") and `lmforge tool run` prints
(exit 2).

Built-ins (`builtin_tools()`):
  calculator {"expression"}  arithmetic through a safe evaluator: an `ast` walk that allows numbers, + - * / // %
                             **, unary + -, and parentheses; never `eval`. Sizes are bounded before computing.
  lookup     {"query"}       the best passages of the Python language reference (the `python-docs` corpus),
                             ranked by BM25.
"""
from __future__ import annotations

import ast
import decimal
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from lmforge.errors import ConfigError, LmforgeError


class ToolError(LmforgeError):
    """A tool refused its input or failed: one line, handed to the model as the tool's result."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict                 # JSON schema of the arguments object
    function: Callable[..., Any]     # called with the arguments as keyword arguments

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", self.name):
            raise ConfigError(f"a tool name is 1-64 letters, digits, '_', '.', '-' (not starting with a digit), "
                              f"got {self.name!r}", field="name")
        if not isinstance(self.parameters, dict) or self.parameters.get("type") != "object":
            raise ConfigError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'",
                              field="parameters")
        if not callable(self.function):
            raise ConfigError(f"tool {self.name!r}: function is not callable", field="function")

    def run(self, arguments: dict | str) -> str:
        """Check `arguments` (a dict or its JSON text) against the schema, call the function, return its result
        as text. Bad arguments and refusals raise ToolError; other exceptions of the function pass through."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ToolError(f"{self.name}: the arguments are not valid JSON: {e.msg}") from None
        problem = schema_problem(self.parameters, arguments)
        if problem:
            raise ToolError(f"{self.name}: {problem}")
        out = self.function(**arguments)
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)


def tool(fn: Callable | None = None, parameters: dict | None = None, *, name: str | None = None,
         description: str | None = None):
    """A Tool from a function and the JSON schema of its arguments: `tool(fn, schema)`, or as a decorator,
    `@tool(parameters=schema)`. The name defaults to the function's, the description to its docstring's first
    line."""
    def make(f: Callable) -> Tool:
        doc = (f.__doc__ or "").strip().splitlines()
        return Tool(name or f.__name__, description if description is not None else (doc[0] if doc else ""),
                    parameters if parameters is not None else {"type": "object", "properties": {}}, f)
    return make if fn is None else make(fn)


def to_openai(t: Tool) -> dict:
    """The tool as an entry of an OpenAI `tools` list (what the chat template renders)."""
    return {"type": "function", "function": {"name": t.name, "description": t.description,
                                             "parameters": t.parameters}}


# ---- a JSON-schema check for arguments that do not come from the constrained decoder (`lmforge tool run`) ----
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES.get(t, ()))


def schema_problem(schema: dict, value, where: str = "arguments") -> str | None:
    """What is wrong with `value` under `schema`, or None. The keywords tool schemas use: type, properties,
    required, additionalProperties, items, enum, const, minLength/maxLength, minimum/maximum. The model's calls
    need no check: the constrained decoder makes them valid under the whole schema."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, t) for t in types):
            return f"{where} must be of type {' or '.join(types)}, got {json.dumps(value)[:40]}"
    if "const" in schema and value != schema["const"]:
        return f"{where} must be {json.dumps(schema['const'])}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {json.dumps(schema['enum'])}"
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", math.inf):
            return f"{where} is longer than {schema['maxLength']} characters"
        if len(value) < schema.get("minLength", 0):
            return f"{where} is shorter than {schema['minLength']} characters"
    if _is_type(value, "number"):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            return f"{where} is out of range [{schema.get('minimum', '')}, {schema.get('maximum', '')}]"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            if (p := schema_problem(schema["items"], item, f"{where}[{i}]")):
                return p
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"the required argument '{key}' is missing"
        for key, item in value.items():
            if key in props:
                if (p := schema_problem(props[key], item, f"'{key}'")):
                    return p
            elif schema.get("additionalProperties", True) is False:
                return f"unknown argument '{key}' (expected: {', '.join(props) or 'none'})"
            elif isinstance(schema.get("additionalProperties"), dict):
                if (p := schema_problem(schema["additionalProperties"], item, f"'{key}'")):
                    return p
    return None


# ---------------------------------------------------------------------------------------------------------------
# calculator: a safe arithmetic evaluator
#
# Numbers are exact while they can be: integers stay integers of any size (within the bound below), and `/` of
# exact numbers gives an exact fraction (so 1/3*3 is 1). A float literal makes the result a float, as in Python.
# The result is printed as an integer when it is whole, else as a decimal: floats as Python prints them,
# fractions rounded to 15 significant digits (and at least 6 decimals).
# Refused, with a one-line reason: names, calls, attribute access, strings and every other syntax; inputs over
# MAX_EXPRESSION_CHARS; nesting deeper than MAX_DEPTH (parentheses or unary signs; a long left-to-right chain
# such as 1+2+3+... is not nesting); any number over MAX_DIGITS digits, checked BEFORE a power or product is
# computed (so 9**9**9 is refused at once, not after hours); division by zero, non-finite and complex results.

MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 32
MAX_DIGITS = 1000          # an integer result (or a fraction's numerator/denominator) has at most this many digits

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**"}


def _refuse(why: str):
    raise ToolError(f"calculator: {why}")


def _digits(x) -> float:
    """log10 of an exact number's larger part (numerator or denominator): it has more than MAX_DIGITS digits
    exactly when this is >= MAX_DIGITS. 0 for floats (their size is checked by overflow instead)."""
    if isinstance(x, float):
        return 0.0
    n = abs(x.numerator)
    return max(math.log10(n) if n else 0.0, math.log10(x.denominator))


def _check_size(x):
    if isinstance(x, float):
        if not math.isfinite(x):
            _refuse("the result is too large (overflow)")
        return x
    if _digits(x) >= MAX_DIGITS:
        _refuse(f"a number has more than {MAX_DIGITS} digits")
    return Fraction(x)  # int results of // and % stay exact numbers


def _power(a, b):
    if isinstance(b, Fraction) and b.denominator == 1 and not isinstance(a, float):
        if a == 0 and b < 0:
            _refuse("division by zero")
        # an exact power has log10|result| = |b| * log10|a|: refuse before computing it
        if abs(a) != 1 and abs(b) * _digits(a) >= MAX_DIGITS + 1:
            _refuse(f"the result would have more than {MAX_DIGITS} digits")
        return a ** int(b)
    try:  # a fractional or float exponent: computed in floats
        r = float(a) ** float(b)
    except OverflowError:
        _refuse("the result is too large (overflow)")
    except ZeroDivisionError:
        _refuse("division by zero")
    if isinstance(r, complex):
        _refuse("the result is not a real number")
    return r


def _apply(op: str, a, b):
    if op == "*" and _digits(a) + _digits(b) >= MAX_DIGITS + 1:
        _refuse(f"the result would have more than {MAX_DIGITS} digits")
    try:
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b
        if op == "//":
            return a // b
        if op == "%":
            return a % b
        return _power(a, b)
    except ZeroDivisionError:
        _refuse("division by zero")
    except OverflowError:
        _refuse("the result is too large (overflow)")


def _eval(node: ast.AST, depth: int):
    if depth > MAX_DEPTH:
        _refuse(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)")
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            _refuse(f"only numbers are allowed, not {type(v).__name__} {v!r}"[:120])
        return _check_size(Fraction(v) if isinstance(v, int) else v)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand, depth + 1)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        # the left operand of a chain (1+2+3 is ((1+2)+3)) is a sequence, not nesting: same depth
        a, b = _eval(node.left, depth), _eval(node.right, depth + 1)
        return _check_size(_apply(_BINOPS[type(node.op)], a, b))
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        _refuse(f"the operator {type(node.op).__name__} is not allowed: only + - * / // % **")
    if isinstance(node, ast.Name):
        _refuse(f"names are not allowed ({node.id!r}): only numbers and + - * / // % ** ( )")
    if isinstance(node, ast.Call):
        _refuse("function calls are not allowed: only numbers and + - * / // % ** ( )")
    if isinstance(node, ast.Attribute):
        _refuse("attribute access is not allowed: only numbers and + - * / // % ** ( )")
    _refuse(f"{type(node).__name__} is not allowed: only numbers and + - * / // % ** ( )")


def _format(x) -> str:
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)
    if x.denominator == 1:
        return str(x.numerator)
    with decimal.localcontext() as ctx:  # a fraction: 15 significant digits, at least 6 decimals
        ctx.prec = max(15, len(str(abs(x.numerator) // x.denominator)) + 6)
        return format((decimal.Decimal(x.numerator) / decimal.Decimal(x.denominator)).normalize(), "f")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression safely (see the rules above this function); the result as text."""
    if not isinstance(expression, str):
        _refuse("the expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        _refuse(f"the expression is too long ({len(expression)} characters, at most {MAX_EXPRESSION_CHARS})")
    if not expression.strip():
        _refuse("the expression is empty")
    depth = 0  # parentheses leave no node in the tree: count them on the text, before the parser sees them
    for c in expression:
        depth += (c in "([{") - (c in ")]}")
        if depth > MAX_DEPTH:
            _refuse(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        _refuse(f"not an arithmetic expression ({getattr(e, 'msg', e)})")
    except (RecursionError, MemoryError):
        _refuse(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)")
    return _format(_eval(tree.body, 0))


CALCULATOR = Tool(
    # short: the declaration is in every prompt that offers the tool, and most of a small model's tool demo
    "calculator", "Exact arithmetic: + - * / // % ** ( )",
    {"type": "object",
     "properties": {"expression": {"type": "string", "maxLength": MAX_EXPRESSION_CHARS}},
     "required": ["expression"], "additionalProperties": False},
    calculate)


# ---------------------------------------------------------------------------------------------------------------
# lookup: BM25 over passages of the Python language reference (the built-in `python-docs` corpus)

LOOKUP_PASSAGE_CHARS = 400    # passages are paragraphs merged up to this size
LOOKUP_RESULTS = 2            # how many passages a lookup returns
_WORD = re.compile(r"[a-z0-9_]+")


class _Index:
    """An inverted index of passages with BM25 scores (k1 = 1.2, b = 0.75, Robertson/Sparck Jones idf)."""

    def __init__(self, passages: list[tuple[str, str]]):
        self.passages = passages
        self.postings: dict[str, list[tuple[int, int]]] = {}
        self.lengths = []
        for i, (title, text) in enumerate(passages):
            # the topic's title counts thrice: a passage is about its topic even where it does not say so
            counts = Counter(_WORD.findall(f"{title} {title} {title} {text}".lower()))
            self.lengths.append(sum(counts.values()))
            for w, c in counts.items():
                self.postings.setdefault(w, []).append((i, c))
        self.avg = sum(self.lengths) / max(len(self.lengths), 1)

    def search(self, query: str, k: int) -> list[int]:
        n, scores = len(self.passages), Counter()
        for w in set(_WORD.findall(query.lower())):
            post = self.postings.get(w, [])
            idf = math.log(1 + (n - len(post) + 0.5) / (len(post) + 0.5))
            for i, c in post:
                scores[i] += idf * c * 2.2 / (c + 1.2 * (0.25 + 0.75 * self.lengths[i] / self.avg))
        return [i for i, s in scores.most_common(k) if s > 0]


def _passages(doc: str) -> list[tuple[str, str]]:
    lines = doc.strip().splitlines()
    title = lines[0].strip() if lines else ""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines[1:]))]
    out, cur = [], ""
    for p in paras:
        if not p or set(p) <= set("*=-"):
            continue
        if cur and len(cur) + len(p) + 1 > LOOKUP_PASSAGE_CHARS:
            out.append((title, cur))
            cur = ""
        cur = f"{cur} {p}".strip()
    if cur:
        out.append((title, cur))
    return out


_index: _Index | None = None


def lookup(query: str) -> str:
    """The best passages of the Python language reference for `query`, each headed by its topic."""
    global _index
    if not isinstance(query, str) or not _WORD.search(query.lower()):
        raise ToolError("lookup: the query has no words to search for")
    if _index is None:
        from lmforge.data.corpus import python_docs
        _index = _Index([p for doc in python_docs() for p in _passages(doc)])
    hits = _index.search(query, LOOKUP_RESULTS)
    if not hits:
        return f"no passage matches {query!r}"
    out = []
    for i in hits:
        title, text = _index.passages[i]
        text = text if len(text) <= LOOKUP_PASSAGE_CHARS else text[:LOOKUP_PASSAGE_CHARS - 1] + "…"
        out.append(f"[{title}] {text}")
    return "\n\n".join(out)


LOOKUP = Tool(
    "lookup", "Search the Python language reference; returns the best matching passages.",
    {"type": "object",
     "properties": {"query": {"type": "string", "maxLength": 200, "description": "words to search for"}},
     "required": ["query"], "additionalProperties": False},
    lookup)


# ---------------------------------------------------------------------------------------------------------------
def builtin_tools() -> dict[str, Tool]:
    return {t.name: t for t in (CALCULATOR, LOOKUP)}


def get_tools(names: str | list[str]) -> list[Tool]:
    """Built-in tools by name ("calculator,lookup" or a list); an unknown name is a ConfigError."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    known = builtin_tools()
    for n in names:
        if n not in known:
            raise ConfigError(f"unknown tool {n!r} (built-in tools: {', '.join(known)})", field="tools")
    return [known[n] for n in dict.fromkeys(names)]


__all__ = ["Tool", "ToolError", "tool", "to_openai", "schema_problem", "calculate", "lookup", "builtin_tools",
           "get_tools", "CALCULATOR", "LOOKUP"]
