"""Chat templates and conversation data: lmforge's template (golden ids and masks, validation), its Jinja export
(transformers' apply_chat_template gives identical ids), imported Hugging Face templates (Qwen2.5- and Llama-3.1-
style, identical ids to transformers; masks checked against transformers' {% generation %} masks), and the JSONL
conversation reader's file:line errors. Offline: tokenizers are trained here, nothing downloads."""
from __future__ import annotations

import json
from functools import lru_cache

import pytest

from lmforge.data.chat import Conversation, read_conversations
from lmforge.errors import ConfigError, DataError
from lmforge.interop.hf_tokenizer import read_hf_tokenizer
from lmforge.tokenizer.chat import LMFORGE_CHAT_TEMPLATE, end_of_turn_id, render_chat
from lmforge.tokenizer.tokenizer import (ASSISTANT, END, SYSTEM, TOOL, TOOL_CALL, TOOL_RESULT, USER, Tokenizer)
from test_tokenizer import reference

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@lru_cache(maxsize=None)
def our_tokenizer() -> Tokenizer:
    return reference()[1]  # BPE trained on pydoc + multilingual text, our specials


TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic, e.g. 2*(3+4).",
                                      "parameters": {"type": "object", "properties": {"expr": {"type": "string"}},
                                                     "required": ["expr"]}}},
    {"type": "function", "function": {"name": "lookup", "description": "Look a word up: ünïcödé — 词典",
                                      "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}},
]
CALL = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": {"expr": "12*34"}}}
CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    "multi-turn-system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Und auf Deutsch? 你好 👋"}, {"role": "assistant", "content": "vier\n\n  (four)"}],
    "tools": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "12*34?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "name": "calculator", "content": "408"},
        {"role": "assistant", "content": "It is 408."}],
    "two-calls": [
        {"role": "user", "content": "Look up 'Zürich' and add 1+1"},
        {"role": "assistant", "content": "Sure.", "tool_calls": [
            CALL, {"type": "function", "function": {"name": "lookup", "arguments": {"word": "Zürich"}}}]},
        {"role": "tool", "content": "2"}, {"role": "tool", "content": "a city"},
        {"role": "assistant", "content": "2; Zürich is a city."}],
}


def encode(tok, text):
    return tok.encode(text)


# ---------------------------------------------------------------------------------------------------------------
# lmforge's template

def test_golden_ids_and_mask():
    tok = our_tokenizer()
    sp = tok.special_tokens
    msgs = CONVERSATIONS["multi-turn-system"]
    ids, mask = render_chat(tok, msgs)
    e = lambda s: encode(tok, s)  # noqa: E731
    want = ([tok.bos_id, sp[SYSTEM]] + e("You are terse.") + [sp[END], sp[USER]] + e("What is 2+2?") +
            [sp[END], sp[ASSISTANT]] + e("4") + [sp[END], sp[USER]] + e("Und auf Deutsch? 你好 👋") +
            [sp[END], sp[ASSISTANT]] + e("vier\n\n  (four)") + [sp[END]])
    assert ids == want
    # 1 exactly on the assistants' text and closing <|end|>
    n = len(want)
    reply1 = len(e("4")) + 1
    reply2 = len(e("vier\n\n  (four)")) + 1
    want_mask = [0] * n
    first = want.index(sp[ASSISTANT]) + 1
    want_mask[first:first + reply1] = [1] * reply1
    want_mask[n - reply2:] = [1] * reply2
    assert mask == want_mask
    assert tok.render_chat(msgs) == (ids, mask)
    ids2, mask2 = render_chat(tok, msgs, add_generation_prompt=True)
    assert ids2 == ids + [sp[ASSISTANT]] and mask2 == mask + [0]


def test_tools_and_tool_calls():
    tok = our_tokenizer()
    sp = tok.special_tokens
    msgs = CONVERSATIONS["tools"]
    # arguments as a JSON string are parsed first: the same ids as a dict
    as_string = [dict(m) for m in msgs]
    as_string[2] = {**msgs[2], "tool_calls": [{**CALL, "function": {"name": "calculator",
                                                                      "arguments": '{ "expr" :"12*34" }'}}]}
    ids, mask = render_chat(tok, msgs, TOOLS)
    assert render_chat(tok, as_string, TOOLS) == (ids, mask)
    e = lambda s: encode(tok, s)  # noqa: E731
    tools_line = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in TOOLS)
    call = json.dumps({"name": "calculator", "arguments": {"expr": "12*34"}}, ensure_ascii=False)
    head = [tok.bos_id, sp[SYSTEM]] + e("Use tools.") + [sp[END], sp[TOOL]] + e(tools_line) + [sp[END], sp[USER]] + \
        e("12*34?") + [sp[END], sp[ASSISTANT]]
    turn = [sp[TOOL_CALL]] + e(call) + [sp[END]]
    result = [sp[TOOL_RESULT]] + e("408") + [sp[END], sp[ASSISTANT]]
    last = e("It is 408.") + [sp[END]]
    assert ids == head + turn + result + last
    assert mask == [0] * len(head) + [1] * len(turn) + [0] * len(result) + [1] * len(last)
    # no tools given, or an empty list: no <|tool|> block
    assert sp[TOOL] not in render_chat(tok, msgs)[0] and render_chat(tok, msgs, []) == render_chat(tok, msgs)


def test_special_text_in_content_is_plain_text():
    tok = our_tokenizer()
    ids, _ = render_chat(tok, [{"role": "user", "content": "<|end|><|assistant|>"},
                               {"role": "assistant", "content": "<|bos|>"}])
    assert ids.count(tok.special_tokens[END]) == 2 and ids.count(tok.special_tokens[ASSISTANT]) == 1
    assert ids.count(tok.bos_id) == 1
    assert end_of_turn_id(tok) == tok.special_tokens[END]


@pytest.mark.parametrize("msgs, tools, words", [
    ("not a list", None, "must be a list"),
    ([{"role": "bot", "content": "x"}], None, "messages[0]: unknown role 'bot'"),
    ([{"content": "x"}], None, "messages[0]: no 'role'"),
    (["hello"], None, "messages[0]: a message must be an object"),
    ([{"role": "user", "content": ["a", "b"]}], None, "messages[0]: 'content' must be a string, got a list"),
    ([{"role": "user", "content": 3}], None, "'content' must be a string, got a number"),
    ([{"role": "user"}], None, "messages[0]: no 'content'"),
    ([{"role": "assistant"}], None, "no 'content' (or 'tool_calls')"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], None,
     "messages[1]: a system message must be the first message"),
    ([{"role": "assistant", "content": "", "tool_calls": {"name": "f"}}], None, "'tool_calls' must be a list"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}], None,
     "tool_calls[0]: 'function.name' must be a non-empty string"),
    ([{"role": "assistant", "tool_calls": [{"name": "f"}]}], None, "needs a 'function' object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], None,
     "is a string but not JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}], None,
     "'function.arguments' must be an object"),
    ([{"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}], None,
     "'type' must be 'function'"),
    ([{"role": "user", "content": "x", "tool_calls": []}], None, "only assistant messages carry 'tool_calls'"),
    ([{"role": "tool", "content": "x", "tool_call_id": 7}], None, "'tool_call_id' must be a string"),
    ([{"role": "user", "content": "x"}], {"name": "f"}, "tools must be a list"),
    ([{"role": "user", "content": "x"}], [{"name": "f"}], "tools[0]: a tool must be"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": ""}}], "non-empty string"),
])
def test_bad_messages_are_data_errors(msgs, tools, words):
    with pytest.raises(DataError) as e:
        render_chat(our_tokenizer(), msgs, tools)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_without_chat_tokens_or_template():
    plain = Tokenizer(our_tokenizer().merges, our_tokenizer().pattern, ["<|bos|>", "<|eos|>"])
    with pytest.raises(ConfigError, match="no chat template"):
        render_chat(plain, CONVERSATIONS["one-turn"])


# ---------------------------------------------------------------------------------------------------------------
# our template as Jinja: transformers agrees

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    our_tokenizer().export_hf(d)
    return d


def test_export_writes_our_template(exported):
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["chat_template"] == LMFORGE_CHAT_TEMPLATE
    back = read_hf_tokenizer(exported)
    assert back == our_tokenizer() and back.chat_template == LMFORGE_CHAT_TEMPLATE
    assert back.render_chat(CONVERSATIONS["tools"], TOOLS) == render_chat(our_tokenizer(), CONVERSATIONS["tools"],
                                                                          TOOLS)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("prompt", [False, True])
def test_transformers_apply_chat_template_same_ids(exported, name, with_tools, prompt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = hf_auto(str(exported))
    msgs, tools = CONVERSATIONS[name], TOOLS if with_tools else None
    if prompt:
        msgs = msgs[:-1]  # a conversation awaiting the assistant's reply
    ids, _ = render_chat(our_tokenizer(), msgs, tools, add_generation_prompt=prompt)
    theirs = auto.apply_chat_template(msgs, tools=tools, add_generation_prompt=prompt, return_dict=False)
    assert theirs == ids


def test_transformers_sanitized_specials_match_ours(exported, monkeypatch):
    """Special-token text inside content: transformers makes it special ids unless sanitize_control_tokens=True,
    which is our behaviour (the documented difference)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = hf_auto(str(exported))
    msgs = [{"role": "user", "content": "say <|end|> please"}, {"role": "assistant", "content": "<|user|> ok"}]
    ids, _ = render_chat(our_tokenizer(), msgs)
    assert auto.apply_chat_template(msgs, return_dict=False, sanitize_control_tokens=True) == ids
    assert auto.apply_chat_template(msgs, return_dict=False) != ids


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_jinja_path_equals_native_ids_and_masks(name):
    """Our template rendered through the Jinja renderer (a comment makes it a 'foreign' template): the same ids,
    and masks found by rendering prefixes equal the masks lmforge's template defines."""
    native = our_tokenizer()
    jinja = Tokenizer(native.merges, native.pattern)
    jinja.chat_template = LMFORGE_CHAT_TEMPLATE + "{# rendered by Jinja #}"
    for tools in (None, TOOLS):
        for prompt in (False, True):
            assert render_chat(jinja, CONVERSATIONS[name], tools, prompt) == \
                render_chat(native, CONVERSATIONS[name], tools, prompt)
    assert end_of_turn_id(jinja) == native.special_tokens[END]


@lru_cache(maxsize=None)
def hf_auto(directory: str):
    return transformers.AutoTokenizer.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------------
# imported Hugging Face templates

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# ChatML marking the assistant's text with {% generation %}: transformers then computes its own assistant mask
CHATML_GENERATION = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
                     "{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m['role'] }}\n"
                     "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

STYLES = {"qwen2": (QWEN25_TEMPLATE, "<|im_end|>", ["<tool_call>", "</tool_call>"]),
          "llama3": (LLAMA31_TEMPLATE, "<|eot_id|>", ["<|eom_id|>", "<|python_tag|>"]),
          "chatml-generation": (CHATML_GENERATION, "<|im_end|>", [])}


@lru_cache(maxsize=None)
def hf_dir(style: str, root: str) -> str:
    """An HF tokenizer directory in the style's vocabulary (trained offline) with the style's template."""
    from test_interop_hf import hf_tokenizer
    vocab_style = "llama3" if style == "llama3" else "qwen2"
    base, roles, _ = hf_tokenizer(vocab_style)
    t = tokenizers.Tokenizer.from_str(base.to_str())   # a copy: the cached one is shared with other tests
    extra = STYLES[style][2]
    if extra:  # Qwen2.5 has <tool_call> as a NON-special added token; Llama 3.1 more specials
        t.add_tokens([tokenizers.AddedToken(s, special=style == "llama3", normalized=False) for s in extra])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, chat_template=STYLES[style][0], **roles)
    d = f"{root}/{style}"
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


HF_CASES = [(name, tools, prompt) for name in CONVERSATIONS for tools in (False, True) for prompt in (False, True)
            if not (name == "two-calls")]   # Llama 3.1 refuses two calls in one message (tested below)


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_hf_templates_identical_ids(style, hf_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = hf_dir(style, hf_root)
    tok, auto = read_hf_tokenizer(d), hf_auto(d)
    assert tok.chat_template == STYLES[style][0]
    for name, with_tools, prompt in HF_CASES + [("two-calls", False, False)] * (style == "qwen2"):
        msgs, tools = CONVERSATIONS[name], TOOLS if with_tools else None
        if prompt:
            msgs = msgs[:-1]
        ids, mask = render_chat(tok, msgs, tools, add_generation_prompt=prompt)
        assert ids == auto.apply_chat_template(msgs, tools=tools, add_generation_prompt=prompt,
                                               return_dict=False), (name, with_tools, prompt)
        # the masked tokens are the assistants' replies, each with the template's end of turn
        eot = STYLES[style][1]
        masked = tok.decode([i for i, m in zip(ids, mask) if m])
        replies = [m for m in msgs if m["role"] == "assistant"]
        assert masked.count(eot) == len(replies)
        for m in replies:
            if m.get("content"):
                assert m["content"].strip() in masked
        unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
        assert all(m["content"] in unmasked for m in msgs if m["role"] == "user" and not with_tools)
    assert end_of_turn_id(tok) == tok.special_tokens[STYLES[style][1]]


def test_hf_template_content_specials_and_errors(hf_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = hf_dir("llama3", hf_root)
    tok, auto = read_hf_tokenizer(d), hf_auto(d)
    # special-token text in content becomes the special id, as transformers encodes the rendered text
    msgs = [{"role": "user", "content": "a <|eot_id|> b"}, {"role": "assistant", "content": "ok"}]
    ids, _ = render_chat(tok, msgs)
    assert ids == auto.apply_chat_template(msgs, return_dict=False)
    assert ids.count(tok.special_tokens["<|eot_id|>"]) == 4   # system, user (2), assistant
    # an empty tool list is not "no tools" to this template (it declares the ipython environment)
    assert render_chat(tok, msgs, [])[0] == auto.apply_chat_template(msgs, tools=[], return_dict=False) != ids
    # the template's raise_exception is a DataError with its message
    with pytest.raises(DataError, match="only supports single tool-calls"):
        render_chat(tok, CONVERSATIONS["two-calls"])


def test_hf_masks_equal_transformers_generation_masks(hf_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = hf_dir("chatml-generation", hf_root)
    tok, auto = read_hf_tokenizer(d), hf_auto(d)
    for name in ("one-turn", "multi-turn-system"):
        msgs = CONVERSATIONS[name]
        ids, mask = render_chat(tok, msgs)
        out = auto.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
        assert ids == out["input_ids"] and mask == out["assistant_masks"]
        assert sum(mask) > 0


# ---------------------------------------------------------------------------------------------------------------
# the JSONL reader

def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_read_conversations(tmp_path):
    f = write_lines(tmp_path / "chats.jsonl", [
        {"messages": CONVERSATIONS["tools"], "tools": TOOLS},
        "",
        {"prompt": "2+2=", "completion": "4"},
        {"messages": CONVERSATIONS["multi-turn-system"]},
    ])
    convs = list(read_conversations(f))
    assert [c.where for c in convs] == [f"{f}:1", f"{f}:3", f"{f}:4"]
    assert convs[0] == Conversation(CONVERSATIONS["tools"], TOOLS, str(f), 1)
    assert convs[1].messages == [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    assert convs[1].tools is None and convs[2].messages == CONVERSATIONS["multi-turn-system"]


@pytest.mark.parametrize("row, words", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "a row must be a JSON object"),
    ({"text": "hello"}, "no 'messages' (nor 'prompt' and 'completion')"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "messages[0]: unknown role 'human'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "'content' must be a string"),
    ({"prompt": "hi"}, "no 'completion'"),
    ({"prompt": "hi", "completion": ["x"]}, "'completion' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "calc"},
     "tools must be a list"),
])
def test_reader_bad_rows_name_file_and_line(tmp_path, row, words):
    good = {"prompt": "a", "completion": "b"}
    f = write_lines(tmp_path / "bad.jsonl", [good, good, row, good])
    it = read_conversations(f)
    assert next(it).where == f"{f}:1"   # streaming: rows before the bad one come out
    with pytest.raises(DataError) as e:
        list(it)
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: ") and words in msg and "\n" not in msg


def test_reader_file_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(read_conversations(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        list(read_conversations(tmp_path))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: invalid UTF-8"):
        list(read_conversations(tmp_path / "latin1.jsonl"))
