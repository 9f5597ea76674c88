"""What every built-in instruction source shares: problems, the train/eval split, and the two source kinds.

    fam = ArithmeticFamily(...)                        # a TaskFamily: problems with a scorer
    probs = fam.problems("eval", 200, seed=0)          # list[Problem]: prompt messages, answer, meta
    fam.score(probs[0], "The answer is 432")           # 1.0 / 0.0 (a float in [0, 1] for partial credit)
    fam.demonstration(probs[0])                        # the prompt + the assistant's answer, for SFT

An `InstructionSource` gives conversations (`{"messages": [...]}` rows, plus `"tools"` when the conversations
call tools: the shape of a chat JSONL row). A `TaskFamily` is an instruction source whose conversations are
demonstrations of problems it can score: the built-in evaluation (`lmforge eval task`) and RL use it.

The split. A problem belongs to `eval` (held out) or `train` by a hash of its canonical text (`split_of`), never
by the seed that drew it: the two splits are disjoint even when the problem space is tiny (a seed-based split
of 1-digit additions would put most eval problems in training too). A seed only chooses which problems of a
split are drawn and in which order.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

from lmforge.errors import ConfigError

SPLITS = ("train", "eval")
EVAL_FRACTION = 0.1            # share of every problem space held out for evaluation


def split_of(key: str) -> str:
    """'eval' or 'train' for a problem's canonical text: the first 8 bytes of its SHA-256 as a fraction of 2**64,
    below EVAL_FRACTION is eval. Stable across processes, Python versions and machines (unlike hash())."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "eval" if h < EVAL_FRACTION * 2 ** 64 else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})", field="split")
    return split


def check_n(n, what: str = "n") -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"must be an integer >= 1, got {n!r}", field=what)
    return n


@dataclass
class Problem:
    """One problem: the prompt conversation (optional system + user), the reference answer, and what the family's
    scorer needs besides (`meta`). `key` is the canonical text that decides the split."""
    messages: list[dict]
    answer: str
    key: str
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The user's question (the last user message)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def parse_options(text: str, source: str, allowed: dict[str, str]) -> dict[str, str]:
    """'digits=3,ops=+-' -> {'digits': '3', 'ops': '+-'}; `allowed` maps each known option to its help. Unknown
    or malformed options are a ConfigError naming the source."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{source!r}: expected OPTION=VALUE, got {part!r} "
                              f"(options: {', '.join(f'{k}={v}' for k, v in allowed.items())})", field="source")
        if key not in allowed:
            raise ConfigError(f"{source!r}: unknown option {key!r} "
                              f"(options: {', '.join(f'{k}={v}' for k, v in allowed.items())})", field="source")
        out[key] = value.strip()
    return out


def parse_bool(value: str, source: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{source!r}: option {key} expects true/false, got {value!r}", field="source")


class InstructionSource:
    """A named source of conversations. `kind` is 'instruction' (conversations only) or 'task' (a TaskFamily:
    conversations are demonstrations of problems it scores); `size` a count, or None for a procedural source."""

    name: str = ""
    kind: str = "instruction"
    description: str = ""
    tools: list[dict] | None = None      # the tools the conversations declare (OpenAI `tools` shape), if any

    def size(self) -> int | None:
        return None

    def miscopied(self, problem: Problem, rng) -> list[dict] | None:
        """A tool-using demonstration gone wrong the way a model goes wrong: the call copies the problem wrongly
        and the rest follows that call (None where the family cannot make one). Rejected sides of tool pairs."""
        return None

    def conversations(self, split: str = "train", n: int | None = None, seed: int = 0) -> Iterator[dict]:
        """`{"messages": [...]}` rows (with `"tools"` when the source uses tools), at most n (None: all of a finite
        source, an endless stream of a procedural one)."""
        raise NotImplementedError


class TaskFamily(InstructionSource):
    """Problems with a reference answer and a scorer. Subclasses define `iter_problems`, `score` and
    `demonstration`; `problems` and `conversations` follow from them.

    iter_problems(split, seed): the split's problems in the seed's order. For eval: distinct problems, finite when
    the held-out space is (so `problems("eval", n)` may return fewer than n). For train: an endless stream
    (problems repeat once a small space is used up)."""

    kind = "task"

    def iter_problems(self, split: str, seed: int) -> Iterator[Problem]:
        raise NotImplementedError

    def problems(self, split: str = "eval", n: int = 200, seed: int = 0) -> list[Problem]:
        """The first n problems of `split` drawn with `seed` (a prefix of any longer draw with the same seed)."""
        check_split(split)
        check_n(n)
        return list(islice(self.iter_problems(split, seed), n))

    def score(self, problem: Problem, response: str) -> float:
        """1.0 for a right answer, 0.0 for a wrong one (in between: partial credit, where the family gives it)."""
        raise NotImplementedError

    def demonstration(self, problem: Problem, tools: bool = False) -> list[dict]:
        """The whole conversation: the prompt messages, then the assistant's answer (with tools=True, reached by
        calling tools, where the family has them)."""
        raise NotImplementedError

    def conversations(self, split: str = "train", n: int | None = None, seed: int = 0) -> Iterator[dict]:
        check_split(split)
        check_n(n)
        use_tools = self.tools is not None
        turns = getattr(self, "turns", 1)     # problems per conversation: later ones follow the earlier turns
        problems = self.iter_problems(split, seed)
        groups = iter(lambda: list(islice(problems, turns)), [])    # ends when the problems do
        for group in islice(groups, n):
            msgs = [m for p in group for m in (self.demonstration(p, tools=use_tools) if use_tools
                                                 else self.demonstration(p))]
            row = {"messages": msgs}
            if use_tools:
                row["tools"] = self.tools
            yield row
