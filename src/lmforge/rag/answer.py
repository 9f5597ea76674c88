"""Answers with citations: the retrieved chunks go into the prompt as [1]..[k], the engine writes the answer.

    prompt = build_prompt(tokenizer, context=model.config.max_seq_len, question=q, hits=hits, answer_tokens=256)
    answer = answer_question(model, tokenizer, prompt, params, on_text=print)

The prompt never overflows the context: room for the answer (`answer_tokens`, at most half the context) is kept
first, then the passages go in by rank while the whole rendered prompt fits what is left; a passage that does not
fit is dropped (and listed in `Prompt.dropped`), a later, shorter one may still go in. Passages are numbered in the
order they went in, so [n] always names the n-th source of `Prompt.sources`. A checkpoint with a chat template
gets the prompt as one user turn; a base model gets it as plain text ending in "Answer:".
Generation goes through the inference engine (lmforge.infer.engine.generate, streamed).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from lmforge.errors import ConfigError
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.chat import CHAT_MARKERS, end_of_turn_id, render_chat, uses_lmforge_template

INSTRUCTION = ("Answer the question using the numbered passages below. Cite each passage you use by its number "
               "in square brackets.")
DEFAULT_ANSWER_TOKENS = 256
_CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class Source:
    n: int                      # its number in the prompt: [n]
    id: int                     # chunk id in the index
    source: str
    location: str
    text: str
    score: float

    def to_json(self) -> dict:
        return {"n": self.n, "id": self.id, "source": self.source, "location": self.location, "score": self.score,
                "text": self.text}


@dataclass
class Prompt:
    ids: list[int]
    sources: list[Source]
    dropped: list = field(default_factory=list)      # Hits that did not fit
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    chat: bool = False
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    sources: list[Source]
    dropped: list
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cited: list[int]            # the [n] the text uses that name a source
    unknown: list[int]          # the [n] the text uses that name no source


def uses_chat(tokenizer) -> bool:
    return uses_lmforge_template(tokenizer) or getattr(tokenizer, "chat_template", None) is not None


def passage(n: int, hit) -> str:
    """One numbered passage; a file is named by its base name (the sources list gives the whole path)."""
    return f"[{n}] ({os.path.basename(hit.source) or hit.source}, {hit.location})\n{hit.text.strip()}"


def content(question: str, hits: list) -> str:
    """The text of the user's turn: the instruction, the numbered passages, the question."""
    return "\n\n".join([INSTRUCTION] + [passage(n, h) for n, h in enumerate(hits, 1)]
                       + [f"Question: {question.strip()}"])


def render(tokenizer, question: str, hits: list, chat: bool) -> list[int]:
    if chat:
        ids, _ = render_chat(tokenizer, [{"role": "user", "content": content(question, hits)}],
                             add_generation_prompt=True)
        return ids
    bos = getattr(tokenizer, "bos_id", None)
    return ([bos] if bos is not None else []) + tokenizer.encode(content(question, hits) + "\nAnswer:")


def fit(render_ids, hits: list, budget: int) -> tuple[list, list, list[int]] | None:
    """(kept, dropped, ids): the hits, best first, that fit in `budget` tokens as rendered by `render_ids(kept)`;
    None when even no passage at all does not fit."""
    ids = render_ids([])
    if len(ids) > budget:
        return None
    kept, dropped = [], []
    for h in hits:
        trial = render_ids(kept + [h])
        if len(trial) <= budget:
            kept, ids = kept + [h], trial
        else:
            dropped.append(h)
    return kept, dropped, ids


def sources_of(hits: list) -> list[Source]:
    return [Source(n, h.id, h.source, h.location, h.text, float(h.score)) for n, h in enumerate(hits, 1)]


def build_prompt(tokenizer, context: int, question: str, hits: list,
                 answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> Prompt:
    """The prompt for `question` with as many of `hits` (best first) as fit (see the module docstring)."""
    answer_tokens = max(1, min(answer_tokens, context // 2))
    budget = context - answer_tokens
    chat = uses_chat(tokenizer)
    fitted = fit(lambda hs: render(tokenizer, question, hs, chat), hits, budget)
    if fitted is None:
        bare = len(render(tokenizer, question, [], chat))
        raise ConfigError(f"the question takes {bare} tokens of prompt; with {answer_tokens} kept for the "
                          f"answer the model's context of {context} leaves {budget}", field="question")
    kept, dropped, ids = fitted
    stops: list[int] = []
    if chat:
        sp = tokenizer.special_tokens
        stops = sorted({end_of_turn_id(tokenizer)} | {sp[m] for m in CHAT_MARKERS if m in sp})
    return Prompt(ids, sources_of(kept), dropped, answer_tokens, chat, stops)


def answer_question(model, tokenizer, prompt: Prompt, params: SamplingParams | None = None, on_text=None,
                    precision: str = "fp32") -> Answer:
    """Generate the answer to `prompt` through the engine, streaming each new piece of text to `on_text`."""
    params = params or SamplingParams(temperature=0.0)
    params = params.replace(max_tokens=min(params.max_tokens or prompt.answer_tokens, prompt.answer_tokens),
                            stop_token_ids=sorted(set(params.stop_token_ids or []) | set(prompt.stop_token_ids)))
    stream = generate(model, tokenizer, prompt.ids, params, stream=True, add_bos=False, precision=precision)
    for d in stream:
        if on_text is not None and d.text:
            on_text(d.text)
    res = stream.result
    numbers = [int(n) for n in dict.fromkeys(_CITATION.findall(res.text))]
    known = {s.n for s in prompt.sources}
    return Answer(res.text, prompt.sources, prompt.dropped, len(prompt.ids), len(res.token_ids), res.finish_reason,
                  [n for n in numbers if n in known], [n for n in numbers if n not in known])


__all__ = ["Source", "Prompt", "Answer", "build_prompt", "answer_question", "render", "passage", "uses_chat",
           "content", "fit", "sources_of",
           "INSTRUCTION", "DEFAULT_ANSWER_TOKENS"]
