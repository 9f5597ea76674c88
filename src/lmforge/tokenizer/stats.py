"""How well a tokenizer compresses text, per file and per Unicode script (`lmforge tokenizer stats`).

Per-script attribution. Text is cut into *script runs*, and each run is encoded on its own; a run's tokens,
chars and bytes all count for its script. Rules for the cut:
  - every character gets a script from its Unicode name (LATIN..., CYRILLIC..., CJK UNIFIED IDEOGRAPH...),
    digits, punctuation, symbols and spaces are "Common", pictographs are "Emoji";
  - combining marks, ZWJ and variation selectors join the run before them (a Devanagari vowel sign stays
    Devanagari, 👍🏽 stays one emoji);
  - whitespace joins the run AFTER it, as the split regex glues a leading space to the next word; so
    "the cat" is one Latin run, and " 123," is a Common run;
  - whitespace at the very end of a text (or before nothing but marks) is Common.
Encoding runs separately can only add tokens at the seams (a token never spans two runs), so per-script
numbers are slightly pessimistic and their sum can exceed the per-file count, which encodes whole documents.
"""
from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

from tqdm import tqdm

# display order of the per-script table; the keyword list says which Unicode-name words select a script
SCRIPTS: list[tuple[str, tuple[str, ...]]] = [
    ("Latin", ("LATIN",)),
    ("Greek", ("GREEK",)),
    ("Cyrillic", ("CYRILLIC",)),
    ("Hebrew", ("HEBREW",)),
    ("Arabic", ("ARABIC",)),
    ("Devanagari", ("DEVANAGARI",)),
    ("Thai", ("THAI",)),
    ("Han", ("CJK", "IDEOGRAPHIC")),
    ("Hiragana/Katakana", ("HIRAGANA", "KATAKANA")),
    ("Hangul", ("HANGUL",)),
]
OTHER, EMOJI, COMMON = "Other letters", "Emoji", "Common (digits, punct, space)"
SCRIPT_NAMES = [name for name, _ in SCRIPTS] + [OTHER, EMOJI, COMMON]

# one code character per class, so a whole text can be mapped with str.translate and cut with a regex
_CODE = {name: chr(ord("A") + i) for i, name in enumerate([n for n, _ in SCRIPTS] + [OTHER])}
_CODE.update({EMOJI: "e", COMMON: "c"})
_NAME_OF = {code: name for name, code in _CODE.items()}
_SPACE, _MARK = "w", "m"
_KEYWORD = {kw: name for name, kws in SCRIPTS for kw in kws}

# pictographic blocks (emoji, flags, skin tones, dingbats, misc symbols)
_EMOJI_RANGES = [(0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2300, 0x23FF), (0x2B00, 0x2BFF), (0xE0020, 0xE007F)]


def char_class(ch: str) -> str:
    """The one-character class code of `ch` (see _CODE, plus 'w' whitespace and 'm' joining marks)."""
    if ch.isspace():
        return _SPACE
    cp, cat = ord(ch), unicodedata.category(ch)
    if cat[0] == "M" or cp in (0x200D, 0x200C) or 0xFE00 <= cp <= 0xFE0F:
        return _MARK
    if any(lo <= cp <= hi for lo, hi in _EMOJI_RANGES):
        return _CODE[EMOJI]
    if cat[0] != "L":
        return _CODE[COMMON]
    for word in unicodedata.name(ch, "").replace("-", " - ").split():
        if word in _KEYWORD:
            return _CODE[_KEYWORD[word]]
    return _CODE[OTHER]


class _ClassTable(dict):
    """str.translate table that classifies each code point the first time it is seen (C-speed after that)."""

    def __missing__(self, cp: int) -> str:
        self[cp] = code = char_class(chr(cp))
        return code


_TABLE = _ClassTable()
# a run: optional leading spaces, one class char, then more of the same class, marks, or spaces that are
# followed by that class again; or leftover spaces/marks alone (Common)
_RUN = re.compile(r"w*([^wm])(?:\1|m|w+(?=\1))*|[wm]+")


def script_runs(text: str) -> list[tuple[str, str]]:
    """Cut `text` into (script name, run text) pieces that concatenate back to `text`."""
    codes = text.translate(_TABLE)
    return [(_NAME_OF.get(m.group(1), COMMON), text[m.start():m.end()]) for m in _RUN.finditer(codes)]


@dataclass
class Counts:
    chars: int = 0
    bytes: int = 0
    tokens: int = 0

    def add(self, chars: int, nbytes: int, tokens: int) -> None:
        self.chars += chars
        self.bytes += nbytes
        self.tokens += tokens

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_1k_chars(self) -> float:
        return 1000 * self.tokens / self.chars if self.chars else 0.0


def _batches(it: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


def measure(tok, sources: Iterable[tuple[str, Iterable[str]]], progress: bool = True,
            num_threads: int = 2) -> tuple[dict[str, Counts], dict[str, Counts]]:
    """Encode every document of every (label, documents) source. Returns (per label, per script) counts;
    per-label counts encode whole documents, per-script counts encode script runs (see module doc)."""
    per_file: dict[str, Counts] = {}
    per_script: dict[str, Counts] = defaultdict(Counts)
    with tqdm(desc="measuring", unit="B", unit_scale=True, disable=not progress) as bar:
        for label, docs in sources:
            fc = per_file.setdefault(label, Counts())
            for batch in _batches(docs, 256):
                sizes = [len(d.encode("utf-8")) for d in batch]
                for doc, nb, ids in zip(batch, sizes, tok.encode_batch(batch, num_threads=num_threads)):
                    fc.add(len(doc), nb, len(ids))
                runs = [r for doc in batch for r in script_runs(doc)]
                encoded = tok.encode_batch([t for _, t in runs], num_threads=num_threads)
                for (script, text), ids in zip(runs, encoded):
                    per_script[script].add(len(text), len(text.encode("utf-8")), len(ids))
                bar.update(sum(sizes))
    order = {name: i for i, name in enumerate(SCRIPT_NAMES)}
    return per_file, dict(sorted(per_script.items(), key=lambda kv: order[kv[0]]))


def display_width(s: str) -> int:
    """Terminal columns of `s`: wide (CJK, fullwidth) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in s)


def pad(s: str, width: int, right: bool = False) -> str:
    fill = " " * max(0, width - display_width(s))
    return fill + s if right else s + fill


def format_table(first_col: str, rows: dict[str, Counts], total: Counts | None = None) -> str:
    """An aligned text table: name, chars, bytes, tokens, bytes/token, chars/token, tokens per 1000 chars."""
    head = [first_col, "chars", "bytes", "tokens", "bytes/tok", "chars/tok", "tok/1k chars"]
    body = [[name, f"{c.chars:,}", f"{c.bytes:,}", f"{c.tokens:,}", f"{c.bytes_per_token:.2f}",
             f"{c.chars_per_token:.2f}", f"{c.tokens_per_1k_chars:.1f}"] for name, c in rows.items()]
    if total is not None:
        body.append(["total", f"{total.chars:,}", f"{total.bytes:,}", f"{total.tokens:,}",
                     f"{total.bytes_per_token:.2f}", f"{total.chars_per_token:.2f}",
                     f"{total.tokens_per_1k_chars:.1f}"])
    widths = [max(display_width(r[i]) for r in [head] + body) for i in range(len(head))]

    def line(cells):
        return "  ".join([pad(cells[0], widths[0])] + [pad(c, w, right=True) for c, w in zip(cells[1:], widths[1:])])
    rule = "  ".join("-" * w for w in widths)
    out = [line(head), rule] + [line(r) for r in body[:len(rows)]]
    if total is not None:
        out += [rule, line(body[-1])]
    return "\n".join(out)


def total_of(rows: Iterable[Counts]) -> Counts:
    t = Counts()
    for c in rows:
        t.add(c.chars, c.bytes, c.tokens)
    return t
