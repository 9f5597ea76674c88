"""Conversation data for supervised fine-tuning: JSONL files of chats, read one row at a time.

Each non-blank line is one JSON object, either

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...], "tools": [...]?}
    {"prompt": "...", "completion": "..."}            -> a user message and the assistant's reply

(the message and tool shapes are those of lmforge.tokenizer.chat). Every conversation must hold at least one
assistant message: that is what fine-tuning learns from. A bad row stops the read with a DataError naming
file:line and why (invalid JSON or UTF-8, no messages, unknown role, no assistant turn, wrong types).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmforge.errors import DataError
from lmforge.tokenizer.chat import validate_messages, validate_tools


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    file: str | None = None     # where it came from (a file, or a built-in source's name), for errors met later
    line: int | None = None     # (a row too long for the model, say)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else str(self.file)


def parse_row(row) -> Conversation:
    """One row (a parsed JSON value) -> a Conversation; DataError (without a location) when it is not one."""
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object with 'messages' or 'prompt'/'completion', got "
                        f"{type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError("'messages' must be a non-empty list of {role, content} objects")
        validate_messages(messages)
        tools = validate_tools(row.get("tools"))
    elif "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise DataError(f"'{key}' must be a string" if key in row else f"no '{key}' (a prompt/completion "
                                "row needs both)")
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        tools = None
    else:
        raise DataError("no 'messages' (nor 'prompt' and 'completion'): nothing to learn from")
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError("no assistant turn: a conversation needs at least one assistant message to learn from")
    return Conversation(messages, tools)


def read_conversations(path: str | Path) -> Iterator[Conversation]:
    """The conversations of a JSONL file, streamed (one row in memory at a time)."""
    return read_jsonl_items(path, parse_row, "conversations")


def read_jsonl_items(path: str | Path, parse, what: str = "rows") -> Iterator:
    """parse(row) for every non-blank line of a JSONL file, streamed; each item gets .file and .line. A file that
    cannot be read, invalid UTF-8 or JSON, or a row `parse` rejects (DataError) stops with file:line."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", file=str(path)) from None
    except IsADirectoryError:
        raise DataError(f"is a directory, expected a .jsonl file of {what}", file=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    with f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("invalid UTF-8 (a JSONL file is UTF-8 text)", file=str(path), line=n) from None
            if not line.strip():
                continue
            try:
                item = parse(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", file=str(path), line=n) from None
            except DataError as e:
                raise DataError(e.message, file=str(path), line=n) from None
            item.file, item.line = str(path), n
            yield item
