"""The UI's two views inside the model, as JSON endpoints.

POST /v1/lmforge/tokenize   {"text"}  ->  every token (id, text, byte span, character span) and the text's
                            statistics: tokens, bytes, characters, whitespace-separated words, tokens per word,
                            bytes per token. A token may end inside a character (byte-level BPE): its character
                            span then covers the whole character.
POST /v1/lmforge/attention  {"text"} or {"messages"} (rendered with the chat template, no generation prompt),
                            "layer", "head"  ->  the token labels and the [T, T] attention weights of that layer
                            and head (row i: where token i looks; causal, each row sums to 1), computed by
                            lmforge.infer.inspect.attention_maps.
"""
from __future__ import annotations

from typing import Any

from lmforge.errors import LmforgeError
from lmforge.infer.inspect import attention_maps, checked_ids
from lmforge.serve.openai_api import ApiError, Body
from lmforge.tokenizer.chat import render_chat

MAX_TOKENIZE_CHARS = 100_000
MAX_ATTENTION_TOKENS = 512      # T x T weights go back as JSON: keep the answer small enough for a browser


class TokenizeBody(Body):
    text: str


class AttentionBody(Body):
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    layer: int = 0
    head: int = 0


def tokenize(tok, body: TokenizeBody) -> dict:
    text = body.text
    if len(text) > MAX_TOKENIZE_CHARS:
        raise ApiError(400, f"the text has {len(text)} characters, more than {MAX_TOKENIZE_CHARS}", param="text")
    ids = tok.encode(text)
    data = text.encode("utf-8")
    # character index of every byte offset that starts a character (and of the end)
    char_at, c = [], 0
    for ch in text:
        char_at += [c] * len(ch.encode("utf-8"))
        c += 1
    char_at.append(c)
    tokens, b = [], 0
    for i in ids:
        raw = tok.id_to_bytes(i)
        start, end = b, b + len(raw)
        c0 = char_at[start]
        c1 = char_at[end] if end == len(data) or _starts_char(data, end) else char_at[end] + 1
        tokens.append({"id": i, "text": raw.decode("utf-8", errors="replace"), "bytes": len(raw),
                       "byte_start": start, "byte_end": end, "char_start": c0, "char_end": c1})
        b = end
    words = len(text.split())
    return {"tokens": tokens, "n_tokens": len(ids), "n_bytes": len(data), "n_chars": len(text), "n_words": words,
            "tokens_per_word": len(ids) / words if words else None,
            "bytes_per_token": len(data) / len(ids) if ids else None}


def _starts_char(data: bytes, at: int) -> bool:
    return (data[at] & 0xC0) != 0x80


def attention_ids(tok, model, body: AttentionBody) -> list[int]:
    """The token ids to look at (checked: present, not too many, layer and head in range)."""
    cfg = model.config
    if (body.text is None) == (body.messages is None):
        raise ApiError(400, "give either text or messages", param="text")
    if not 0 <= body.layer < cfg.n_layer:
        raise ApiError(400, f"must be in [0, {cfg.n_layer - 1}], got {body.layer}", param="layer")
    if not 0 <= body.head < cfg.n_head:
        raise ApiError(400, f"must be in [0, {cfg.n_head - 1}], got {body.head}", param="head")
    try:
        if body.messages is not None:
            ids, _ = render_chat(tok, body.messages)
        else:
            ids = checked_ids(tok, body.text, "text", add_bos=True)
    except LmforgeError as e:
        raise ApiError.from_lmforge(e, param="messages" if body.messages is not None else "text") from None
    limit = min(MAX_ATTENTION_TOKENS, cfg.max_seq_len)
    if len(ids) > limit:
        raise ApiError(400, f"the text has {len(ids)} tokens, {len(ids) - limit} more than the {limit} this view "
                            "shows", param="text", code="context_length_exceeded")
    return ids


def attention(model, tok, ids: list[int], body: AttentionBody) -> dict:
    labels, attn = attention_maps(model, tok, ids, add_bos=False)
    weights = attn[body.layer, body.head]
    return {"tokens": labels, "token_ids": ids, "layer": body.layer, "head": body.head,
            "n_layer": attn.shape[0], "n_head": attn.shape[1],
            "attention": [[round(float(w), 5) for w in row] for row in weights.tolist()]}
