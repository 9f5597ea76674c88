"""The web UI in a real headless Chromium (Playwright): every view clicked through, and the numbers it shows
compared with what the API returns for the same request — the chat's streamed replies (two turns, a system
prompt, sampling controls, export as JSON, the stop button), the token view's probabilities and top-5
alternatives (also reshaped by its temperature slider), the attention heat map, the tokenizer view and its
comparison across languages.

Skipped only when /usr/bin/chromium is absent (CI installs it: .ci/run).
"""
from __future__ import annotations

import json
import math
import os
import time

import httpx
import pytest

from serve_helpers import Server, make_checkpoint

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (CI installs "
                                 "it with apt-get install chromium)"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a long context, so that a reply lasts long enough to be stopped from the page
    s = Server(make_checkpoint(tmp_path_factory.mktemp("ui") / "tiny", context=4096))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = browser.new_page()
    pg.goto(server.url + "/")
    pg.wait_for_selector("body[data-ready='1']", timeout=30_000)
    yield pg
    pg.close()


def api(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def set_sampling(page, **values):
    for k, v in values.items():
        page.fill(f"#{k}", str(v))


def send(page, text):
    n = page.locator(".msg.assistant .finish").count()
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant .finish').length > {n}", timeout=60_000)


def test_chat_two_turns_match_the_api_and_export(page, server):
    set_sampling(page, temperature=0, max_tokens=8, seed=3)
    page.fill("#system", "Be brief.")
    send(page, "hi")
    send(page, "and then?")
    shown = page.locator(".msg .content").all_inner_texts()
    assert page.locator(".msg").count() == 4
    base = {"model": "tiny", "temperature": 0, "max_tokens": 8, "top_p": 1, "top_k": 0, "min_p": 0, "seed": 3}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    first = api(server, "/v1/chat/completions", dict(base, messages=msgs))["choices"][0]["message"]["content"]
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    second = api(server, "/v1/chat/completions", dict(base, messages=msgs))["choices"][0]["message"]["content"]
    assert shown == ["hi", first, "and then?", second]
    page.click("#export")
    assert json.loads(page.input_value("#export-text")) == msgs + [{"role": "assistant", "content": second}]


def test_token_view_shows_the_api_probabilities_and_reshapes_them(page, server):
    set_sampling(page, temperature=0, max_tokens=6)
    send(page, "hello")
    want = api(server, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 6,
        "top_p": 1, "top_k": 0, "min_p": 0, "logprobs": True, "top_logprobs": 5})["choices"][0]["logprobs"]["content"]
    page.click("button[data-view='tokens']")
    spans = page.locator("#token-view .tok")
    assert spans.count() == len(want) == 6
    for i, w in enumerate(want):
        assert float(spans.nth(i).get_attribute("data-p")) == pytest.approx(math.exp(w["logprob"]), abs=1e-4)
        assert spans.nth(i).inner_text() == w["token"]
    page.eval_on_selector("#token-temp", "el => { el.value = '2'; el.dispatchEvent(new Event('input')); }")
    spans.nth(2).hover()
    page.wait_for_selector("#tip:not([hidden])")
    top = want[2]["top_logprobs"]
    assert [float(x) for x in page.locator("#tip td.p").all_inner_texts()] == pytest.approx(
        [math.exp(t["logprob"]) for t in top], abs=1e-4)
    z = [math.exp(t["logprob"] / 2) for t in top]
    assert [float(x) for x in page.locator("#tip td.pT").all_inner_texts()] == pytest.approx(
        [v / sum(z) for v in z], abs=1e-4)


def test_stop_button_ends_the_reply_and_frees_the_row(page, server):
    for attempt in range(3):      # on a loaded machine the browser may see the reply only after it ended: again
        page.click("#clear")                      # a conversation of its own: the checks below read its reply
        set_sampling(page, temperature=0, max_tokens=4000)
        page.fill("#prompt", "tell me everything")
        page.click("#send")
        page.wait_for_selector("#stop:enabled", timeout=60_000)
        page.wait_for_function("[...document.querySelectorAll('.msg.assistant .content')].pop()?.textContent.length"
                               " > 3", timeout=60_000)
        try:
            page.click("#stop", timeout=5_000)
            break
        except Exception as e:            # playwright's TimeoutError: Stop was disabled, the reply had ended
            if "Timeout" not in type(e).__name__:
                raise
            page.wait_for_selector("#stop:disabled", timeout=60_000)
    else:
        pytest.fail("the reply ended before Stop could be clicked, three times")
    page.wait_for_selector(".msg.assistant .finish", timeout=30_000)
    assert page.locator(".msg.assistant .finish").last.inner_text() == "[stopped]"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = httpx.get(server.url + "/health").json()
        if h["live_rows"] == 0 and h["requests"] == 0:
            break
        time.sleep(0.05)
    assert h["live_rows"] == 0 and h["requests"] == 0, h


def test_attention_view_draws_the_api_weights(page, server):
    page.click("button[data-view='attention']")
    page.check("input[name=att-source][value=text]")
    page.fill("#att-text", "The quick brown fox")
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    page.click("#att-show")
    page.wait_for_selector("#att-view table")
    want = api(server, "/v1/lmforge/attention", {"text": "The quick brown fox", "layer": 1, "head": 2})
    rows = page.locator("#att-view tbody tr")
    assert rows.count() == len(want["tokens"])
    shown = page.eval_on_selector_all("#att-view tbody tr", "trs => trs.map(tr => [...tr.querySelectorAll('td')]"
                                      ".map(td => Number(td.dataset.w)))")
    assert shown == want["attention"]
    assert all(sum(r) == pytest.approx(1, abs=1e-3) for r in shown)
    assert all(w == 0 for i, r in enumerate(shown) for w in r[i + 1:])     # causal


def test_tokenizer_view_and_language_comparison_match_the_api(page, server):
    page.click("button[data-view='tokenizer']")
    text = "Le renard brun. 敏捷的狐狸"
    page.fill("#tok-text", text)
    page.click("#tok-go")
    page.wait_for_selector("#stat-tokens")
    want = api(server, "/v1/lmforge/tokenize", {"text": text})
    assert int(page.inner_text("#stat-tokens")) == want["n_tokens"]
    assert int(page.inner_text("#stat-bytes")) == want["n_bytes"] == len(text.encode())
    assert page.inner_text("#stat-bpt") == f"{want['bytes_per_token']:.2f}"
    ids = page.eval_on_selector_all("#tok-view .piece", "ps => ps.map(p => Number(p.dataset.id))")
    assert ids == [t["id"] for t in want["tokens"]]
    page.click("#tok-compare")
    page.wait_for_function("document.querySelectorAll('#tok-table tbody tr').length === 11", timeout=30_000)
    samples = dict(page.evaluate("SAMPLES"))          # the page's own texts (its table shows them reflowed)
    assert len(samples) == 11 and "Chinese" in samples
    for row in page.locator("#tok-table tbody tr").all():
        cells = row.locator("td").all_inner_texts()
        got = api(server, "/v1/lmforge/tokenize", {"text": samples[cells[0]]})
        assert int(cells[2]) == got["n_tokens"] and int(cells[3]) == got["n_bytes"]
        assert cells[6] == f"{got['bytes_per_token']:.2f}"
