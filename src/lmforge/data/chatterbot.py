"""`chatterbot`: the conversations of the `chatterbot-corpus` package (YAML files in 28 languages), offline.

    chatterbot                    every language
    chatterbot:english            one language
    chatterbot:english,german     several

Each YAML file holds `conversations:`, lists of turns; a list becomes alternating user/assistant messages (the
first turn is the user's). A trailing turn without a reply is dropped, and a long list is cut into pieces of at
most MAX_MESSAGES messages (a few run to hundreds of turns, far beyond a small model's context); identical
conversations are kept once. A conversation's split is decided by a hash of its text (problems.split_of).
There is no reference answer to score: this is instruction data, not a task family.
"""
from __future__ import annotations

import functools
import importlib.util
import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from lmforge.data.problems import InstructionSource, check_n, check_split, split_of
from lmforge.errors import ConfigError, DataError

MAX_MESSAGES = 8      # user/assistant messages per conversation at most (long lists are cut into pieces)


def data_dir() -> Path:
    """<site-packages>/chatterbot_corpus/data (read as files: the package's own loader is not needed)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("built-in source 'chatterbot' needs the 'chatterbot-corpus' package: "
                        "pip install chatterbot-corpus")
    for location in spec.submodule_search_locations:
        path = Path(location, "data")
        if path.is_dir():
            return path
    raise DataError("built-in source 'chatterbot': the installed chatterbot_corpus package has no data/ "
                    "directory; reinstall it: pip install --force-reinstall chatterbot-corpus")


def languages() -> list[str]:
    return sorted(p.name for p in data_dir().iterdir() if p.is_dir() and any(p.glob("*.yml")))


@functools.lru_cache(maxsize=None)
def _language(lang: str) -> tuple[tuple[str, ...], ...]:
    """The conversations of one language, each a tuple of turns (alternating user/assistant, even length)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = []
    for path in sorted((data_dir() / lang).glob("*.yml")):
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"cannot read chatterbot-corpus file: {e}", file=str(path)) from None
        for turns in doc.get("conversations") or []:
            if not isinstance(turns, list):
                continue
            turns = [str(t).strip() for t in turns if t is not None]
            for i in range(0, len(turns) - 1, MAX_MESSAGES):
                piece = turns[i:i + MAX_MESSAGES]
                piece = piece[:len(piece) // 2 * 2]          # end on a reply
                if piece and all(piece):
                    out.append(tuple(piece))
    return tuple(dict.fromkeys(out))


class ChatterbotSource(InstructionSource):
    kind = "instruction"

    def __init__(self, langs: list[str] | None = None, source: str = "chatterbot"):
        known = languages()
        if langs:
            bad = [lang for lang in langs if lang not in known]
            if bad:
                raise ConfigError(f"{source!r}: unknown chatterbot-corpus language {bad[0]!r} "
                                  f"(languages: {', '.join(known)})", field="source")
        self.langs = list(dict.fromkeys(langs)) if langs else known
        self.name = "chatterbot" + (":" + ",".join(self.langs) if langs else "")
        self.description = (f"chatterbot-corpus conversations ({', '.join(self.langs)})" if langs else
                            f"chatterbot-corpus conversations in {len(known)} languages (chatterbot:LANG,... picks)")

    @classmethod
    def from_options(cls, text: str, source: str) -> "ChatterbotSource":
        return cls([s.strip().lower() for s in text.split(",") if s.strip()], source=source)

    def all_conversations(self) -> list[tuple[str, ...]]:
        convs = [c for lang in self.langs for c in _language(lang)]
        return list(dict.fromkeys(convs))

    def size(self) -> int:
        return len(self.all_conversations())

    def conversations(self, split: str = "train", n: int | None = None, seed: int = 0) -> Iterator[dict]:
        """The split's conversations, shuffled by `seed`, at most n (None: all)."""
        check_split(split)
        check_n(n)
        convs = [c for c in self.all_conversations() if split_of("\n".join(c)) == split]
        random.Random(f"chatterbot:{seed}:{split}").shuffle(convs)
        for turns in islice(convs, n):
            yield {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                for i, t in enumerate(turns)]}
