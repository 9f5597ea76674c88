"""A Hugging Face byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) -> our Tokenizer, same ids.

What carries over: every token's bytes and id, the merges in their priority order, the split regex, the added
(special) tokens with their ids, which of them is BOS / EOS / PAD, NFC normalization (Qwen2), and the chat
template (tokenizer_config.json or chat_template.jinja).

What is supported, because it is what GPT-2, Llama 3, Qwen2 and Mistral-with-tiktoken-style vocabularies use:
  model          BPE over GPT-2's byte alphabet (no byte_fallback, dropout, subword prefix or word suffix)
  pre_tokenizer  ByteLevel(use_regex=true)                        -> GPT-2's split regex
                 Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)]   -> that regex (Llama 3, Qwen2)
  normalizer     none, or NFC
Anything else (SentencePiece/Unigram/WordPiece models, byte fallback, Metaspace, lowercasing...) is refused with a
message that says so, rather than imported into a tokenizer that would give other ids.

One documented difference (as for our own tokenizers): HF matches added tokens inside raw text, we never do;
`encode` turns "<|im_start|>" typed in a document into ordinary text. Added tokens that HF marks non-special
(e.g. Qwen2.5's "<tool_call>") become special tokens here too.
"""
from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import CheckpointError, ConfigError, LmforgeError, read_json_object
from lmforge.tokenizer.bpe import GPT2_PATTERN
from lmforge.tokenizer.tokenizer import NORMALIZERS, Tokenizer, bytes_to_unicode

SUPPORTED = ("byte-level BPE tokenizer.json (model BPE without byte_fallback; pre-tokenizer ByteLevel with its "
             "regex [GPT-2] or Split regex + ByteLevel [Llama 3, Qwen2]; normalizer none or NFC)")


def read_hf_tokenizer(directory: str | Path) -> Tokenizer:
    """Our Tokenizer from a Hugging Face model or tokenizer directory (reads tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, chat_template.jinja and config.json where present)."""
    d = Path(directory)
    path = d / "tokenizer.json"
    if not path.is_file():
        hint = " (a SentencePiece tokenizer.model is not supported)" if (d / "tokenizer.model").is_file() else ""
        raise CheckpointError(f"no tokenizer.json{hint}; supported: {SUPPORTED}", file=str(d))
    tj = read_json_object(path)
    file = str(path)

    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer model {model.get('type')!r} is not supported; supported: {SUPPORTED}",
                          file=file, field="model.type")
    for key, ok in (("byte_fallback", (False, None)), ("dropout", (None,)), ("continuing_subword_prefix", (None, "")),
                    ("end_of_word_suffix", (None, ""))):
        if model.get(key) not in ok:
            raise ConfigError(f"{key}={model.get(key)!r} is not supported; supported: {SUPPORTED}",
                              file=file, field=f"model.{key}")
    pattern = _pattern(tj.get("pre_tokenizer"), file)
    normalizer = _normalizer(tj.get("normalizer"), file)
    decoder = tj.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise ConfigError(f"decoder {decoder.get('type')!r} is not supported (byte-level BPE decodes with ByteLevel)",
                          file=file, field="decoder")

    # added tokens are our specials; GPT-2-style files list them in the BPE vocab too
    specials: dict[str, int] = {}
    for t in tj.get("added_tokens") or []:
        if t["content"] in specials and specials[t["content"]] != t["id"]:
            raise ConfigError(f"added token {t['content']!r} appears twice", file=file, field="added_tokens")
        specials[t["content"]] = t["id"]
    special_ids = set(specials.values())

    u2b = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(s: str) -> bytes:
        try:
            return bytes(u2b[c] for c in s)
        except KeyError:
            raise ConfigError(f"vocabulary entry {s[:30]!r} is not in GPT-2's byte alphabet: not a byte-level BPE; "
                              f"supported: {SUPPORTED}", file=file, field="model.vocab") from None

    vocab = {to_bytes(s): i for s, i in model.get("vocab", {}).items() if i not in special_ids}
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ") if isinstance(m, str) else m
        merges.append((to_bytes(a), to_bytes(b)))

    config = read_json_object(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    roles = _roles(d, config, specials)
    try:
        return Tokenizer.from_vocab(vocab, merges, pattern, specials, normalizer=normalizer,
                                    chat_template=_chat_template(d, config), **roles)
    except (ValueError, LmforgeError) as e:
        raise ConfigError(f"cannot use this tokenizer: {e}", file=file) from None


def _pattern(pre: dict | None, file: str) -> str:
    """The split regex the pre-tokenizer applies before the bytes are mapped to GPT-2's alphabet."""
    def byte_level(p, use_regex):
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == use_regex)

    if pre is not None:
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        if len(steps) == 1 and byte_level(steps[0], True):
            return GPT2_PATTERN  # the regex built into ByteLevel is GPT-2's
        if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False):
            split = steps[0]
            regex = (split.get("pattern") or {}).get("Regex")
            if regex is not None and split.get("behavior") == "Isolated" and not split.get("invert", False):
                return regex
    desc = json.dumps(pre)[:120] if pre is not None else "none"
    raise ConfigError(f"pre-tokenizer {desc} is not supported; supported: {SUPPORTED}", file=file,
                      field="pre_tokenizer")


def _normalizer(norm: dict | None, file: str) -> str | None:
    steps = [] if norm is None else norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    kinds = [s.get("type") for s in steps]
    if not kinds:
        return None
    if len(kinds) == 1 and kinds[0] in NORMALIZERS:
        return kinds[0]
    raise ConfigError(f"normalizer {'+'.join(map(str, kinds))} is not supported (it changes the text before "
                      f"splitting); supported: none, {', '.join(NORMALIZERS)}", file=file, field="normalizer")


def _token_name(v) -> str | None:
    """tokenizer_config values are a string, an AddedToken dict {"content": ...}, or null."""
    return v.get("content") if isinstance(v, dict) else v


def _roles(d: Path, config: dict, specials: dict[str, int]) -> dict[str, str | None]:
    """bos/eos/pad from tokenizer_config.json (an explicit null counts: Qwen2 has no BOS), else
    special_tokens_map.json; eos/pad else from the ids in config.json. BOS never comes from config.json: that id
    is for the model, and a tokenizer that does not declare a BOS does not start prompts with one."""
    stm = read_json_object(d / "special_tokens_map.json") if (d / "special_tokens_map.json").is_file() else {}
    model_cfg = read_json_object(d / "config.json") if (d / "config.json").is_file() else {}
    by_id = {i: s for s, i in specials.items()}
    roles = {}
    for role in ("bos", "eos", "pad"):
        key = f"{role}_token"
        name = _token_name(config[key] if key in config else stm.get(key))
        if name is None and key not in config and role != "bos":
            i = model_cfg.get(f"{role}_token_id")
            i = i[0] if isinstance(i, list) and i else i
            name = by_id.get(i) if isinstance(i, int) else None
        if name is not None and name not in specials:
            raise ConfigError(f"{role}_token {name!r} is not an added (special) token of tokenizer.json",
                              file=str(d / "tokenizer_config.json"), field=f"{role}_token")
        roles[role] = name
    return roles


def _chat_template(d: Path, config: dict) -> str | None:
    if (d / "chat_template.jinja").is_file():  # transformers >= 4.47 writes it next to the config
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):  # several named templates: the default one is the chat template
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None
