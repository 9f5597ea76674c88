"""Preference pairs and RL prompts: TRL's JSONL formats, and built-in pairs made from a task family.

Preference JSONL, one pair per line, in any of TRL's three shapes:

    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}                          standard
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}]}                                            conversational
    {"chosen": [...whole conversation...], "rejected": [...whole conversation...]}       implicit prompt

(an implicit prompt is the longest run of leading messages both conversations share, and each side must go on
with an assistant message). Optional keys: "tools" (the conversation's tool declarations) and "margin" (a number
the reward model's Bradley-Terry loss subtracts, how much better chosen is). A pair whose chosen equals its
rejected, a missing or mistyped field, or invalid JSON is a DataError naming file:line.

Prompt JSONL for RL: {"prompt": "..." | [messages], ...}; every other key of the row (e.g. "answer") is handed to
the reward function as a keyword argument, as TRL does.

Built-in pairs (`task_pairs`): for each problem of a task family, chosen = the family's demonstration (a correct
answer, checked by the family's scorer), rejected = the same answer with its last number changed into a wrong one
(off by one, by a power of ten, a digit swapped or dropped, a sign flipped: the mistakes a small model makes),
kept only when the scorer marks it wrong. `lmforge.stages.reward` adds pairs whose rejected side is the model's
own wrong sample.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.chat import read_jsonl_items
from lmforge.errors import DataError
from lmforge.tokenizer.chat import validate_messages, validate_tools


@dataclass
class Pair:
    prompt: list[dict]                  # messages before the compared replies
    chosen: list[dict]                  # the preferred continuation (assistant messages, tool results between)
    rejected: list[dict]
    tools: list[dict] | None = None
    margin: float | None = None
    file: str | None = None
    line: int | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else str(self.file)


@dataclass
class PromptRow:
    prompt: list[dict]
    extra: dict = field(default_factory=dict)   # the row's other keys: keyword arguments of reward functions
    tools: list[dict] | None = None
    file: str | None = None
    line: int | None = None


def as_messages(value, key: str, role_first: str | None = None) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role_first or "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"'{key}' must be a string or a non-empty list of messages")
    validate_messages(value)
    return [dict(m) for m in value]


def parse_pair(row) -> Pair:
    """One parsed JSON row -> a Pair, or a DataError (without a location) saying what is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"a preference row must be a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"missing field '{key}' (a preference row needs chosen and rejected)")
    if "prompt" in row:
        prompt = as_messages(row["prompt"], "prompt")
        chosen = as_messages(row["chosen"], "chosen", "assistant")
        rejected = as_messages(row["rejected"], "rejected", "assistant")
    else:   # implicit prompt: the shared leading messages
        full_c = as_messages(row["chosen"], "chosen")
        full_r = as_messages(row["rejected"], "rejected")
        k = 0
        while k < min(len(full_c), len(full_r)) and full_c[k] == full_r[k]:
            k += 1
        prompt, chosen, rejected = full_c[:k], full_c[k:], full_r[k:]
        if not prompt:
            raise DataError("no 'prompt' and the two conversations share no leading message")
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[0].get("role") != "assistant":
            raise DataError(f"'{key}' must continue the prompt with an assistant message")
    if chosen == rejected:
        raise DataError("chosen and rejected are the same: the pair prefers nothing")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise DataError(f"'margin' must be a finite number, got {margin!r}")
    return Pair(prompt, chosen, rejected, validate_tools(row.get("tools")), margin)


def parse_prompt_row(row) -> PromptRow:
    if not isinstance(row, dict):
        raise DataError(f"a prompt row must be a JSON object, got {type(row).__name__}")
    if "prompt" not in row:
        raise DataError("missing field 'prompt'")
    prompt = as_messages(row["prompt"], "prompt")
    if prompt[-1].get("role") == "assistant":
        raise DataError("'prompt' must end with a user (or tool) message: the model answers it")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "tools")}
    return PromptRow(prompt, extra, validate_tools(row.get("tools")))


def read_pairs(path: str | Path) -> list[Pair]:
    pairs = list(read_jsonl_items(path, parse_pair, "preference pairs"))
    if not pairs:
        raise DataError("no preference pairs", file=str(path))
    return pairs


def read_prompts(path: str | Path) -> list[PromptRow]:
    rows = list(read_jsonl_items(path, parse_prompt_row, "prompts"))
    if not rows:
        raise DataError("no prompts", file=str(path))
    return rows


# ---- built-in pairs from a task family -------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+")


def wrong_variants(text: str, rng: random.Random) -> list[str]:
    """`text` with its last integer replaced by plausible wrong values, most plausible first (shuffled within
    kinds by rng): off by one or ten, a digit dropped, two digits swapped, the sign flipped."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return []
    m = matches[-1]
    value = int(m.group())
    digits = str(abs(value))
    cands = [value + 1, value - 1, value + 10, value - 10]
    rng.shuffle(cands)
    more = []
    if len(digits) > 1:
        more.append(int(digits[:-1]) * (1 if value >= 0 else -1))
        i = rng.randrange(len(digits) - 1)
        swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
        more.append(int(swapped) * (1 if value >= 0 else -1))
    if value:
        more.append(-value)
    rng.shuffle(more)
    out = []
    for v in cands + more:
        s = text[:m.start()] + str(v) + text[m.end():]
        if v != value and s not in out:
            out.append(s)
    return out


def task_pairs(family, n: int, seed: int = 0, split: str = "train") -> list[Pair]:
    """n pairs from the family's `split` problems: chosen = the demonstration's reply, rejected = that reply with
    its final number made wrong (the first variant the scorer rejects). Problems without such a variant (no
    number in the reply) are skipped. For a family with tools the reply is the whole tool-using turn (call, result,
    answer) and the rejected turn calls the tool with the problem copied wrongly (TaskFamily.miscopied), the
    mistake such a model makes; the pairs carry the tools."""
    rng = random.Random(f"pairs:{family.name}:{seed}:{split}")
    pairs: list[Pair] = []
    if family.tools:
        for problem in family.iter_problems(split, seed):
            k = len(problem.messages)
            demo, wrong = family.demonstration(problem, tools=True), family.miscopied(problem, rng)
            if wrong is None:
                raise DataError(f"{family.name}: this family cannot make wrong tool calls for built-in pairs")
            if family.score(problem, demo[-1]["content"]) >= 1.0 > family.score(problem, wrong[-1]["content"]):
                pairs.append(Pair(demo[:k], demo[k:], wrong[k:], file=family.name, line=None,
                                  tools=family.tools))
            if len(pairs) >= n:
                break
        return pairs
    for problem in family.iter_problems(split, seed):
        demo = family.demonstration(problem)
        reply = demo[-1]
        if reply.get("role") != "assistant" or family.score(problem, reply["content"]) < 1.0:
            continue
        for wrong in wrong_variants(reply["content"], rng):
            if family.score(problem, wrong) < 1.0:
                pairs.append(Pair(demo[:-1], [reply], [{"role": "assistant", "content": wrong}],
                                  file=family.name, line=None))
                break
        if len(pairs) >= n:
            break
    return pairs
