"""Chat templates: a conversation (OpenAI-style messages, optional tools) -> token ids + a loss mask.

    ids, loss_mask = render_chat(tok, messages, tools=None, add_generation_prompt=False)
    ids, loss_mask = tok.render_chat(messages, ...)          # the same, as a Tokenizer method

Messages: {"role": "system"|"user"|"assistant"|"tool", "content": str}; an assistant message may carry
"tool_calls": [{"id"?, "type": "function", "function": {"name": str, "arguments": dict | JSON string}}] (its content
may then be "" or absent); a tool message may carry "tool_call_id" / "name". Tools: the OpenAI shape
[{"type": "function", "function": {"name", "description", "parameters"}}]. Anything else is a DataError naming the
message (`messages[2]: ...`); a reader of files adds the file and line.

Two renderers behind the one function:

* lmforge's own template, for tokenizers with lmforge's chat special tokens (no `chat_template` of their own):

      <|bos|> [<|system|>SYSTEM<|end|>] [<|tool|>json(tool.function) per line<|end|>]
      user: <|user|>TEXT<|end|>   assistant: <|assistant|>TEXT{<|tool_call|>{"name": .., "arguments": {..}}}<|end|>
      tool: <|tool_result|>TEXT<|end|>            add_generation_prompt: <|assistant|>

  built piece by piece: markers are special ids, text is encoded as ordinary text (it never becomes a special
  token). loss_mask is 1 on what the assistant writes: its text, its <|tool_call|> markers and call JSON, its
  closing <|end|>. The same template as Jinja (LMFORGE_CHAT_TEMPLATE) is written into exported
  tokenizer_config.json files, so transformers' apply_chat_template gives the same ids, with two documented
  differences: transformers turns special-token text typed inside content into special ids (pass
  `sanitize_control_tokens=True` for our behaviour), and tool-call arguments given as a JSON *string* are written
  verbatim by Jinja (it cannot parse JSON) where we parse and re-dump them (the same whenever the string is
  json.dumps output).

* a Hugging Face template (`tok.chat_template`, kept from an imported model): rendered with Jinja exactly as
  transformers' apply_chat_template renders it (sandboxed environment, trim_blocks/lstrip_blocks, loopcontrols,
  `{% generation %}`, raise_exception, tojson, strftime_now, dict, namespace; variables messages, tools,
  documents, add_generation_prompt, bos/eos/pad_token), then encoded as a transformers tokenizer encodes it:
  special-token text in the rendered string becomes those ids (leftmost-longest), the rest ordinary text.
  loss_mask comes from rendering prefixes: assistant message i owns the text that rendering messages[:i+1] adds
  to rendering messages[:i] with the generation prompt (or without it, for templates whose prompt is not a prefix
  of the assistant turn); a token is 1 when its text overlaps that. So the mask covers the reply and the
  template's end-of-turn token (and what the template writes after it inside that message, e.g. Qwen's "\\n").
  Templates that rewrite earlier turns (dropping past reasoning, say) are handled by finding the added text
  further on; when it cannot be found the conversation is refused (DataError) rather than masked wrongly.
"""
from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from functools import lru_cache
from typing import Any

from lmforge.errors import ConfigError, DataError

# The chat markers. The tokenizer reserves ids for them (lmforge.tokenizer.tokenizer.SPECIAL_TOKENS lists them).
SYSTEM, USER, ASSISTANT, TOOL = "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"
END = "<|end|>"                       # ends one chat message: the end-of-turn token
TOOL_CALL, TOOL_RESULT = "<|tool_call|>", "<|tool_result|>"
CHAT_MARKERS = (SYSTEM, USER, ASSISTANT, TOOL, END, TOOL_CALL, TOOL_RESULT)
ROLES = ("system", "user", "assistant", "tool")


def _j(*parts: str) -> str:
    return "".join(parts)


# lmforge's template in Jinja, for transformers (written into exported tokenizer_config.json). One line, no
# whitespace between tags, so trim_blocks / lstrip_blocks have nothing to act on.
LMFORGE_CHAT_TEMPLATE = _j(
    "{{ bos_token }}",
    "{% if messages and messages[0]['role'] == 'system' %}<|system|>{{ messages[0]['content'] }}<|end|>{% endif %}",
    "{% if tools %}<|tool|>{% for tool in tools %}{% if not loop.first %}{{ '\\n' }}{% endif %}",
    "{{ tool['function'] | tojson }}{% endfor %}<|end|>{% endif %}",
    "{% for message in messages %}",
    "{% if message['role'] == 'system' %}",
    "{% if not loop.first %}{{ raise_exception('a system message must be the first message') }}{% endif %}",
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>",
    "{% elif message['role'] == 'assistant' %}<|assistant|>",
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}",
    "{% for call in message.get('tool_calls') or [] %}",
    "<|tool_call|>{\"name\": {{ call['function']['name'] | tojson }}, \"arguments\": ",
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}",
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}}",
    "{% endfor %}<|end|>",
    "{% elif message['role'] == 'tool' %}<|tool_result|>{{ message['content'] }}<|end|>",
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
)


# ---------------------------------------------------------------------------------------------------------------
# the one entry point

def render_chat(tok, messages, tools=None, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation; see the module docstring for both templates."""
    messages, parsed = validate_messages(messages)
    tools = validate_tools(tools)
    if uses_lmforge_template(tok):
        return _render_lmforge(tok, parsed, tools, add_generation_prompt)
    if tok.chat_template is None:
        raise ConfigError("this tokenizer has no chat template and not lmforge's chat special tokens: it cannot "
                          "render conversations")
    return _render_hf(tok, messages, tools, add_generation_prompt)


def uses_lmforge_template(tok) -> bool:
    """Whether `tok` renders with lmforge's own template: it has our markers and no template of its own (or ours,
    read back from an export)."""
    own = tok.chat_template is None or tok.chat_template == LMFORGE_CHAT_TEMPLATE
    return own and all(m in tok.special_tokens for m in CHAT_MARKERS) and tok.role_token("bos") is not None


def end_of_turn_id(tok) -> int:
    """The id that ends an assistant turn (generation of a reply stops there): <|end|> for lmforge's template;
    for a Hugging Face template, the first special token it writes after an assistant message's text (Llama 3:
    <|eot_id|>, Qwen2: <|im_end|>), else the tokenizer's EOS."""
    if uses_lmforge_template(tok):
        return tok.special_tokens[END]
    if tok.chat_template is None:
        raise ConfigError("this tokenizer has no chat template and not lmforge's chat special tokens")
    probe = "\u2063probe reply\u2063"
    text = _jinja_render(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], None,
                         False)
    at = text.find(probe)
    if at >= 0:
        m = _specials_regex(tuple(tok.special_tokens)).search(text, at + len(probe))
        if m is not None:
            return tok.special_tokens[m.group(0)]
    return tok.eos_id


# ---------------------------------------------------------------------------------------------------------------
# validation

def validate_messages(messages) -> tuple[list[dict], list[dict]]:
    """(the messages as given, keys whose value is None dropped — what a Jinja template sees, as in transformers;
    the same with tool-call arguments parsed to dicts — what lmforge's template renders). DataError otherwise."""
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    plain, parsed = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: a message must be an object with 'role' and 'content', got {_kind(m)}")
        m = {k: v for k, v in m.items() if v is not None}
        role = m.get("role")
        if role not in ROLES:
            got = "no 'role'" if "role" not in m else f"unknown role {role!r}"
            raise DataError(f"{where}: {got} (expected one of {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise DataError(f"{where}: a system message must be the first message")
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise DataError(f"{where}: only assistant messages carry 'tool_calls' (this one is {role!r})")
        if content is None and not (role == "assistant" and calls):
            raise DataError(f"{where}: no 'content'" + (" (or 'tool_calls')" if role == "assistant" else ""))
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: 'content' must be a string, got {_kind(content)}")
        for key in ("tool_call_id", "name"):
            if role == "tool" and key in m and not isinstance(m[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {_kind(m[key])}")
        out = dict(m)
        if calls is not None:
            out["tool_calls"] = _validate_calls(calls, where)
        plain.append(m)
        parsed.append(out)
    return plain, parsed


def _validate_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise DataError(f"{where}: 'tool_calls' must be a list, got {_kind(calls)}")
    out = []
    for j, call in enumerate(calls):
        w = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise DataError(f"{w}: a tool call must be an object, got {_kind(call)}")
        if call.get("type", "function") != "function":
            raise DataError(f"{w}: 'type' must be 'function', got {call.get('type')!r}")
        if "id" in call and call["id"] is not None and not isinstance(call["id"], str):
            raise DataError(f"{w}: 'id' must be a string, got {_kind(call['id'])}")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise DataError(f"{w}: needs a 'function' object with 'name' and 'arguments'")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{w}: 'function.name' must be a non-empty string")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise DataError(f"{w}: 'function.arguments' is a string but not JSON: {e.msg}") from None
        if not isinstance(args, dict):
            raise DataError(f"{w}: 'function.arguments' must be an object (or a JSON string of one), "
                            f"got {_kind(args)}")
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def validate_tools(tools) -> list[dict] | None:
    """The tools (OpenAI shape) as given (None for none); DataError naming the entry otherwise."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise DataError(f"tools must be a list, got {_kind(tools)}")
    for i, t in enumerate(tools):
        w = f"tools[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict):
            raise DataError(f"{w}: a tool must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}")
        if t.get("type", "function") != "function":
            raise DataError(f"{w}: 'type' must be 'function', got {t.get('type')!r}")
        fn = t["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{w}: 'function.name' must be a non-empty string")
        if "description" in fn and not isinstance(fn["description"], str):
            raise DataError(f"{w}: 'function.description' must be a string")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise DataError(f"{w}: 'function.parameters' must be a JSON-schema object")
    return list(tools)   # [] stays []: a Jinja template may tell "no tools" from "an empty list of tools"


def _kind(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(x), type(x).__name__)


# ---------------------------------------------------------------------------------------------------------------
# lmforge's template

def _render_lmforge(tok, messages: list[dict], tools, add_generation_prompt: bool):
    sp = tok.special_tokens
    ids, mask = [tok.bos_id], [0]

    def marker(name: str, m: int = 0):
        ids.append(sp[name])
        mask.append(m)

    def text(s: str, m: int = 0):
        t = tok.encode(s)        # ordinary text: never a special token
        ids.extend(t)
        mask.extend([m] * len(t))

    if messages and messages[0]["role"] == "system":
        marker(SYSTEM), text(messages[0]["content"]), marker(END)
    if tools:
        marker(TOOL)
        text("\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
        marker(END)
    for m in messages:
        role = m["role"]
        if role == "user":
            marker(USER), text(m["content"]), marker(END)
        elif role == "tool":
            marker(TOOL_RESULT), text(m["content"]), marker(END)
        elif role == "assistant":
            marker(ASSISTANT)
            text(m.get("content", ""), 1)
            for call in m.get("tool_calls", []):
                fn = call["function"]
                marker(TOOL_CALL, 1)
                text(json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False), 1)
            marker(END, 1)
    if add_generation_prompt:
        marker(ASSISTANT)
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face (Jinja) templates

@lru_cache(maxsize=8)
def _compile(template: str):
    """The template compiled in the environment transformers' apply_chat_template uses."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        # templates come with downloaded models: untrusted code, and older sandboxes have known escapes
        raise ConfigError(f"rendering a model's own chat template needs jinja2 >= 3.1.6 (found {jinja2.__version__}, "
                          "whose sandbox has known escapes): pip install -U jinja2")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for transformers' own masks): renders
        its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own filter: Jinja's escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attributes may not start with '_': {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"the tokenizer's chat template is not valid Jinja: {e.message} (template line "
                          f"{e.lineno})") from None


def _jinja_render(tok, messages: list[dict], tools, add_generation_prompt: bool) -> str:
    import jinja2

    variables = {f"{role}_token": tok.role_token(role) for role in ("bos", "eos", "pad")
                 if tok.role_token(role) is not None}
    try:
        return _compile(tok.chat_template).render(messages=messages, tools=tools, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the chat template refused this conversation: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise DataError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None


@lru_cache(maxsize=8)
def _specials_regex(specials: tuple[str, ...]):
    import re
    # longest first: at a position the longest special matches (transformers: leftmost-longest)
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)")


def _render_hf(tok, messages: list[dict], tools, add_generation_prompt: bool):
    text = _jinja_render(tok, messages, tools, add_generation_prompt)
    spans = _assistant_spans(tok, messages, tools, text)
    ids, mask = [], []
    pos = 0
    for m in _specials_regex(tuple(tok.special_tokens)).finditer(text):
        _encode_segment(tok, text, pos, m.start(), spans, ids, mask)
        ids.append(tok.special_tokens[m.group(0)])
        mask.append(int(_overlaps(spans, m.start(), m.end())))
        pos = m.end()
    _encode_segment(tok, text, pos, len(text), spans, ids, mask)
    return ids, mask


def _encode_segment(tok, text: str, start: int, end: int, spans, ids: list, mask: list) -> None:
    """Encode text[start:end] (no special token inside) and mark the tokens whose text overlaps a span.
    Offsets are compared after the tokenizer's normalization (NFC for Qwen2), which the spans are mapped into."""
    if start == end:
        return
    seg = text[start:end]
    norm = _normalizer(tok)
    new = tok.encode(seg)
    ids.extend(new)
    local = [(len(norm(seg[:max(s, start) - start])), len(norm(seg[:min(e, end) - start])))
             for s, e in spans if s < end and e > start]
    if not local:
        mask.extend([0] * len(new))
        return
    n = norm(seg)
    char_starts, b = [], 0         # byte offset where each character of n starts
    for ch in n:
        char_starts.append(b)
        b += len(ch.encode("utf-8"))
    b = 0
    for i in new:
        nb = len(tok.id_to_bytes(i))
        c0, c1 = bisect_right(char_starts, b) - 1, bisect_left(char_starts, b + nb)  # chars the token touches
        mask.append(int(_overlaps(local, c0, c1)))
        b += nb


def _normalizer(tok):
    if tok.normalizer is None:
        return lambda s: s
    import unicodedata
    return lambda s: unicodedata.normalize(tok.normalizer, s)


def _overlaps(spans, start: int, end: int) -> bool:
    return any(s < end and start < e for s, e in spans)


def _assistant_spans(tok, messages, tools, text: str) -> list[tuple[int, int]]:
    """The character spans of `text` (the whole conversation rendered) that assistant messages add."""
    spans, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        after = _jinja_render(tok, messages[:i + 1], tools, False)
        for prompt in (True, False):
            before = _jinja_render(tok, messages[:i], tools, prompt) if i else _empty_render(tok, tools, prompt)
            if before is not None and after.startswith(before):
                break
        else:
            raise DataError(f"messages[{i}]: the chat template does not render this conversation turn by turn "
                            "(the text before this assistant message changes when it is added), so its tokens "
                            "cannot be told apart for the loss")
        added = after[len(before):]
        start = len(before) if text.startswith(after) and len(before) >= pos else text.find(added, pos)
        if start < 0:
            raise DataError(f"messages[{i}]: the chat template rewrites this assistant message when later turns "
                            "follow, so its tokens cannot be told apart for the loss")
        if added:
            spans.append((start, start + len(added)))
        pos = start + len(added)
    return spans


def _empty_render(tok, tools, prompt: bool) -> str | None:
    """The template on no messages (many templates index messages[0] and fail there: then no prefix)."""
    try:
        return _jinja_render(tok, [], tools, prompt)
    except DataError:
        return None


def pad_id(tok) -> int:
    """The id right-padded rows are filled with: the tokenizer's pad, else EOS, else 0 (any id would do: real
    tokens never attend to pads after them and pad targets are ignored)."""
    pad = tok.role_token("pad") or tok.role_token("eos")
    return tok.special_tokens[pad] if pad is not None else 0
