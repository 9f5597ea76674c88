"""`lmforge serve` through the official `openai` client, against the real server (uvicorn on 127.0.0.1, a
subprocess): every answer is checked against the engine run directly in this process on the same checkpoint
with the same parameters — greedy and seeded, streamed and not, alone and under concurrent load — plus
structured output, tool calls, logprobs, the error shapes and statuses, the queue bound, disconnects, metrics.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from lmforge import load
from lmforge.cli import main
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.chat import CHAT_MARKERS, TOOL_CALL, render_chat
from serve_helpers import Server, make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "test-key"


@pytest.fixture(autouse=True)
def pytorch_decode_step(monkeypatch):
    """The engine run here for comparison uses the PyTorch decode step (same logits as the native one, which would
    first be compiled: minutes on a loaded machine); the servers run with it too (serve_helpers)."""
    monkeypatch.setenv("LMFORGE_NATIVE", "0")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # a long context: a request that must still be running when the test acts (an abort, a full queue) can ask
    # for thousands of tokens, which outlast any delay of a busy machine
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", context=4096)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--api-key", KEY, "--max-batch", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(ckpt):
    """The same checkpoint in this process: what the server's answers are compared with."""
    model, tok = load(ckpt, device="cpu")
    return model, tok


def engine_run(local, prompt, params: SamplingParams, add_bos=None):
    model, tok = local
    return Engine(model, tok).generate([prompt], params, add_bos=add_bos)[0]


def chat_ids(tok, messages):
    ids, _ = render_chat(tok, messages, None, add_generation_prompt=True)
    return ids


def chat_params(tok, **kw) -> SamplingParams:
    sp = tok.special_tokens
    return SamplingParams(stop_token_ids=sorted(sp[m] for m in CHAT_MARKERS), **kw)


def test_models_lists_the_checkpoint_directory_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_greedy_completion_streamed_and_not_equals_the_engine(client, local):
    want = engine_run(local, "The quick brown", SamplingParams(temperature=0, max_tokens=12))[0]
    got = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


@pytest.mark.parametrize("flags, kw", [(["--temperature", "0"], {"temperature": 0}),
                                       (["--temperature", "0.9", "--top-k", "50", "--seed", "5"],
                                        {"temperature": 0.9, "seed": 5, "extra_body": {"top_k": 50}})],
                         ids=["greedy", "seeded"])
def test_completions_equal_the_generate_verb(client, ckpt, capsys, flags, kw):
    from lmforge.cli import main
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "The quick brown", "--max-tokens", "12",
                 *flags]) == 0
    want = capsys.readouterr().out.removesuffix("\n")
    got = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, **kw)
    assert got.choices[0].text == want
    chunks = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, stream=True, **kw)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_token_id_prompts_and_sampling_extras_equal_the_engine(client, local):
    ids = [5, 80, 81, 82]
    kw = dict(temperature=0.8, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.3, stop=["e"])
    extra = dict(top_k=20, min_p=0.05, repetition_penalty=1.3)
    want = engine_run(local, ids, SamplingParams(max_tokens=10, n=2, **kw, **extra))
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=10, n=2, extra_body=extra, **kw)
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert [c.finish_reason for c in got.choices] == [w.finish_reason for w in want]


def test_logit_bias_and_logprobs_equal_the_engine(client, local):
    _, tok = local
    x = tok.encode("x")[0]
    got = client.completions.create(model="tiny", prompt="Le", max_tokens=4, temperature=0,
                                    logit_bias={str(x): 100}, logprobs=3)
    assert got.choices[0].text == "xxxx"
    want = engine_run(local, "Le", SamplingParams(temperature=0, max_tokens=4, logit_bias={x: 100}, logprobs=3))[0]
    lp = got.choices[0].logprobs
    assert lp.tokens == ["x"] * 4
    assert lp.token_logprobs == pytest.approx([w.logprob for w in want.logprobs], abs=1e-5)
    assert [len(t) for t in lp.top_logprobs] == [3] * 4


def test_chat_greedy_streamed_and_not_equals_the_engine_with_logprobs(client, local):
    _, tok = local
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 8?"}]
    want = engine_run(local, chat_ids(tok, msgs), chat_params(tok, temperature=0, max_tokens=10, logprobs=2),
                      add_bos=False)[0]
    got = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=2)
    c = got.choices[0]
    assert c.message.content == want.text and c.finish_reason == "length" and c.message.role == "assistant"
    assert [e.logprob for e in c.logprobs.content] == pytest.approx([w.logprob for w in want.logprobs], abs=1e-5)
    assert [t.logprob for e in c.logprobs.content for t in e.top_logprobs] == pytest.approx(
        [v for w in want.logprobs for _, v in w.top], abs=1e-5)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sample_is_the_same_alone_and_under_concurrent_load(client):
    def ask(seed, n_tokens=12):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=n_tokens, temperature=1.0, seed=seed)
        return r.choices[0].message.content
    alone = ask(123)
    results, threads = {}, []
    for i in range(8):   # odd i: the seeded request again; even i: others of other lengths joining and leaving
        t = threading.Thread(target=lambda i=i: results.__setitem__(i, ask(123) if i % 2 else ask(i, 3 + 2 * i)))
        threads.append(t)
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in (1, 3, 5, 7)] == [alone] * 4
    assert len({results[i] for i in (0, 2, 4, 6)} | {alone}) > 1


def test_json_response_formats_follow_their_schema(client):
    # bounded (a string of at most 8 characters, a boolean): an untrained model's JSON ends within the budget
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.completions.create(model="tiny", prompt="{", max_tokens=40, temperature=0.7, seed=1,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.startswith("{")


TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}


def test_tool_calls_are_valid_under_the_tool_schema_streamed_and_not(client, local):
    _, tok = local
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[TOOL], tool_choice="required",
                                       max_tokens=120, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        assert call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=[TOOL], tool_choice="required",
                                                 max_tokens=120, temperature=0, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [d.function.arguments for d in deltas] == [x.function.arguments for x in c.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # "auto": the model's own <|tool_call|> (made certain by a logit bias) starts the calls; the result goes back
    auto = client.chat.completions.create(model="tiny", messages=msgs, tools=[TOOL], max_tokens=120, temperature=0,
                                          logit_bias={str(tok.special_tokens[TOOL_CALL]): 100})
    assert auto.choices[0].finish_reason == "tool_calls"
    call = auto.choices[0].message.tool_calls[0]
    follow = msgs + [auto.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    again = client.chat.completions.create(model="tiny", messages=follow, tools=[TOOL], tool_choice="none",
                                           max_tokens=5, temperature=0)
    assert again.choices[0].finish_reason == "length" and again.usage.prompt_tokens > auto.usage.prompt_tokens


def _error(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


@pytest.mark.parametrize("kw,param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(logit_bias={"99999": 1}), "logit_bias"),
    (dict(extra_body={"temperature": "hot"}), "temperature"),
    (dict(extra_body={"top_k": -5}), "top_k"),
    (dict(n=9), "n"),                              # more rows than --max-batch 8
])
def test_bad_values_are_400_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", **kw)
    err = _error(e.value)
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_error_statuses(client, server, local):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi")
    assert _error(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x " * 5000, max_tokens=1)
    assert "more than the model's context of 4096 tokens" in _error(e.value)["message"]
    n = 1 + len(local[1].encode("x " * 5000))    # BOS + the text
    assert f"the prompt has {n} tokens, {n - 4096} more than" in _error(e.value)["message"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200       # no key for health, metrics, the UI
    assert httpx.get(server.url + "/metrics").status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=b'{"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}')
    assert r.status_code == 400 and "wizard" in r.json()["error"]["message"]


def _health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def _wait_idle(server, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = _health(server)
        if h["live_rows"] == 0 and h["requests"] == 0 and h["used_slots"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"the engine did not become idle: {h}")


def test_a_closed_stream_aborts_its_request(client, server):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4000, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert _health(server)["live_rows"] <= 1
    stream.close()
    h = _wait_idle(server)
    assert h["free_slots"] == 8
    metrics = httpx.get(server.url + "/metrics").text
    assert 'lmforge_completions_finished_total{reason="abort"}' in metrics


def test_metrics_count_what_was_served(client, server):
    client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("lmforge_queue_waiting_requests", "lmforge_running_rows", "lmforge_generation_tokens_total",
                 "lmforge_prompt_tokens_total", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_inter_token_latency_seconds_count"):
        assert name in text
    gen = next(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("lmforge_generation_tokens_total"))
    assert gen >= 3
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_the_second_chat_turn_reuses_the_first_turns_keys_and_values(client, server, local):
    model, tok = local
    first = [{"role": "system", "content": "You answer in one short line. " * 6},
             {"role": "user", "content": "Name a colour and a number, please."}]
    r1 = client.chat.completions.create(model="tiny", messages=first, max_tokens=8, temperature=0)
    before = httpx.get(server.url + "/health").json()["prefix_cache"]["hit_tokens"]
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And another one?"}]
    r2 = client.chat.completions.create(model="tiny", messages=second, max_tokens=8, temperature=0)
    stats = httpx.get(server.url + "/health").json()["prefix_cache"]
    # the whole first prompt's full blocks (the system prompt and the first question) came from the cache
    assert stats["hit_tokens"] - before >= (len(chat_ids(tok, first)) // 16) * 16 > 0
    want = Engine(model, tok, prefix_cache_mb=0).generate([chat_ids(tok, second)], chat_params(
        tok, temperature=0, max_tokens=8), add_bos=False)[0][0]
    assert r2.choices[0].message.content == want.text
    text = httpx.get(server.url + "/metrics").text
    rate = next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("lmforge_prefix_cache_hit_rate"))
    assert 0 < rate <= 1


def test_a_full_queue_is_429_with_retry_after(ckpt):
    s = Server(ckpt, "--max-batch", "1", "--max-queue", "1")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        running = c.completions.create(model="tiny", prompt="a", max_tokens=4000, temperature=0, stream=True)
        next(iter(running))                        # it holds the only row
        waiting = []
        t = threading.Thread(target=lambda: waiting.append(
            c.completions.create(model="tiny", prompt="b", max_tokens=2, temperature=0)))
        t.start()
        deadline = time.monotonic() + 30
        while _health(s)["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "c", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        running.close()                            # frees the row: the waiting request goes on
        t.join(60)
        assert waiting and waiting[0].choices[0].finish_reason == "length"
    finally:
        s.stop()


def test_cli_refuses_a_port_in_use(ckpt, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        rc = main(["serve", "--checkpoint", str(ckpt), "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot listen on 127.0.0.1" in err and len(err.splitlines()) == 1


def test_chat_on_an_imported_hugging_face_model_uses_its_template(tmp_path):
    """A Hugging Face directory (a Qwen2.5-style template, its own tokenizer) served as it is: the prompt is what
    transformers' apply_chat_template gives, and the greedy reply equals the engine's on the same ids."""
    transformers = pytest.importorskip("transformers")
    from test_chat import hf_dir
    from lmforge.tokenizer.chat import end_of_turn_id
    d = hf_dir("qwen2", str(tmp_path))
    auto = transformers.AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(auto), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, who are you?"}]
    want_ids = auto.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    model, tok = load(d, device="cpu")
    assert chat_ids(tok, msgs) == want_ids
    want = Engine(model, tok).generate([want_ids], SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=[end_of_turn_id(tok)]), add_bos=False)[0][0]
    s = Server(Path(d))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=Path(d).name, messages=msgs, max_tokens=8, temperature=0)
    finally:
        s.stop()
    assert r.usage.prompt_tokens == len(want_ids)
    assert r.choices[0].message.content == want.text.removesuffix("<|im_end|>")
