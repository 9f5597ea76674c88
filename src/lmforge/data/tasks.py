"""The built-in instruction sources and task families, by name: what other stages call.

    for row in conversations("arithmetic:digits=2", split="train", n=1000, seed=0):
        row["messages"]          # [{"role": "user", ...}, {"role": "assistant", ...}]; row.get("tools")
    fam = family("rg:basic_arithmetic")               # a TaskFamily (problems, score, demonstration)

Names (options after a colon):
    arithmetic[:digits=N,ops=+-*,tools=true]   lmforge's integer problems, scored by exact match (arithmetic.py)
    chatterbot[:LANG,...]                        chatterbot-corpus conversations, no scorer (chatterbot.py)
    rg:NAME[:KEY=VALUE,...]                      any reasoning-gym dataset with its scorer (rg.py; optional extra)

Everything is offline: the data is generated or read from installed packages. Splits are `train` and `eval`
(held out), decided by a hash of each problem's text (problems.py).
"""
from __future__ import annotations

from collections.abc import Iterator

from lmforge.data.problems import SPLITS, InstructionSource, Problem, TaskFamily  # noqa: F401
from lmforge.errors import ConfigError, LmforgeError

# name -> (kind, one-line description)
_SOURCES = {
    "arithmetic": ("task", "integer problems 'What is 47 + 385?', exact match; options digits=N, ops=+-*, "
                           "tools=true (calculator calls)"),
    "chatterbot": ("instruction", "chatterbot-corpus conversations in 28 languages; chatterbot:english,... picks "
                                  "languages (no scorer)"),
    "rg": ("task", "any reasoning-gym dataset, rg:NAME[:KEY=VALUE,...], scored by its score_answer "
                   "(pip install 'lmforge[tasks]')"),
}
NAMES = tuple(_SOURCES)


def is_builtin(source: str) -> bool:
    """Whether `source` names a built-in instruction source (rather than a file)."""
    return isinstance(source, str) and source.partition(":")[0] in _SOURCES


def source(name: str) -> InstructionSource:
    """The instruction source a name stands for (see the module docstring). Unknown names and bad options are a
    ConfigError listing what exists."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"expected a source name, got {name!r} (built-ins: {', '.join(NAMES)})", field="source")
    base, _, rest = name.strip().partition(":")
    if base == "arithmetic":
        from lmforge.data.arithmetic import ArithmeticFamily
        return ArithmeticFamily.from_options(rest, name)
    if base == "chatterbot":
        from lmforge.data.chatterbot import ChatterbotSource
        return ChatterbotSource.from_options(rest, name)
    if base == "rg":
        from lmforge.data.rg import ReasoningGymFamily
        return ReasoningGymFamily.from_options(rest, name)
    raise ConfigError(f"unknown source {name!r} (built-ins: arithmetic[:digits=N,...], chatterbot[:LANG,...], "
                      f"rg:NAME)", field="source")


def family(name: str) -> TaskFamily:
    """The task family (problems with a scorer) a name stands for; a ConfigError for sources without a scorer."""
    src = source(name)
    if not isinstance(src, TaskFamily):
        scored = [n for n, (kind, _) in _SOURCES.items() if kind == "task"]
        raise ConfigError(f"{name!r} has no scorer: it is instruction data, not a task "
                          f"(tasks: {', '.join(scored)})", field="task")
    return src


def conversations(name: str, split: str = "train", n: int | None = None, seed: int = 0) -> Iterator[dict]:
    """`{"messages": [...]}` rows of a built-in source (plus `"tools"` when they call tools), at most n; n=None
    is all of a finite source and an endless stream of a procedural one (arithmetic, rg)."""
    return source(name).conversations(split, n, seed)


def list_sources() -> list[dict]:
    """One dict per built-in instruction source: name, kind ('instruction' | 'task'), scorer (bool), size (a
    count, 'procedural', or None when unavailable), description, error (what to install, when unavailable)."""
    rows = []
    for name, (kind, description) in _SOURCES.items():
        row = {"name": name, "kind": kind, "scorer": kind == "task", "description": description,
               "size": "procedural" if kind == "task" else None, "error": None}
        try:
            if name == "chatterbot":
                row["size"] = source(name).size()
            elif name == "rg":
                from lmforge.data.rg import dataset_names
                row["size"] = f"procedural, {len(dataset_names())} datasets"
        except LmforgeError as e:
            row.update(size=None, error=str(e))
        rows.append(row)
    return rows
