"""Completions and chat completions: a body becomes engine requests, their outputs become OpenAI responses.

Both endpoints produce the same internal events (`Event`: a choice's new text, tokens and logprobs; its tool
calls; its finish reason), which `stream_*` turns into SSE chunks and `collect_*` into one response object, so a
streamed and a plain request are the same generation told two ways.

A chat reply follows the project's tool-call format (lmforge.infer.assistant): phase 1 is free text that ends at a
chat marker; when it ends at <|tool_call|> and tools are offered, phase 2 continues from there under
`tool_call_grammar` (one JSON alternative per tool: arguments valid under that tool's schema) up to <|end|>.
tool_choice "required" (or a named function) skips phase 1. The server never runs the tools: it returns the
calls, and the client sends the results back as `tool` messages, as with OpenAI.

Retrieval (`lmforge serve --rag-db FILE`, a chat body with `"rag": true` or `{"k": 5, "mode": "hybrid"}`): the last
user message is the question; the best chunks of the index go into that message as numbered passages, as many as
fit the context with room for the answer (lmforge.rag.answer), and the response carries them as `sources`
(`[{n, id, source, location, score, text}]`, in the first chunk of a stream), so [n] in the answer can be shown.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.infer.assistant import check_tool_use, parse_tool_calls, tool_call_grammar
from lmforge.infer.constrained import Grammar
from lmforge.infer.request import prompt_token_ids
from lmforge.infer.tools import Tool
from lmforge.rag.answer import DEFAULT_ANSWER_TOKENS, content, fit, sources_of
from lmforge.serve.openai_api import (ApiError, ChatBody, CompletionBody, chat_logprobs, completion_logprobs,
                                      new_id, now, sampling_params, usage)
from lmforge.tokenizer.chat import CHAT_MARKERS, END, TOOL_CALL, end_of_turn_id, render_chat, uses_lmforge_template

COMPLETION_MAX_TOKENS = 16      # OpenAI's default for /v1/completions (chat runs to the end of the context)


@dataclass
class Served:
    """What every handler needs: the engine loop, the model's tokenizer and context, names and defaults."""
    loop: object                 # serve.loop.EngineLoop
    tok: object
    name: str                    # the served model name
    context: int                 # the model's max_seq_len
    defaults: dict               # sampling defaults (the checkpoint's generation_config.json)
    metrics: object | None = None
    rag: "Retrieval | None" = None


class Retrieval:
    """The server's index (lmforge.rag.Index): one search at a time, as it has one SQLite connection and one
    embedder, run off the event loop with the rest of a request's preparation."""

    def __init__(self, index):
        self.index, self.lock = index, threading.Lock()

    def search(self, question: str, k: int, mode: str, mmr: float | None):
        with self.lock:
            return self.index.search(question, k, mode, mmr)


@dataclass
class Event:
    choice: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    tool_calls: list[dict] | None = None
    finish: str | None = None


class Job:
    """One engine request as the handler sees it; `close()` aborts it unless every choice has finished."""

    def __init__(self, served: Served, prompt_ids: list[int], params, constraint=None, counted: bool = True):
        self.loop, self.rid, self.left = served.loop, new_id("req"), params.n
        self.q = served.loop.submit(self.rid, prompt_ids, params, constraint, counted=counted)
        if self.q is None:
            self.left = 0
            raise ApiError(429, f"the server is busy: {served.loop.max_queue} requests are already waiting for a "
                                "batch row; retry later", code="queue_full", headers={"Retry-After": "1"})

    async def get(self):
        item = await self.q.get()
        if isinstance(item, LmforgeError):
            self.left = 0
            raise ApiError.from_lmforge(item)
        if isinstance(item, Exception):
            self.left = 0
            raise item
        if item.finished:
            self.left -= 1
        return item

    def close(self) -> None:
        if self.left > 0:
            self.loop.abort(self.rid)
            self.left = 0


@dataclass
class Prepared:
    """A request ready for the engine."""
    prompt_ids: list[int]
    params: object               # SamplingParams
    constraint: object = None    # a Grammar for response_format
    tools: list = field(default_factory=list)
    required: bool = False       # tool_choice "required" or a named function
    grammar: object = None       # the tool calls' grammar (phase 2)
    completion_tokens: int = 0   # counted as outputs arrive (usage)
    sources: list | None = None  # retrieved passages [n] (rag requests)


def _check_context(served: Served, n: int, param: str) -> None:
    if n > served.context:
        raise ApiError(400, f"the prompt has {n} tokens, {n - served.context} more than the model's context of "
                            f"{served.context} tokens", param=param, code="context_length_exceeded")


def _response_format(served: Served, body) -> Grammar | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    try:
        if rf.type == "json_object":
            return Grammar.json_schema(served.tok, {"type": "object"})
        if rf.json_schema is None:
            raise ApiError(400, "type json_schema needs a json_schema object", param="response_format")
        return Grammar.json_schema(served.tok, rf.json_schema.schema_ or {})
    except LmforgeError as e:
        raise ApiError.from_lmforge(e, param="response_format") from None


# ---------------------------------------------------------------------------------------------------------------
# /v1/completions

def prepare_completion(served: Served, body: CompletionBody) -> Prepared:
    """Runs off the event loop (tokenizing a long prompt takes a while)."""
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of is not supported (use n)", param="best_of")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"give one prompt per request, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list) and not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    # a text prompt starts a document with BOS, as `lmforge generate` does; token ids are taken as they are
    try:
        ids = prompt_token_ids(served.tok, prompt, None, served.tok.vocab_size)
    except LmforgeError as e:
        raise ApiError.from_lmforge(e, param="prompt") from None
    _check_context(served, len(ids), "prompt")
    params = sampling_params(body, {"max_tokens": COMPLETION_MAX_TOKENS, **served.defaults},
                             max_tokens=body.max_tokens, logprobs=body.logprobs)
    return Prepared(ids, params, _response_format(served, body))


async def completion_events(served: Served, prep: Prepared):
    job = Job(served, prep.prompt_ids, prep.params, prep.constraint)
    try:
        while job.left:
            o = await job.get()
            prep.completion_tokens += len(o.token_ids)
            yield Event(o.index, o.text, o.token_ids, o.logprobs, finish=o.finish_reason if o.finished else None)
    finally:
        job.close()


def _completion_chunk(rid, created, served, choices, usage_=None, with_usage=False) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": served.name, "choices": choices}
    if with_usage:
        out["usage"] = usage_
    return out


async def stream_completion(served: Served, body: CompletionBody, prep: Prepared, events):
    rid, created, offsets = new_id("cmpl"), now(), {}
    want_lp = prep.params.logprobs is not None
    async for ev in events:
        if not (ev.text or ev.finish or (want_lp and ev.logprobs)):
            continue
        lp = None
        if want_lp:
            lp = completion_logprobs(served.tok, ev.logprobs or [], offsets.get(ev.choice, 0))
            offsets[ev.choice] = offsets.get(ev.choice, 0) + sum(len(t) for t in lp["tokens"])
        choice = {"index": ev.choice, "text": ev.text, "logprobs": lp, "finish_reason": _finish(ev.finish)}
        yield _completion_chunk(rid, created, served, [choice], None, body.include_usage)
    if body.include_usage:
        yield _completion_chunk(rid, created, served, [], usage(len(prep.prompt_ids), prep.completion_tokens), True)


async def collect_completion(served: Served, body: CompletionBody, prep: Prepared, events) -> dict:
    text, lps, finish = {}, {}, {}
    async for ev in events:
        text.setdefault(ev.choice, []).append(ev.text)
        lps.setdefault(ev.choice, []).extend(ev.logprobs or [])
        if ev.finish:
            finish[ev.choice] = ev.finish
    choices = [{"index": c, "text": "".join(text.get(c, [])),
                "logprobs": completion_logprobs(served.tok, lps.get(c, [])) if prep.params.logprobs is not None
                else None, "finish_reason": _finish(finish.get(c))} for c in range(prep.params.n)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": served.name,
            "choices": choices, "usage": usage(len(prep.prompt_ids), prep.completion_tokens)}


def _finish(reason: str | None) -> str | None:
    return None if reason is None else "stop" if reason == "abort" else reason


# ---------------------------------------------------------------------------------------------------------------
# /v1/chat/completions

def _message(m: dict, i: int) -> dict:
    """OpenAI content parts ([{"type": "text", "text": ...}]) as plain text; other parts are refused."""
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            texts.append(part["text"])
        m = dict(m, content="".join(texts))
    return m


def _no_call(**_):
    raise RuntimeError("the server does not run tools: the client does")


def prepare_chat(served: Served, body: ChatBody) -> Prepared:
    """Runs off the event loop (rendering and grammar compilation)."""
    tok = served.tok
    if not body.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    tools, required = [], False
    choice = body.tool_choice
    try:
        if body.tools and choice != "none":
            tools = [Tool(t.function.name, t.function.description,
                          t.function.parameters or {"type": "object", "properties": {}}, _no_call)
                     for t in body.tools]
            if len({t.name for t in tools}) != len(tools):
                raise ApiError(400, "two tools share a name", param="tools")
            if not isinstance(choice, str) and choice is not None:
                tools = [t for t in tools if t.name == choice.function.name]
                if not tools:
                    raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                                   param="tool_choice")
            required = choice == "required" or not isinstance(choice, (str, type(None)))
            check_tool_use(tok, tools)
        elif choice == "required" or (choice is not None and not isinstance(choice, str)):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        declared = [{"type": "function", "function": {"name": t.function.name, "description": t.function.description,
                                                      "parameters": t.function.parameters or
                                                      {"type": "object", "properties": {}}}}
                    for t in body.tools] if body.tools else None
        sources, room = None, None
        if body.rag is not None:
            messages, sources, room = retrieve_for_chat(served, body, messages, declared)
        ids, _ = render_chat(tok, messages, declared, add_generation_prompt=True)
    except LmforgeError as e:
        raise ApiError.from_lmforge(e, param="tools" if e.field in ("tools", "parameters", "name") else "messages") \
            from None
    _check_context(served, len(ids), "messages")
    if tools and body.n != 1:
        raise ApiError(400, "n > 1 with tools is not supported", param="n")
    top = body.top_logprobs if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    mt = room if mt is None else mt           # with retrieval, the answer gets the room the passages left it
    params = sampling_params(body, served.defaults, max_tokens=mt, logprobs=(top or 0) if body.logprobs else None,
                             logprobs_param="top_logprobs",
                             max_tokens_param="max_completion_tokens" if body.max_completion_tokens is not None
                             else "max_tokens")
    # phase 1 ends at any chat marker (the reply's <|end|>, a <|tool_call|>, a marker the model should not write)
    sp = tok.special_tokens
    ends = {sp[m] for m in CHAT_MARKERS if m in sp}
    if not uses_lmforge_template(tok):
        ends.add(end_of_turn_id(tok))
    params = params.replace(stop_token_ids=sorted(set(params.stop_token_ids) | ends))
    prep = Prepared(ids, params, _response_format(served, body), tools, required, sources=sources)
    if tools:
        try:
            prep.grammar = tool_call_grammar(tok, tools)
        except LmforgeError as e:
            raise ApiError.from_lmforge(e, param="tools") from None
    return prep


def retrieve_for_chat(served: Served, body: ChatBody, messages: list[dict], declared):
    """(messages with the passages in the last user turn, the sources, the tokens left for the answer)."""
    if served.rag is None:
        raise ApiError(400, "this server has no index to retrieve from: start it with --rag-db FILE", param="rag")
    opts = body.rag
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None or not isinstance(messages[last].get("content"), str):
        raise ApiError(400, "retrieval needs a user message with text: the question", param="messages")
    question = messages[last]["content"]
    try:
        hits = served.rag.search(question, opts.k, opts.mode, opts.mmr)
    except LmforgeError as e:
        raise ApiError.from_lmforge(e, param="rag") from None
    mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    room = max(1, min(mt or DEFAULT_ANSWER_TOKENS, served.context // 2))

    def with_passages(hs):
        return messages[:last] + [dict(messages[last], content=content(question, hs))] + messages[last + 1:]

    fitted = fit(lambda hs: render_chat(served.tok, with_passages(hs), declared, add_generation_prompt=True)[0],
                 hits, served.context - room)
    if fitted is None:
        raise ApiError(400, f"the conversation leaves no room for passages and an answer of {room} tokens in the "
                            f"model's context of {served.context}", param="messages", code="context_length_exceeded")
    kept, _, _ = fitted
    return with_passages(kept), sources_of(kept), room


async def chat_events(served: Served, prep: Prepared):
    tok, params = served.tok, prep.params
    sp = tok.special_tokens
    first_ids: list[int] = []
    if prep.required:
        first_ids = [sp[TOOL_CALL]]
    else:
        job = Job(served, prep.prompt_ids, params, prep.constraint)
        try:
            while job.left:
                o = await job.get()
                prep.completion_tokens += len(o.token_ids)
                first_ids += o.token_ids if params.n == 1 else []
                calls_next = (prep.tools and o.finished and o.finish_reason == "stop"
                              and o.stop_reason == sp[TOOL_CALL])
                yield Event(o.index, o.text, o.token_ids, o.logprobs,
                            finish=o.finish_reason if o.finished and not calls_next else None)
                if calls_next:
                    break
            else:
                return
        finally:
            job.close()

    # phase 2: the calls, under the tools' grammar, from right after <|tool_call|>
    left = None if params.max_tokens is None else params.max_tokens - len(first_ids) + prep.required
    prompt = prep.prompt_ids + first_ids
    if (left is not None and left < 1) or len(prompt) >= served.context:
        yield Event(0, finish="length")
        return
    calls_params = params.replace(stop=[], stop_token_ids=[], logit_bias=None, max_tokens=left, logprobs=None,
                                  min_tokens=0)
    job = Job(served, prompt, calls_params, prep.grammar, counted=prep.required)
    call_ids, finish = [], "length"
    try:
        while job.left:
            o = await job.get()
            prep.completion_tokens += len(o.token_ids)
            call_ids += o.token_ids
            if o.finished:
                finish = o.finish_reason
    finally:
        job.close()
    if finish != "stop" or not call_ids or call_ids[-1] != sp[END]:
        yield Event(0, finish="length" if finish in ("stop", "length") else finish)
        return
    calls = [{"id": new_id("call"), "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
             for c in parse_tool_calls(tok, call_ids)]
    yield Event(0, tool_calls=calls, finish="tool_calls")


def _chat_chunk(rid, created, served, choices, usage_=None, with_usage=False) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name,
           "choices": choices}
    if with_usage:
        out["usage"] = usage_
    return out


async def stream_chat(served: Served, body: ChatBody, prep: Prepared, events):
    rid, created = new_id("chatcmpl"), now()
    want_lp = prep.params.logprobs is not None
    for c in range(prep.params.n):   # OpenAI's first chunk of each choice: the role (and the sources, if any)
        chunk = _chat_chunk(rid, created, served, [{"index": c, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}], None, body.include_usage)
        if prep.sources is not None and c == 0:
            chunk["sources"] = [s.to_json() for s in prep.sources]
        yield chunk
    async for ev in events:
        delta: dict = {}
        if ev.text:
            delta["content"] = ev.text
        if ev.tool_calls:
            delta["tool_calls"] = [dict(c, index=k) for k, c in enumerate(ev.tool_calls)]
        lp = chat_logprobs(served.tok, ev.logprobs) if want_lp and ev.logprobs else None
        if not (delta or lp or ev.finish):
            continue
        yield _chat_chunk(rid, created, served, [{"index": ev.choice, "delta": delta, "logprobs": lp,
                                                  "finish_reason": _finish(ev.finish)}], None, body.include_usage)
    if body.include_usage:
        yield _chat_chunk(rid, created, served, [], usage(len(prep.prompt_ids), prep.completion_tokens), True)


async def collect_chat(served: Served, body: ChatBody, prep: Prepared, events) -> dict:
    text, lps, finish, calls = {}, {}, {}, {}
    async for ev in events:
        text.setdefault(ev.choice, []).append(ev.text)
        lps.setdefault(ev.choice, []).extend(ev.logprobs or [])
        if ev.tool_calls:
            calls[ev.choice] = ev.tool_calls
        if ev.finish:
            finish[ev.choice] = ev.finish
    choices = []
    for c in range(prep.params.n):
        content = "".join(text.get(c, []))
        msg = {"role": "assistant", "content": content if content or c not in calls else None}
        if c in calls:
            msg["tool_calls"] = calls[c]
        choices.append({"index": c, "message": msg, "finish_reason": _finish(finish.get(c)),
                        "logprobs": chat_logprobs(served.tok, lps.get(c, [])) if prep.params.logprobs is not None
                        else None})
    out = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": served.name,
           "choices": choices, "usage": usage(len(prep.prompt_ids), prep.completion_tokens)}
    if prep.sources is not None:
        out["sources"] = [s.to_json() for s in prep.sources]
    return out


async def first_and_rest(events):
    """Wait for the first event (so that a refused request still gets its HTTP status), then replay it."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise

    async def rest():
        try:
            if first is not None:
                yield first
                async for ev in events:
                    yield ev
        finally:
            await events.aclose()
    return rest()


__all__ = ["Served", "Retrieval", "retrieve_for_chat", "Event", "Job", "Prepared", "prepare_completion", "prepare_chat",
           "completion_events", "chat_events", "stream_completion", "collect_completion", "stream_chat", "collect_chat",
           "first_and_rest"]
