"""The Tokenizer: a trained byte-level BPE (merges + split pattern + special tokens) that encodes with tiktoken.

Training happens in `bpe.py`; this object only *uses* the merges. The merges are the source of truth:
merge i turns the pair (left_id, right_id) into the new id 256 + i, ids 0..255 are the raw bytes, and the
special tokens come right after the merges. From the merges we build, offline, a `tiktoken.Encoding`
(mergeable ranks = bytes of each token -> its id), so encoding runs in tiktoken's Rust code, threads included.

tiktoken merges by the rank of the *merged bytes*, Hugging Face's BPE by the rank of the *merge pair*; for
ranks produced by BPE training the two agree (tests check it against `tokenizers` on many scripts).

A vocabulary trained elsewhere (a Hugging Face GPT-2 / Llama-3 / Qwen2 tokenizer.json) rarely has that layout:
its bytes are not ids 0..255, its specials sit anywhere, its merge order need not be its id order.
`Tokenizer.from_vocab` takes such a vocabulary as it is (token bytes per id, merges in priority order, specials
with their ids, which special is BOS/EOS/PAD) and keeps its ids; it encodes through tiktoken all the same, with
ranks derived from the merge order and mapped back to ids when the two orders differ.

Plain text never produces a special token: "<|bos|>" typed in a document is encoded as ordinary text.
Specials are added on purpose only (`bos=True`, `eos=True`, or by the chat template via `special_tokens`).

On disk (`save` / `load`), a tokenizer is a directory:
    tokenizer.model        text: a header line, then one merge per line "left_id right_id" (in merge order);
                           format v2 (a vocabulary from elsewhere) first lists the bytes of every id in hex
    tokenizer_meta.json    pattern, special tokens, sizes, format version and the hash of all of it
                           (plus the chat template, if any: it does not change encodings, so not in the hash)
    tokenizer.json         the same tokenizer for Hugging Face `tokenizers` / `transformers` (see export_hf)
    tokenizer_config.json  transformers' side file (tokenizer class, bos/eos/pad names, chat template: the
                           tokenizer's own, or lmforge's as Jinja when it has our chat tokens)
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import tiktoken

from lmforge.version import __version__
from lmforge.errors import CheckpointError, ConfigError, LmforgeError, read_json_object
from lmforge.io import atomic_dir, atomic_write_text, check_replaceable_dir
from lmforge.tokenizer.chat import (ASSISTANT, END, LMFORGE_CHAT_TEMPLATE, SYSTEM, TOOL, TOOL_CALL,  # noqa: F401
                                    TOOL_RESULT, USER, render_chat, uses_lmforge_template)

# ---------------------------------------------------------------------------------------------------------
# Special tokens. ONE list, in id order (first special id = 256 + n_merges). Later stages import these names
# (the chat template uses the role markers). The list is padded with reserved slots to a round 16 so that
# new specials can be given meaning later without changing the vocabulary size of trained models.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# the chat markers (SYSTEM, USER, ASSISTANT, TOOL, END, TOOL_CALL, TOOL_RESULT) are defined with the chat template
N_SPECIAL_SLOTS = 16
SPECIAL_TOKENS: list[str] = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, TOOL, END, TOOL_CALL, TOOL_RESULT]
SPECIAL_TOKENS += [f"<|reserved_{i}|>" for i in range(N_SPECIAL_SLOTS - len(SPECIAL_TOKENS))]

MODEL_FILE, META_FILE = "tokenizer.model", "tokenizer_meta.json"
HF_FILE, HF_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
FORMAT_NAME, FORMAT_VERSION = "lmforge-bpe", 2   # v1: our own id layout; v2: a vocabulary from elsewhere
NORMALIZERS = ("NFC",)  # text normalizations an imported tokenizer may ask for (Qwen2 uses NFC)


class MissingTokenError(LmforgeError, AttributeError):
    """The tokenizer has no such special token (e.g. no BOS). Also an AttributeError, so that
    `getattr(tok, "bos_id", None)` reads a missing BOS as None."""


class Tokenizer:
    """Byte-level BPE tokenizer. Build it from merges, `Tokenizer.train(...)` it, or `Tokenizer.load(dir)` it."""

    def __init__(self, merges: Sequence[tuple[int, int]], pattern: str, special_tokens: list[str] | None = None):
        self.merges: tuple[tuple[int, int], ...] = tuple((int(a), int(b)) for a, b in merges)
        self.pattern = pattern
        specials = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if len(set(specials)) != len(specials):
            raise ConfigError("special tokens must be distinct", field="special_tokens")

        # bytes of every id: 0..255 raw bytes, then each merge concatenates its two parts
        token_bytes = [bytes([i]) for i in range(256)]
        seen: dict[bytes, int] = {b: i for i, b in enumerate(token_bytes)}
        for i, (a, b) in enumerate(self.merges):
            new_id = 256 + i
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(f"merge {i} ({a}, {b}) uses an id that does not exist yet (< {new_id})")
            tb = token_bytes[a] + token_bytes[b]
            # tiktoken (and HF's vocab) map bytes -> ONE id; two merges making the same bytes cannot be encoded
            if tb in seen:
                raise ValueError(f"merge {i} ({a}, {b}) makes {tb!r}, which is already token {seen[tb]}")
            seen[tb] = new_id
            token_bytes.append(tb)
        first_special = 256 + len(self.merges)
        self.special_tokens: dict[str, int] = {s: first_special + j for j, s in enumerate(specials)}
        self._token_bytes = token_bytes + [s.encode("utf-8") for s in specials]
        self._roles: dict[str, str | None] = {"bos": BOS, "eos": EOS, "pad": PAD}
        self._own_layout = True      # ids: 256 bytes, then merges, then specials (saved as format v1)
        self.normalizer: str | None = None
        self.chat_template: str | None = None  # a Jinja chat template (Hugging Face style), if one came with it
        self._compile(seen, self.special_tokens)

    def _compile(self, ranks: dict[bytes, int], specials: dict[str, int], rank_to_id: list[int] | None = None):
        """Build the tiktoken Encoding. `rank_to_id` maps tiktoken's output (ranks) to our ids when they differ."""
        self._hash = None
        self._rank_to_id = rank_to_id
        try:
            self._enc = tiktoken.Encoding(name=f"lmforge-{len(self._token_bytes)}", pat_str=self.pattern,
                                          mergeable_ranks=ranks, special_tokens=specials)
            self._enc.encode_ordinary("probe 123")  # compiles the regex now, not at the first real call
        except ValueError as e:  # fancy-regex compile errors surface here
            raise ConfigError(f"split pattern is not a valid regex: {e}", field="pattern") from None
        if rank_to_id is None and self.normalizer is None:
            self._encode_ordinary = self._enc.encode_ordinary  # the common case: no Python per token
        else:
            self._encode_ordinary = self._encode_mapped

    def _encode_mapped(self, text: str) -> list[int]:
        if self.normalizer is not None:
            text = unicodedata.normalize(self.normalizer, text)
        ranks = self._enc.encode_ordinary(text)
        r2i = self._rank_to_id
        return ranks if r2i is None else [r2i[r] for r in ranks]

    @classmethod
    def from_vocab(cls, vocab: Mapping[bytes, int], merges: Sequence[tuple[bytes, bytes]], pattern: str,
                   special_tokens: Mapping[str, int], *, bos: str | None = None, eos: str | None = None,
                   pad: str | None = None, normalizer: str | None = None,
                   chat_template: str | None = None) -> "Tokenizer":
        """A tokenizer over an existing byte-level BPE vocabulary, keeping its ids.

        vocab: bytes of every ordinary token -> its id (all 256 single bytes among them); merges: (left, right)
        byte pairs in priority order, each making a token of `vocab`; special_tokens: text -> id; bos/eos/pad:
        which special plays that role (None: none does); normalizer: None or "NFC", applied before splitting.
        Together the ids must be exactly 0..N-1. Bad input raises ValueError.
        A vocabulary that happens to have our own layout (one we exported, say) gives the same tokenizer,
        hash and files as the original."""
        specials = dict(special_tokens)
        n = len(vocab) + len(specials)
        token_bytes: list[bytes | None] = [None] * n
        for tb, i in [(bytes(b), i) for b, i in vocab.items()] + [(s.encode("utf-8"), i) for s, i in specials.items()]:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n or token_bytes[i] is not None:
                raise ValueError(f"token {tb[:40]!r} has id {i!r}: ids must be distinct and cover 0..{n - 1}")
            if not tb:
                raise ValueError(f"token {i} is empty")
            token_bytes[i] = tb
        missing = [b for b in range(256) if bytes([b]) not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} single-byte token(s) (e.g. byte 0x{missing[0]:02x}):"
                             " byte-level BPE needs all 256")
        triples = []  # (left id, right id, id made)
        for k, (a, b) in enumerate(merges):
            ids = (vocab.get(a), vocab.get(b), vocab.get(a + b))
            if None in ids:
                raise ValueError(f"merge {k} ({a!r}, {b!r}) uses or makes a token that is not in the vocabulary")
            triples.append(ids)
        roles = {"bos": bos, "eos": eos, "pad": pad}
        for role, name in roles.items():
            if name is not None and name not in specials:
                raise ValueError(f"{role} token {name!r} is not one of the special tokens")
        if normalizer is not None and normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer {normalizer!r} is not supported (supported: {', '.join(NORMALIZERS)})")
        order = sorted(specials, key=specials.__getitem__)

        n_ordinary = len(vocab)
        own = (normalizer is None and n_ordinary == 256 + len(triples)
               and all(vocab[bytes([b])] == b for b in range(256))
               and all(made == 256 + k for k, (_, _, made) in enumerate(triples))
               and all(specials[s] == n_ordinary + j for j, s in enumerate(order))
               and all(roles[r] == (d if d in specials else None)
                       for r, d in (("bos", BOS), ("eos", EOS), ("pad", PAD))))
        if own:
            tok = cls([(a, b) for a, b, _ in triples], pattern, order)
            tok.chat_template = chat_template
            return tok

        tok = cls.__new__(cls)
        tok.merges = tuple((a, b) for a, b, _ in triples)
        tok.pattern = pattern
        tok.special_tokens = {s: specials[s] for s in order}
        tok._token_bytes = token_bytes
        tok._roles = roles
        tok._own_layout = False
        tok._special_ids = frozenset(specials.values())
        tok.normalizer = normalizer
        tok.chat_template = chat_template
        # tiktoken merges by rank of the merged bytes and returns ranks. If the ids already grow in merge order
        # (GPT-2, Llama 3, Qwen2), the ids are the ranks; otherwise ranks follow the merge order (single bytes
        # first: they are never merged into, so their rank does not matter; tokens no merge makes last).
        made = list(dict.fromkeys(m for _, _, m in triples))
        if all(x < y for x, y in zip(made, made[1:])):
            tok._compile({token_bytes[i]: i for i in vocab.values()}, {})
        else:
            singles = [vocab[bytes([b])] for b in range(256)]
            done = set(made) | set(singles)
            order_ids = singles + made + [i for i in sorted(vocab.values()) if i not in done]
            tok._compile({token_bytes[i]: r for r, i in enumerate(order_ids)}, {}, order_ids)
        return tok

    # ---- training -------------------------------------------------------------------------------------
    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int, pattern: str = "gpt4", min_frequency: int = 2,
              progress: bool = True, special_tokens: list[str] | None = None) -> "Tokenizer":
        """Learn merges on `docs`. `vocab_size` counts the 256 byte tokens and the special tokens too,
        so the trainer learns vocab_size - 256 - n_specials merges (fewer if pairs run out below min_frequency)."""
        specials = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        num_merges = vocab_size - 256 - len(specials)
        if num_merges < 0:
            raise ConfigError(f"vocab size {vocab_size} is too small: it must be at least "
                              f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)",
                              field="vocab_size")
        from lmforge.tokenizer.bpe import resolve_pattern, train_bpe  # the trainer is only needed here
        regex = resolve_pattern(pattern)
        merges = train_bpe(docs, num_merges, pattern=regex, min_frequency=min_frequency,
                           progress=progress) if num_merges else []
        return cls(merges, regex, specials)

    # ---- sizes and ids --------------------------------------------------------------------------------
    @property
    def n_merges(self) -> int:
        return len(self.merges)

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    def special_id(self, token: str) -> int:
        try:
            return self.special_tokens[token]
        except KeyError:
            raise MissingTokenError(f"this tokenizer has no special token {token}") from None

    def role_token(self, role: str) -> str | None:
        """The special token that plays `role` ('bos', 'eos' or 'pad'), or None. Ours: <|bos|>, <|eos|>, <|pad|>;
        an imported tokenizer keeps its own (e.g. Llama 3's <|begin_of_text|>)."""
        name = self._roles.get(role)
        return name if name in self.special_tokens else None

    def _role_id(self, role: str) -> int:
        name = self._roles.get(role)
        if name is None:
            raise MissingTokenError(f"this tokenizer has no {role.upper()} token")
        return self.special_id(name)

    @property
    def bos_id(self) -> int:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int:
        return self._role_id("eos")

    @property
    def pad_id(self) -> int:
        return self._role_id("pad")

    def is_special(self, i: int) -> bool:
        if self._own_layout:
            return i >= 256 + len(self.merges)
        return i in self._special_ids

    def id_to_bytes(self, i: int) -> bytes:
        """The bytes of one token (a special token gives its text). A lone token may be a partial UTF-8 char."""
        self._check_ids([i])
        return self._token_bytes[i]

    def token_str(self, i: int) -> str:
        """One token as readable text; bytes that are not whole UTF-8 characters show as \\xNN."""
        return self.id_to_bytes(i).decode("utf-8", errors="backslashreplace")

    # ---- encode / decode ------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids. Special-token strings inside `text` are ordinary text; bos/eos add the real ones."""
        ids = self._encode_ordinary(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = 2) -> list[list[int]]:
        """Many texts at once: one thread per contiguous group of texts (tiktoken's Rust code releases the GIL).
        tiktoken's own batch call submits a task per text, whose overhead dominates for short documents."""
        texts = list(texts)
        enc = self._encode_ordinary
        if num_threads <= 1 or len(texts) < 2:
            out = [enc(t) for t in texts]
        else:
            from concurrent.futures import ThreadPoolExecutor
            k = -(-len(texts) // num_threads)
            groups = [texts[i:i + k] for i in range(0, len(texts), k)]
            with ThreadPoolExecutor(len(groups)) as pool:
                out = [ids for part in pool.map(lambda g: [enc(t) for t in g], groups) for ids in part]
        if bos or eos:
            b, e = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
            out = [b + ids + e for ids in out]
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        ids = self._check_ids(ids)
        if self._own_layout:
            return self._enc.decode_bytes(ids)
        return b"".join(map(self._token_bytes.__getitem__, ids))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Never fails on byte sequences that are not valid UTF-8 (a model can emit half a
        character): those become U+FFFD. An id outside the vocabulary is an error (LmforgeError)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _check_ids(self, ids) -> list[int]:
        if hasattr(ids, "tolist"):  # numpy array / torch tensor
            ids = ids.tolist()
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise LmforgeError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def render_chat(self, messages, tools=None, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation in this tokenizer's chat template (lmforge.tokenizer.chat)."""
        return render_chat(self, messages, tools, add_generation_prompt)

    # ---- identity ---------------------------------------------------------------------------------------
    def hash(self) -> str:
        """sha256 of merges + pattern + specials: equal hashes mean identical encodings (token shards record it)."""
        if self._hash is None:
            self._hash = self._compute_hash()
        return self._hash

    def _compute_hash(self) -> str:
        if self._own_layout:  # unchanged since v1: token shards on disk record these hashes
            blob = json.dumps({"format": FORMAT_NAME, "merges": self.merges, "pattern": self.pattern,
                               "special_tokens": list(self.special_tokens)}, separators=(",", ":"))
        else:
            blob = json.dumps({"format": FORMAT_NAME, "version": 2, "tokens": self._token_hex(),
                               "merges": self.merges, "pattern": self.pattern,
                               "special_tokens": list(self.special_tokens.items()), "roles": self._roles,
                               "normalizer": self.normalizer}, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _token_hex(self) -> list[str]:
        """Every id's bytes in hex, '-' for a special (its text is in special_tokens)."""
        return ["-" if self.is_special(i) else tb.hex() for i, tb in enumerate(self._token_bytes)]

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.hash() == other.hash()

    def __hash__(self) -> int:
        return hash(self.hash())

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, n_merges={self.n_merges}, "
                f"n_special={len(self.special_tokens)}, hash={self.hash()[:12]})")

    # ---- save / load ----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write our own files plus the Hugging Face tokenizer.json / tokenizer_config.json, all at once
        (lmforge.io.atomic_dir): an existing tokenizer there is replaced, any other non-empty directory is not."""
        d = Path(directory)
        check_replaceable_dir(d, MODEL_FILE)
        version = 1 if self._own_layout else 2  # v1 files stay readable by every lmforge that reads v1
        lines = [f"{FORMAT_NAME} v{version}"]
        if version == 2:
            lines += [f"tokens {self.vocab_size}", *self._token_hex(), f"merges {self.n_merges}"]
        lines += [f"{a} {b}" for a, b in self.merges]
        meta = {"format": FORMAT_NAME, "version": version, "lmforge_version": __version__,
                "pattern": self.pattern,
                "special_tokens": list(self.special_tokens) if version == 1 else self.special_tokens,
                "n_merges": self.n_merges, "vocab_size": self.vocab_size, "hash": self.hash()}
        if version == 2:
            meta.update(roles=self._roles, normalizer=self.normalizer)
        if self.chat_template is not None:
            meta["chat_template"] = self.chat_template
        with atomic_dir(d) as tmp:
            atomic_write_text(tmp / MODEL_FILE, "\n".join(lines) + "\n")
            atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            self.export_hf(tmp)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read a directory written by `save` (or a checkpoint directory holding one in `tokenizer/`)."""
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError("tokenizer directory not found", file=str(d))
        if not (d / META_FILE).exists() and (d / "tokenizer" / META_FILE).exists():
            d = d / "tokenizer"
        meta_path, model_path = d / META_FILE, d / MODEL_FILE
        meta = _read_json(meta_path)
        for key, typ in (("format", str), ("version", int), ("pattern", str), ("hash", str)):
            if not isinstance(meta.get(key), typ):
                raise CheckpointError(f"missing or invalid '{key}'", file=str(meta_path), field=key)
        version = meta["version"]
        if meta["format"] != FORMAT_NAME or version not in (1, 2):
            raise CheckpointError(f"unsupported tokenizer format {meta['format']} v{meta['version']} "
                                  f"(this lmforge reads {FORMAT_NAME} v1 to v{FORMAT_VERSION})", file=str(meta_path))
        for key, typ in [("special_tokens", list if version == 1 else dict), ("chat_template", (str, type(None)))] + \
                [("roles", dict), ("normalizer", (str, type(None)))] * (version == 2):
            if not isinstance(meta.get(key), typ):
                raise CheckpointError(f"missing or invalid '{key}'", file=str(meta_path), field=key)
        tokens, merges = _read_model_file(model_path, version)
        try:
            if version == 1:
                tok = cls(merges, meta["pattern"], meta["special_tokens"])
            else:
                tok = cls._from_saved(tokens, merges, meta)
        except (ValueError, TypeError, LmforgeError) as e:
            raise CheckpointError(f"corrupt tokenizer: {e}", file=str(model_path)) from None
        tok.chat_template = meta.get("chat_template")
        if tok.hash() != meta["hash"]:
            raise CheckpointError(f"hash mismatch: {MODEL_FILE} and {META_FILE} do not belong together "
                                  "(edited or mixed files)", file=str(d))
        return tok

    @classmethod
    def _from_saved(cls, tokens: list[str], merges: list[tuple[int, int]], meta: dict) -> "Tokenizer":
        """Format v2: hex bytes per id ('-' = special) + merges as id pairs -> from_vocab."""
        specials = meta["special_tokens"]
        token_bytes = [None if h == "-" else bytes.fromhex(h) for h in tokens]
        if sorted(i for i, tb in enumerate(token_bytes) if tb is None) != sorted(specials.values()):
            raise ValueError("the special tokens' ids do not match the '-' lines")
        vocab = {tb: i for i, tb in enumerate(token_bytes) if tb is not None}
        if len(vocab) + len(specials) != len(tokens):
            raise ValueError("two ids have the same bytes")
        pairs = []
        for a, b in merges:
            if not (a < len(tokens) and b < len(tokens)) or token_bytes[a] is None or token_bytes[b] is None:
                raise ValueError(f"merge ({a}, {b}) uses an id that is not an ordinary token")
            pairs.append((token_bytes[a], token_bytes[b]))
        roles = {r: meta["roles"].get(r) for r in ("bos", "eos", "pad")}
        return cls.from_vocab(vocab, pairs, meta["pattern"], specials, normalizer=meta["normalizer"], **roles)

    # ---- Hugging Face ---------------------------------------------------------------------------------
    def to_hf_json(self) -> dict:
        """The `tokenizers` JSON: byte-level BPE whose vocab strings use GPT-2's bytes->unicode alphabet.

        Pre-tokenization: our split regex (Split, isolated) then ByteLevel without its own regex.
        `ignore_merges=True` makes a pre-split piece that is itself a vocab entry one token, as tiktoken does.
        Difference to our `encode`: HF matches added (special) tokens in raw text, so "<|bos|>" in a text
        becomes the special id there; set `tok.encode_special_tokens = True` (tokenizers) or
        `split_special_tokens=True` (transformers) for exactly our plain-text behaviour.
        """
        b2u = bytes_to_unicode()
        as_str = {i: ''.join(b2u[b] for b in tb) for i, tb in enumerate(self._token_bytes) if not self.is_special(i)}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in self.special_tokens.items()],
            "normalizer": {"type": self.normalizer} if self.normalizer else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True,
                      "vocab": {s: i for i, s in as_str.items()},
                      "merges": [[as_str[a], as_str[b]] for a, b in self.merges]},
        }

    def export_hf(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json, loadable by `tokenizers.Tokenizer.from_file` and
        `transformers.PreTrainedTokenizerFast` / `AutoTokenizer.from_pretrained(directory)`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / HF_FILE, json.dumps(self.to_hf_json(), ensure_ascii=False) + "\n")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000,
                  "clean_up_tokenization_spaces": False, "add_prefix_space": False,
                  "lmforge_tokenizer_hash": self.hash()}
        roles = {key: self.role_token(role) for key, role in (("bos_token", "bos"), ("eos_token", "eos"),
                                                               ("pad_token", "pad"))}
        config.update({key: name for key, name in roles.items() if name is not None})
        config["additional_special_tokens"] = [s for s in self.special_tokens if s not in roles.values()]
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        elif uses_lmforge_template(self):  # ours, as Jinja: apply_chat_template gives our render_chat ids
            config["chat_template"] = LMFORGE_CHAT_TEMPLATE
        atomic_write_text(d / HF_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return d / HF_FILE


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map (HF byte-level BPE vocab strings use it):
    printable latin-1 bytes map to themselves, the other 68 bytes to chars from U+0100 upward."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _read_json(path: Path) -> dict:
    return read_json_object(path, missing="file not found (not a tokenizer directory?)")


def _read_model_file(path: Path, version: int) -> tuple[list[str] | None, list[tuple[int, int]]]:
    """tokenizer.model -> (v2: hex bytes per id, else None; merges as id pairs)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CheckpointError("file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read: {e}", file=str(path)) from None
    header = f"{FORMAT_NAME} v{version}"
    if not lines or lines[0].strip() != header:
        raise CheckpointError(f"first line must be '{header}'", file=str(path), line=1)
    tokens, start = None, 2
    if version == 2:
        def count(line_no: int, word: str) -> int:
            parts = lines[line_no - 1].split() if line_no <= len(lines) else []
            if len(parts) != 2 or parts[0] != word or not parts[1].isdigit():
                raise CheckpointError(f"expected '{word} N'", file=str(path), line=line_no)
            return int(parts[1])
        n_tokens = count(2, "tokens")
        tokens = [t.strip() for t in lines[2:2 + n_tokens]]
        for k, t in enumerate(tokens):
            if t != "-" and (not t or len(t) % 2 or any(c not in "0123456789abcdef" for c in t)):
                raise CheckpointError(f"expected a token's bytes in hex or '-', got {t[:40]!r}", file=str(path),
                                      line=3 + k)
        count(3 + n_tokens, "merges")
        start = 4 + n_tokens
    merges = []
    for n, line in enumerate(lines[start - 1:], start=start):
        parts = line.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise CheckpointError(f"expected two token ids 'left right', got {line[:40]!r}", file=str(path), line=n)
        merges.append((int(parts[0]), int(parts[1])))
    return tokens, merges
