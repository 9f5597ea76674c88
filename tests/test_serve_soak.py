"""A short soak of the real server (about 30 s): rounds of 64 concurrent streaming clients, a fifth of them leaving in the
middle of their stream, together with fuzzed bodies (wrong types, values out of range, a prompt longer than the
context, a body over the size limit, invalid UTF-8, deep JSON, not JSON at all). After every round: no 5xx ever,
every fuzzed body answered 4xx with a message, the engine idle with every slot free, and the server's memory
(RSS) not growing from round to round beyond a tolerance.
"""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import psutil
import pytest

from serve_helpers import Server, make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CLIENTS, ROUNDS, MAX_BATCH = 64, 6, 16
SOAK_SECONDS = 30          # rounds go on until both this long and ROUNDS rounds have passed

FUZZ: list[bytes] = [json.dumps(b).encode() for b in [
    {"model": "tiny", "prompt": 5},
    {"model": "tiny", "prompt": "hi", "max_tokens": "ten"},
    {"model": "tiny", "prompt": "hi", "temperature": -3},
    {"model": "tiny", "prompt": "hi", "top_p": 7},
    {"model": "tiny", "prompt": "hi", "n": -1},
    {"model": "tiny", "prompt": "hi", "n": 10_000},
    {"model": "tiny", "prompt": "hi", "logprobs": 10_000},
    {"model": "tiny", "prompt": "hi", "seed": 2 ** 80},
    {"model": "tiny", "prompt": "hi", "stop": [""]},
    {"model": "tiny", "prompt": "hi", "logit_bias": {"abc": 3}},
    {"model": "tiny", "prompt": [1, -4, 2]},
    {"model": "tiny", "prompt": [10 ** 9]},
    {"model": "tiny", "prompt": "x " * 3000},                        # longer than the context
    {"model": "nope", "prompt": "hi"},
    {"prompt": "hi"},
    {"model": "tiny", "prompt": "hi", "stream": "yes"},
    {"model": "tiny", "prompt": "hi", "response_format": {"type": "json_schema",
                                                          "json_schema": {"schema": {"type": "object", "not": {}}}}},
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",
                                                                                  "function": {"name": "1 bad"}}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
    {"model": "tiny", "messages": "hi"},
]] + [
    b"", b"not json", b"[1, 2, 3]", b'{"model": "tiny", "prompt": "\xff\xfe bad utf-8"}',
    b'{"model": "tiny", "prompt": "\\ud800"}', b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "tiny", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}',   # over the body size limit
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(make_checkpoint(tmp_path_factory.mktemp("soak") / "tiny"), "--max-batch", str(MAX_BATCH),
               "--max-queue", str(CLIENTS + len(FUZZ)))   # room for all: this test is not about 429
    yield s
    s.stop()


async def stream_client(http: httpx.AsyncClient, i: int, leave: bool) -> str:
    chat = i % 2 == 0
    body = {"model": "tiny", "stream": True, "max_tokens": 4 + i % 20, "temperature": 0.8, "seed": i}
    body.update({"messages": [{"role": "user", "content": f"question {i}"}]} if chat else {"prompt": f"text {i}"})
    async with http.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        n = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                n += 1
                if line == "data: [DONE]":
                    return "done"
                if leave and n == 3:
                    return "left"          # closing the response here drops the connection mid-stream
    raise AssertionError(f"client {i}: the stream ended without [DONE]")


async def fuzz_client(http: httpx.AsyncClient, raw: bytes) -> tuple[int, str]:
    path = "/v1/chat/completions" if b'"messages"' in raw[:200] else "/v1/completions"
    r = await http.post(path, content=raw, headers={"Content-Type": "application/json"})
    return r.status_code, r.json()["error"]["message"]


async def one_round(url: str, seed: int):
    rnd = random.Random(seed)
    leave = set(rnd.sample(range(CLIENTS), CLIENTS // 5))
    limits = httpx.Limits(max_connections=CLIENTS + len(FUZZ))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        streams = [stream_client(http, i, i in leave) for i in range(CLIENTS)]
        fuzz = [fuzz_client(http, raw) for raw in FUZZ]
        results = await asyncio.gather(*streams, *fuzz)
    return results[:CLIENTS], results[CLIENTS:]


def wait_idle(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health").json()
        if h["live_rows"] == 0 and h["requests"] == 0 and h["queued"] == 0 and h["free_slots"] == MAX_BATCH:
            return h
        time.sleep(0.05)
    raise AssertionError(f"the engine is not idle after the round: {h}")


def test_soak(server):
    proc = psutil.Process(server.pid)
    rss = []
    t0, k = time.monotonic(), 0
    while k < ROUNDS or time.monotonic() - t0 < SOAK_SECONDS:
        streams, fuzz = asyncio.run(one_round(server.url, k))
        k += 1
        assert streams.count("left") == CLIENTS // 5 and streams.count("done") == CLIENTS - CLIENTS // 5
        for raw, (status, message) in zip(FUZZ, fuzz):
            assert 400 <= status < 500 and message.strip(), (raw[:80], status, message)
        h = wait_idle(server.url)
        assert h["waiting_requests"] == 0 and h["used_slots"] == 0
        rss.append(proc.memory_info().rss)
    metrics = httpx.get(server.url + "/metrics").text
    statuses = {line.split('status="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith("lmforge_requests_total{")}
    assert statuses and not any(s.startswith("5") for s in statuses), statuses
    # the first round warms up (allocator pools, compiled grammars, caches); later rounds must not keep growing
    assert rss[-1] <= rss[1] * 1.10 + 16 * 2 ** 20, [r // 2 ** 20 for r in rss]
