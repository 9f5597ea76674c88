"""A request made ready for the engine: prompt ids, budget and end tokens, checked before any forward pass.

What counts as the end of a sequence: the tokenizer's EOS, and its BOS too — pretraining shards store every
document as [BOS] + text, so a base model "ends" a document by starting the next one. `ignore_eos` turns both
off; `stop_token_ids` add more. Errors the user can fix (prompt too long, ids outside the vocabulary) raise
LmforgeError here, at the call, not in the middle of a batch.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams


def end_token_ids(tokenizer) -> list[int]:
    """EOS and BOS (see the module docstring), whichever the tokenizer has."""
    ids = []
    for name in ("eos_id", "bos_id"):
        try:
            ids.append(int(getattr(tokenizer, name)))
        except (AttributeError, LmforgeError):
            pass
    return list(dict.fromkeys(ids))


def prompt_token_ids(tokenizer, prompt, add_bos: bool | None, vocab: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        if add_bos is not False:  # text prompts start a document, as in the pretraining shards
            bos = getattr(tokenizer, "bos_id", None)
            ids = ([bos] if bos is not None else []) + ids
    else:
        ids = [int(i) for i in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        if add_bos and getattr(tokenizer, "bos_id", None) is not None and ids[:1] != [tokenizer.bos_id]:
            ids = [tokenizer.bos_id] + ids
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise LmforgeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", field="prompt")
    if not ids:
        raise LmforgeError("the prompt is empty (and the tokenizer has no BOS to start from)", field="prompt")
    return ids


@dataclass
class Request:
    """Everything checked and derived before the first forward pass (so errors surface at the call)."""
    prompt_ids: list[int]
    params: SamplingParams
    vocab: int              # ids >= vocab are model padding, never sampled
    budget: int             # tokens to generate at most
    eos: list[int]          # end-of-sequence ids (masked by min_tokens)
    choice: int = 0         # which of the n completions: seeds the generator with seed + choice


def prepare(model, tokenizer, prompt, params: SamplingParams, add_bos: bool | None, choice: int = 0) -> Request:
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmforgeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{cfg.vocab_size}: they do not belong together")
    vocab = tokenizer.vocab_size  # a model may pad its vocabulary; padding is no token
    params.check_vocab(vocab)
    prompt_ids = prompt_token_ids(tokenizer, prompt, add_bos, vocab)
    if len(prompt_ids) > cfg.max_seq_len:
        raise LmforgeError(f"the prompt has {len(prompt_ids)} tokens, more than the model's context of "
                           f"{cfg.max_seq_len} tokens (max_seq_len)", field="prompt")
    # the last sampled token is never fed back, so a full context still yields one token
    room = cfg.max_seq_len - len(prompt_ids) + 1
    budget = room if params.max_tokens is None else min(params.max_tokens, room)
    eos = [] if params.ignore_eos else end_token_ids(tokenizer)
    return Request(prompt_ids, params, vocab, budget, eos, choice)
