"""User-facing errors.

Anything the user can fix (a bad file, a bad value, a missing checkpoint) raises LmforgeError.
The CLI prints it as ONE line and exits 2; the server turns it into a 4xx with an OpenAI-style body.
Bugs stay ordinary exceptions so they keep their traceback.
"""
from __future__ import annotations

import json
from pathlib import Path


class LmforgeError(Exception):
    """An error the user can fix. `where` says which file/line/field it is about."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        super().__init__(str(self))

    def where(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(f"{self.file}:{self.line}" if self.line is not None else str(self.file))
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        # keep it to one line, whatever the message holds
        msg = " ".join(str(self.message).split())
        return f"{where}: {msg}" if where else msg


class ConfigError(LmforgeError):
    """A bad recipe, override or option value."""


class DataError(LmforgeError):
    """A bad or missing input file / corpus."""


class CheckpointError(LmforgeError):
    """A missing or unreadable checkpoint / tokenizer directory."""


class WriteError(LmforgeError):
    """An output that cannot be written (disk full, file too large, permission denied, a file in the way).
    Raised by lmforge.io, which has removed the partial output and kept the previous one."""


def read_json_object(path, missing: str = "file not found") -> dict:
    """The JSON object in `path`, or a CheckpointError naming the file (and line) for a missing, unreadable or
    malformed file; `missing` is the message when the file does not exist."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(missing, file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read: {e}", file=str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", file=str(path), line=1)
    return data
