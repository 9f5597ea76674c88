"""Constrained decoding: only let the model sample tokens that keep the output inside a grammar.

    g = Grammar.json_schema(tok, {"type": "object", "properties": {...}, "required": [...]})   # or .regex / .choices
    m = g.matcher()                        # fresh state for one sequence
    logits = m.apply(logits)               # disallowed tokens -> -inf (before sampling)
    m.accept(token)                        # advance with the sampled token
    m.is_done()                            # grammar complete and nothing may follow: stop now
    m.can_end()                            # grammar complete: the end tokens (EOS, BOS) are allowed

The grammar engine is llguidance (from Microsoft's guidance project; a structured-output backend of vLLM, SGLang
and llama.cpp too). It builds its token trie straight from the bytes of each token, so our
byte-level BPE vocabulary goes in as it is; it takes a list of special token ids (they never match grammar text:
"<|end|>" is a token, not the 7 characters) and a list of end tokens, allowed exactly when the grammar may end.
Masks are computed lazily per step by walking the token trie with a derivative-based regex lexer and an Earley
parser, so compiling a JSON schema takes milliseconds; there is no per-schema precomputed index to build.

JSON is generated compactly, with the separators json.dumps uses (", " and ": ") and no other whitespace:
flexible whitespace lets a model pad forever with newlines, and json.dumps' layout is the one models mostly saw.

Unsupported schema keywords (e.g. "not", "if"/"then", "uniqueItems") are an error, not silently ignored: a
grammar that allows more than the schema would break the promise that every output validates.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from lmforge.errors import ConfigError

try:
    import llguidance
except ImportError:  # an optional extra: fail when constrained decoding is used, not when lmforge is imported
    llguidance = None

# JSON layout: json.dumps' separators, no free whitespace (see the module docstring)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_WHAT = {"json_schema": "JSON schema", "regex": "regex", "choices": "choices", "lark": "grammar"}
GRAMMAR_CACHE_SIZE = 64   # compiled grammars kept per tokenizer (a server sees the same schema again and again)


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer as llguidance sees it: built once per tokenizer object (costly for a large vocabulary), then shared

class _TokenizerView:
    """The duck-typed object llguidance.TokenizerWrapper reads: token bytes, special ids, EOS/BOS, an encoder."""

    def __init__(self, tokenizer, ends: list[int]):
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.id_to_bytes(i) for i in range(n)]
        self.special_token_ids = [i for i in range(n) if tokenizer.is_special(i)]
        self.eos_token_id = ends[0]
        self.bos_token_id = None
        self._tokenizer = tokenizer
        # single-byte tokens, to encode a tail of bytes that is not (yet) valid UTF-8
        special = set(self.special_token_ids)
        self._byte_ids = {t[0]: i for i, t in enumerate(self.tokens) if len(t) == 1 and i not in special}

    def __call__(self, data: bytes) -> list[int]:
        # llguidance encodes text only for features we do not use (prompt healing); keep it exact anyway
        if isinstance(data, str):
            data = data.encode("utf-8")
        try:
            return list(self._tokenizer.encode(data.decode("utf-8")))
        except UnicodeDecodeError as e:
            head = list(self._tokenizer.encode(data[:e.start].decode("utf-8")))
            return head + [self._byte_ids[b] for b in data[e.start:]]


class _Entry:
    def __init__(self, lltok, vocab_size: int, ends: list[int]):
        self.lltok, self.vocab_size, self.ends = lltok, vocab_size, ends
        self.grammars: OrderedDict[tuple[str, str], "llguidance.LLMatcher"] = OrderedDict()
        self.lock = threading.Lock()


_entries: dict[int, tuple[weakref.ref, _Entry]] = {}
_entries_lock = threading.Lock()


def _lib():
    if llguidance is None:
        raise ConfigError("constrained decoding needs the llguidance package (a dependency of lmforge): "
                          "pip install llguidance")
    return llguidance


def _entry(tokenizer) -> _Entry:
    """The llguidance tokenizer of this tokenizer object (cached while the object lives)."""
    key = id(tokenizer)
    with _entries_lock:
        hit = _entries.get(key)
        if hit is not None and hit[0]() is tokenizer:
            return hit[1]
    from lmforge.infer.request import end_token_ids
    ends = end_token_ids(tokenizer)
    if not ends:
        raise ConfigError("constrained decoding needs a tokenizer with an end-of-sequence token")
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer, ends)), eos_token=ends)
    entry = _Entry(lltok, tokenizer.vocab_size, ends)
    try:
        ref = weakref.ref(tokenizer, lambda _, k=key, d=_entries: d.pop(k, None))  # d: bound now (at exit
        # the module globals may already be gone)
    except TypeError:  # an object without weak references: not cached
        return entry
    with _entries_lock:
        _entries[key] = (ref, entry)
    return entry


def _clean(message: str) -> str:
    """llguidance errors can span lines (a regex with a caret under the problem): keep what says what is wrong."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()] or ["unknown error"]
    err = next((ln.removeprefix("error:").strip() for ln in lines if ln.startswith("error:")), None)
    at = next((i for i, ln in enumerate(lines) if ln.endswith("regex parse error:")), None)
    if err is None or at is None or at + 1 >= len(lines):
        return lines[0]
    return f"regex parse error in /{lines[at + 1]}/: {err}"  # the line after the header is the regex itself


# ---------------------------------------------------------------------------------------------------------------

class Grammar:
    """A grammar compiled for one tokenizer. Build with `json_schema`, `regex` or `choices`; get one `matcher()`
    per sequence. Compiling is done once (and cached per tokenizer by spec); matchers are cheap copies."""

    def __init__(self, tokenizer, kind: str, spec: str, grammar: str, field: str):
        self.kind, self.spec = kind, spec
        entry = _entry(tokenizer)
        self._vocab, self._ends = entry.vocab_size, list(entry.ends)
        with entry.lock:
            proto = entry.grammars.get((kind, spec))
            if proto is not None:
                entry.grammars.move_to_end((kind, spec))
        if proto is None:
            # compiles (and validates: errors leave the matcher in an error state rather than raising)
            proto = llguidance.LLMatcher(entry.lltok, grammar, log_level=0)
            if proto.is_error():
                raise ConfigError(f"invalid {_WHAT[kind]}: {_clean(proto.get_error())}", field=field)
            with entry.lock:
                entry.grammars[(kind, spec)] = proto
                while len(entry.grammars) > GRAMMAR_CACHE_SIZE:
                    entry.grammars.popitem(last=False)
        self._proto = proto  # never advanced: every matcher is a deep copy of it

    @classmethod
    def json_schema(cls, tokenizer, schema: dict | str) -> "Grammar":
        """Outputs are JSON documents that validate against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConfigError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                                  field="json_schema") from None
        if schema is True:
            schema = {}  # the schema `true` accepts any JSON value
        if not isinstance(schema, dict):
            raise ConfigError(f"a JSON schema must be an object, got {type(schema).__name__}", field="json_schema")
        try:
            spec = json.dumps(schema, ensure_ascii=False)  # key order kept: properties come out in it
            grammar = _lib().LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot use this JSON schema: {e}", field="json_schema") from None
        return cls(tokenizer, "json_schema", spec, grammar, "json_schema")

    @classmethod
    def lark(cls, tokenizer, text: str, field: str = "grammar") -> "Grammar":
        """Outputs match a grammar in llguidance's Lark dialect, which can embed JSON schemas (`%json {...}`) and
        name special tokens by id (`<[123]>`): e.g. tool calls separated and ended by chat markers."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("the grammar must be a non-empty string", field=field)
        try:
            grammar = _lib().LLMatcher.grammar_from_lark(text)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot use this grammar: {e}", field=field) from None
        return cls(tokenizer, "lark", text, grammar, field)

    @classmethod
    def regex(cls, tokenizer, pattern: str) -> "Grammar":
        """Outputs fully match `pattern` (Rust `regex` syntax, close to Python's; no look-around or backrefs)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError("the regex must be a non-empty string", field="regex")
        grammar = _lib().LLMatcher.grammar_from_regex(pattern)
        return cls(tokenizer, "regex", pattern, grammar, "regex")

    @classmethod
    def choices(cls, tokenizer, options: list[str]) -> "Grammar":
        """Outputs are exactly one of `options`."""
        if isinstance(options, str) or not isinstance(options, (list, tuple)) or not options:
            raise ConfigError("choices must be a non-empty list of strings", field="choices")
        for o in options:
            if not isinstance(o, str) or not o:
                raise ConfigError(f"every choice must be a non-empty string, got {o!r}", field="choices")
        options = list(dict.fromkeys(options))
        # a Lark grammar of string literals; JSON string escapes are Lark's escapes too
        lark = "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
        grammar = _lib().LLMatcher.grammar_from_lark(lark)
        return cls(tokenizer, "choices", json.dumps(options, ensure_ascii=False), grammar, "choices")

    @property
    def end_token_ids(self) -> list[int]:
        return list(self._ends)

    def matcher(self) -> "Matcher":
        return Matcher(self._proto.deep_copy(), self._vocab, self._ends)

    def __repr__(self) -> str:
        spec = self.spec if len(self.spec) <= 60 else self.spec[:57] + "..."
        return f"Grammar.{self.kind}({spec})"


class Matcher:
    """One sequence's position in a grammar. The mask of the current state is computed once and reused by
    allowed_mask / apply / accept until the next token is accepted."""

    def __init__(self, m, vocab: int, ends: list[int]):
        self._m, self._vocab, self._ends = m, vocab, ends
        self._bits = np.zeros((vocab + 31) // 32, dtype=np.uint32)  # llguidance's bitmask: bit i = token i
        self._fresh = False          # _bits holds the mask of the current state
        self._bias_buf = np.empty(0, dtype=np.uint32)
        self._bias: torch.Tensor | None = None  # 0 / -inf per logit for the current state, once apply needed it
        self.num_tokens = 0

    # ---- masks ------------------------------------------------------------------------------------------------
    def _compute(self) -> None:
        if not self._fresh:
            self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self._check()
            self._fresh = True
            self._bias = None

    def _disallowed(self, size: int) -> np.ndarray:
        """uint8 [size], 1 = may NOT be sampled. Ids past the tokenizer's vocabulary (model padding) never may."""
        if size < self._vocab:
            raise ValueError(f"{size} logits for a tokenizer of {self._vocab} tokens")
        self._compute()
        # invert the packed bits first (vocab/8 bytes), then unpack: one pass over the vocabulary
        bits = np.unpackbits(np.invert(self._bits).view(np.uint8), count=self._vocab, bitorder="little")
        if size > self._vocab:
            bits = np.concatenate([bits, np.ones(size - self._vocab, dtype=np.uint8)])
        return bits

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """bool [vocab_size]: True = may be sampled next. End tokens are allowed exactly when the grammar may end."""
        return torch.from_numpy(self._disallowed(vocab_size) == 0)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of disallowed tokens to -inf, in place; logits [V] or [1, V], any dtype and device.

        Done by adding a bias of 0 / -inf: a dense add is several times faster than masked_fill_ with a
        scattered mask, and x + 0 == x, x + -inf == -inf exactly."""
        size = logits.shape[-1]
        self._compute()
        if self._bias is None or self._bias.shape[0] != size:
            if self._bias_buf.shape[0] != size:
                self._bias_buf = np.empty(size, dtype=np.uint32)
            # 0xFF800000 is the bit pattern of float32 -inf, so 1 * pattern -> -inf and 0 * pattern -> 0.0
            np.multiply(self._disallowed(size), np.uint32(0xFF800000), out=self._bias_buf, dtype=np.uint32)
            self._bias = torch.from_numpy(self._bias_buf.view(np.float32))
        return logits.add_(self._bias.to(logits.device))

    # ---- state ------------------------------------------------------------------------------------------------
    def accept(self, token: int) -> None:
        """Advance by one sampled token; ValueError (state unchanged) if the grammar does not allow it."""
        token = int(token)
        self._compute()  # already there when apply/allowed_mask ran for this step (the usual loop)
        if not (0 <= token < self._vocab and self._bits[token >> 5] >> np.uint32(token & 31) & np.uint32(1)):
            raise ValueError(f"token {token} is not allowed by the grammar here")
        if not self._m.consume_token(token):
            self._check()
        self._fresh = False
        self.num_tokens += 1

    def is_done(self) -> bool:
        """The grammar is complete and nothing more may follow: generation must stop (only end tokens remain)."""
        return self._m.is_stopped()

    def can_end(self) -> bool:
        """The grammar is complete here (the end tokens are allowed), though it may go on."""
        return self._m.is_accepting()

    def _check(self) -> None:
        if self._m.is_error():  # a limit hit or a bug: never sample from a broken mask
            raise RuntimeError(f"grammar matcher failed: {_clean(self._m.get_error())}")
