"""Assistant turns with tool use: generate a reply, decode its tool calls under a grammar, run them, go on.

    from lmforge.infer.assistant import run_chat_turn
    from lmforge.infer.tools import get_tools

    new = run_chat_turn(model, tok, [{"role": "user", "content": "What is 123456 * 789?"}],
                        tools=get_tools("calculator"), params=SamplingParams(temperature=0, max_tokens=64))
    # -> [assistant message with tool_calls, tool message with the result, final assistant message]

A model's reply after the generation prompt is (lmforge's chat format): free text, then optionally one or more
`<|tool_call|>{"name": ..., "arguments": {...}}` blocks, then `<|end|>`. A reply is generated in two phases,
both through the engine and sharing the reply's budget (params.max_tokens):

  1. text    sampled with the caller's params; ends at <|tool_call|>, at <|end|> (or another chat marker, EOS,
             a stop string) or at the budget;
  2. calls   only when phase 1 ended at <|tool_call|> and tools are offered: generation goes on from there under
             the grammar   call (<|tool_call|> call)* <|end|>   where each call is one JSON alternative per tool,
             {"name": <its name>, "arguments": <its parameters schema>} (compact, json.dumps' separators). Every
             call therefore parses and validates against its tool's schema, whatever the weights, and the reply
             always closes with <|end|>.

A reply cut inside its calls (budget, context or abort) keeps its text and loses its calls: only complete replies
run tools. The loop (`run_chat_turn`) executes each call (a tool that refuses or fails answers "error: ...", the
turn goes on) and appends a `tool` message per call, then lets the model continue, for at most max_tool_rounds
rounds of calls; the reply after the last round may not call tools.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lmforge.errors import ConfigError
from lmforge.infer.constrained import JSON_OPTIONS, Grammar
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.tools import Tool, ToolError, get_tools, to_openai
from lmforge.tokenizer.chat import CHAT_MARKERS, END, TOOL_CALL, end_of_turn_id, render_chat, uses_lmforge_template

MAX_TOOL_RESULT_CHARS = 2000      # a longer tool result is cut (it goes back into the context)
TOOL_CHOICES = ("auto", "required", "none")
_request_ids = itertools.count()

# on_event(kind, value): "text" (a str delta of the reply), "tool_call" (the call dict of an assistant message),
# "tool_result" (the tool message), "finish" (the turn's finish reason: "stop", "length" or "abort")
OnEvent = Callable[[str, object], None]


@dataclass
class Reply:
    """One assistant reply: its text, its complete tool calls ({"name", "arguments"}) and how it ended."""
    content: str
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"          # "stop" | "length" | "abort"
    token_ids: list[int] = field(default_factory=list)


def as_tools(tools) -> list[Tool]:
    """Tools given as Tool records or built-in names (a list, or "calculator,lookup")."""
    if not tools:
        return []
    if isinstance(tools, str):
        return get_tools(tools)
    out = [t if isinstance(t, Tool) else get_tools([t])[0] for t in tools]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"two tools share a name: {names}", field="tools")
    return out


def check_tool_use(tok, tools: Sequence[Tool]) -> None:
    """Tool calls are read in lmforge's chat format: the tokenizer must have its chat tokens."""
    if tools and not uses_lmforge_template(tok):
        raise ConfigError("tool use needs a tokenizer with lmforge's chat tokens and template (<|tool_call|>, "
                          "<|end|>); this one has its own chat template", field="tools")


def tool_call_grammar(tok, tools: Sequence[Tool]) -> Grammar:
    """The grammar of what follows a reply's first <|tool_call|>:  call (<|tool_call|> call)* <|end|>."""
    check_tool_use(tok, tools)
    sp = tok.special_tokens
    rules = []
    for i, t in enumerate(tools):
        try:  # compiled alone first, so a schema the grammar engine cannot take is named by its tool
            Grammar.json_schema(tok, t.parameters)
        except ConfigError as e:
            raise ConfigError(f"tool {t.name!r}: {e.message}", field="parameters") from None
        schema = {"x-guidance": JSON_OPTIONS, "type": "object",
                  "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False}
        rules.append(f"call_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    lark = "\n".join([f"start: call (<[{sp[TOOL_CALL]}]> call)* <[{sp[END]}]>",
                      "call: " + " | ".join(f"call_{i}" for i in range(len(tools))), *rules])
    # a JSON-schema grammar, written in llguidance's Lark so that it can name the special tokens between calls
    return Grammar.lark(tok, lark, field="tools")


# A turn is written as a generator of the engine requests it needs: it yields (prompt_ids, params, constraint,
# on_text) and is sent back (text, token ids, finish_reason, stop_reason). One driver runs any number of turns on
# one engine (their requests share the batch), so a turn alone and many at once follow the same rules.
def _run_steps(engine: Engine, turns: list, should_stop: Callable[[], bool] | None = None) -> list:
    """Run the turns' generators to their ends: their return values, in order. `should_stop` is polled before
    every engine step; when it says True the live requests are aborted (finish_reason "abort")."""
    results: list = [None] * len(turns)
    live: dict[object, tuple] = {}      # request id -> (turn, its steps, text pieces, ids, on_text)
    aborted: set = set()

    def advance(i, steps, answer):
        try:
            prompt, p, constraint, on_text = steps.send(answer)
        except StopIteration as done:
            results[i] = done.value
            return
        rid = ("turns", next(_request_ids))
        engine.add_request(rid, prompt, p, constraint=constraint, add_bos=False)
        live[rid] = (i, steps, [], [], on_text)

    for i, steps in enumerate(turns):
        advance(i, steps, None)
    while engine.has_unfinished():
        if should_stop is not None and live.keys() - aborted and should_stop():
            for rid in live.keys() - aborted:
                engine.abort(rid)
                aborted.add(rid)
        for o in engine.step():
            i, steps, text, ids, on_text = live[o.request_id]
            ids += o.token_ids
            if o.text:
                text.append(o.text)
                if on_text is not None:
                    on_text(o.text)
            if o.finished:
                del live[o.request_id]
                advance(i, steps, ("".join(text), ids, o.finish_reason, o.stop_reason))
    return results


def _reply_steps(tok, max_seq_len: int, prompt_ids: list[int], params: SamplingParams, tools: list[Tool],
                 tool_choice: str, on_text, grammar: Grammar | None):
    """generate_reply as a step generator (its arguments already checked); returns the Reply."""
    sp = tok.special_tokens
    if tool_choice == "required":
        text, ids, finish, reason = "", [sp[TOOL_CALL]], "stop", sp[TOOL_CALL]
    else:
        markers = [sp[m] for m in CHAT_MARKERS if m in sp]
        ends = sorted(set(markers) | ({end_of_turn_id(tok)} if not uses_lmforge_template(tok) else set()))
        free = params.replace(stop_token_ids=sorted(set(params.stop_token_ids) | set(ends)))
        text, ids, finish, reason = yield (prompt_ids, free, None, on_text)
        if not (tools and finish == "stop" and reason == sp[TOOL_CALL]):
            return Reply(text, [], finish, ids)

    # phase 2: the calls, under the grammar, from right after <|tool_call|>
    left = None if params.max_tokens is None else params.max_tokens - len(ids)
    prompt = list(prompt_ids) + ids
    if (left is not None and left < 1) or len(prompt) >= max_seq_len:
        return Reply(text, [], "length", ids)
    grammar = grammar or tool_call_grammar(tok, tools)
    # the grammar decides what may come: stop strings, stop ids and logit biases are for the text
    calls_params = params.replace(stop=[], stop_token_ids=[], logit_bias=None, max_tokens=left, logprobs=None,
                                  min_tokens=0)
    _, call_ids, finish, _ = yield (prompt, calls_params, grammar, None)
    ids = ids + call_ids
    if finish != "stop" or not call_ids or call_ids[-1] != sp[END]:
        return Reply(text, [], finish if finish != "stop" else "length", ids)
    return Reply(text, parse_tool_calls(tok, call_ids), "stop", ids)


def _check_reply_args(tok, params: SamplingParams | None, tools, tool_choice: str):
    params = params or SamplingParams()
    if tool_choice not in TOOL_CHOICES:
        raise ConfigError(f"{tool_choice!r} is not one of {', '.join(TOOL_CHOICES)}", field="tool_choice")
    tools = [] if tool_choice == "none" else list(tools)
    if tool_choice == "required" and not tools:
        raise ConfigError("tool_choice 'required' needs tools", field="tool_choice")
    check_tool_use(tok, tools)
    if params.n != 1:
        raise ConfigError("a chat reply is one completion", field="n")
    return params, tools


def generate_reply(engine: Engine, tok, prompt_ids: list[int], params: SamplingParams | None = None,
                   tools: Sequence[Tool] = (), *, tool_choice: str = "auto",
                   on_text: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
                   grammar: Grammar | None = None) -> Reply:
    """One assistant reply to `prompt_ids` (a conversation rendered with the generation prompt), in the two
    phases of the module docstring. tool_choice (as in OpenAI's API): "auto" the model decides; "required" the
    reply is tool calls only (it starts with <|tool_call|>: phase 1 is skipped); "none" (or no tools) a
    <|tool_call|> just ends the reply. `should_stop` is polled before every engine step; when it says True the
    request is aborted (finish_reason "abort")."""
    params, tools = _check_reply_args(tok, params, tools, tool_choice)
    steps = _reply_steps(tok, engine.model.config.max_seq_len, prompt_ids, params, tools, tool_choice, on_text,
                         grammar)
    return _run_steps(engine, [steps], should_stop)[0]


def parse_tool_calls(tok, call_ids: Sequence[int]) -> list[dict]:
    """The calls ({"name", "arguments"}) of a complete phase 2 (what tool_call_grammar produced, ending with
    <|end|>): the JSON between the <|tool_call|> markers."""
    sp = tok.special_tokens
    calls, cur = [], []
    for t in call_ids:
        if t in (sp[TOOL_CALL], sp[END]):
            call = json.loads(tok.decode(cur))    # the grammar made it valid JSON of the call schema
            calls.append({"name": call["name"], "arguments": _no_lone_surrogates(call["arguments"])})
            cur = []
        else:
            cur.append(t)
    return calls


def _no_lone_surrogates(x):
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 text can hold: U+FFFD instead (the
    length, and so the schema's string limits, stay as they were)."""
    if isinstance(x, str):
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in x)
    if isinstance(x, list):
        return [_no_lone_surrogates(v) for v in x]
    if isinstance(x, dict):
        return {_no_lone_surrogates(k): _no_lone_surrogates(v) for k, v in x.items()}
    return x


def run_tool(tools_by_name: dict[str, Tool], name: str, arguments: dict) -> str:
    """A tool's result as the content of its tool message; a refusal or failure becomes "error: ..."."""
    t = tools_by_name.get(name)
    if t is None:
        return f"error: no tool named {name!r}"
    try:
        out = t.run(arguments)
    except ToolError as e:
        out = f"error: {e.message}"
    except Exception as e:  # a user's tool that fails must not end the conversation
        out = f"error: {type(e).__name__}: {e}"
    if len(out) > MAX_TOOL_RESULT_CHARS:
        out = out[:MAX_TOOL_RESULT_CHARS - 1] + "…"
    return out


def _check_turn_args(tok, tools, tool_choice: str, max_tool_rounds) -> list[Tool]:
    tools = as_tools(tools)
    check_tool_use(tok, tools)
    if tool_choice not in TOOL_CHOICES:
        raise ConfigError(f"{tool_choice!r} is not one of {', '.join(TOOL_CHOICES)}", field="tool_choice")
    if isinstance(max_tool_rounds, bool) or not isinstance(max_tool_rounds, int) or max_tool_rounds < 0:
        raise ConfigError(f"must be an integer >= 0, got {max_tool_rounds!r}", field="max_tool_rounds")
    return tools


def _idle(engine_or_model, tok, precision: str, **engine_args) -> Engine:
    if isinstance(engine_or_model, Engine):
        if engine_or_model.has_unfinished():
            raise ConfigError("the engine is running other requests: give the tool loop an idle engine")
        return engine_or_model
    return Engine(engine_or_model, tok, precision=precision, **engine_args)


def _turn_steps(tok, max_seq_len: int, messages: list[dict], tools: list[Tool], params: SamplingParams | None,
                max_tool_rounds: int, tool_choice: str, emit: OnEvent, grammar: Grammar | None):
    """run_chat_turn as a step generator; returns the new messages."""
    by_name = {t.name: t for t in tools}
    declared = [to_openai(t) for t in tools] or None
    n_calls = sum(len(m.get("tool_calls") or []) for m in messages if isinstance(m, dict))
    new: list[dict] = []
    for rnd in range(max_tool_rounds + 1):
        prompt, _ = render_chat(tok, list(messages) + new, declared, add_generation_prompt=True)
        if rnd and len(prompt) >= max_seq_len:  # tool results filled the context
            new.append({"role": "assistant", "content": ""})
            emit("finish", "length")
            return new
        choice = "none" if rnd == max_tool_rounds or not tools else tool_choice if rnd == 0 else "auto"
        p, offered = _check_reply_args(tok, params, tools, choice)
        reply = yield from _reply_steps(tok, max_seq_len, prompt, p, offered, choice, lambda s: emit("text", s),
                                        grammar)
        msg = {"role": "assistant", "content": reply.content}
        new.append(msg)
        if not reply.tool_calls:
            emit("finish", reply.finish_reason)
            return new
        msg["tool_calls"] = []
        for c in reply.tool_calls:
            call = {"id": f"call_{n_calls}", "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]}}
            n_calls += 1
            msg["tool_calls"].append(call)
            emit("tool_call", call)
        for call in msg["tool_calls"]:
            result = {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                      "content": run_tool(by_name, call["function"]["name"], call["function"]["arguments"])}
            new.append(result)
            emit("tool_result", result)
    raise AssertionError("unreachable: the last round offers no tools")


def run_chat_turn(engine_or_model, tok, messages: list[dict], tools=None, params: SamplingParams | None = None,
                  *, max_tool_rounds: int = 4, tool_choice: str = "auto", on_event: OnEvent | None = None,
                  should_stop: Callable[[], bool] | None = None, precision: str = "fp32") -> list[dict]:
    """The model's turn after `messages`: the new messages, in order — for each round of tool calls an assistant
    message with `tool_calls` and one `tool` message per call, then the final assistant message. `messages` is
    not changed. engine_or_model: an idle Engine (reused: its settings apply) or a model (an Engine is made).
    tools: Tool records or built-in names. tool_choice applies to the first reply (generate_reply); the replies
    after tool results are "auto", and the one after the last round "none"."""
    tools = _check_turn_args(tok, tools, tool_choice, max_tool_rounds)
    engine = _idle(engine_or_model, tok, precision)
    grammar = tool_call_grammar(tok, tools) if tools else None
    steps = _turn_steps(tok, engine.model.config.max_seq_len, messages, tools, params, max_tool_rounds,
                        tool_choice, on_event or (lambda kind, value: None), grammar)
    return _run_steps(engine, [steps], should_stop)[0]


def run_chat_turns(engine_or_model, tok, conversations: Sequence[list[dict]], tools=None,
                   params: SamplingParams | Sequence[SamplingParams] | None = None, *, max_tool_rounds: int = 4,
                   tool_choice: str = "auto", on_event: Callable[[int, str, object], None] | None = None,
                   precision: str = "fp32", max_batch: int = 64) -> list[list[dict]]:
    """run_chat_turn for many conversations at once: every turn's requests share one engine's batch (a turn
    waiting for its tools or its next phase does not hold the others up), and each turn's messages are what
    run_chat_turn would give it alone with the same params. params: one for all or one per conversation.
    on_event(i, kind, value) reports conversation i's events. Returns the new messages of each conversation."""
    tools = _check_turn_args(tok, tools, tool_choice, max_tool_rounds)
    engine = _idle(engine_or_model, tok, precision, max_batch=max_batch)
    if params is None or isinstance(params, SamplingParams):
        params = [params] * len(conversations)
    if len(params) != len(conversations):
        raise ConfigError(f"{len(params)} sampling params for {len(conversations)} conversations", field="params")
    grammar = tool_call_grammar(tok, tools) if tools else None
    emit = on_event or (lambda i, kind, value: None)
    return _run_steps(engine, [_turn_steps(tok, engine.model.config.max_seq_len, messages, tools, p,
                                           max_tool_rounds, tool_choice,
                                           lambda kind, value, i=i: emit(i, kind, value), grammar)
                               for i, (messages, p) in enumerate(zip(conversations, params))])


__all__ = ["Reply", "as_tools", "check_tool_use", "tool_call_grammar", "generate_reply", "parse_tool_calls",
           "run_tool", "run_chat_turn", "run_chat_turns"]
