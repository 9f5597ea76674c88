"""The ASGI app of `lmforge serve`: an OpenAI-compatible API, Prometheus metrics and the web UI.

    app = create_app(model, tok, name="my-model", api_key=None, max_batch=16, max_queue=64, rag=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Why FastAPI/Starlette on uvicorn: both are maintained and widely deployed, ASGI lets one event loop hold many
slow streaming clients cheaply, and Server-Sent Events are a plain StreamingResponse (no extra package). The
model work is not on the event loop: one engine thread (serve.loop.EngineLoop) steps the engine; handlers only
parse, queue, and relay outputs.

Endpoints:
  GET  /v1/models, POST /v1/completions, POST /v1/chat/completions     the OpenAI API (openai_api, handlers)
  POST /v1/lmforge/tokenize      text -> tokens with their bytes and offsets, and per-text statistics
  POST /v1/lmforge/attention     attention weights of one layer and head over a text or a conversation
  GET  /v1/lmforge/info          the model's shape (layers, heads, context) and whether it has an index, for the UI
  GET  /health, GET /metrics     liveness with the engine's row and slot counts; Prometheus metrics (no key)
  GET  /                         the web UI (static files in serve/static, no CDN)

With `rag` (an lmforge.rag.Index, `lmforge serve --rag-db FILE`), chat requests may ask for retrieval: see handlers.
With an API key, every /v1 route wants `Authorization: Bearer KEY` (401 otherwise). Errors are OpenAI's JSON
shape; FastAPI's own validation errors (422) become 400.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.infer.engine import Engine
from lmforge.serve import handlers, inspect_api
from lmforge.serve.handlers import Served
from lmforge.serve.loop import EngineLoop
from lmforge.serve.metrics import Metrics
from lmforge.serve.openai_api import ApiError, ChatBody, CompletionBody, models_list, now, parse

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 * 1024 * 1024     # a bigger body is refused (413) before it is parsed
DISCONNECT_POLL_S = 0.25             # how often a non-streaming request checks that its client is still there


def create_app(model, tokenizer, *, name: str, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, defaults: dict | None = None, precision: str = "fp32",
               engine: Engine | None = None, prefix_cache_mb: float = 256, rag=None) -> FastAPI:
    engine = engine or Engine(model, tokenizer, max_batch=max_batch, precision=precision,
                              prefix_cache_mb=prefix_cache_mb)
    metrics = Metrics()
    loop = EngineLoop(engine, metrics, max_queue=max_queue)
    served = Served(loop, tokenizer, name, model.config.max_seq_len, dict(defaults or {}), metrics,
                    handlers.Retrieval(rag) if rag is not None else None)
    created = now()

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.loop, app.state.engine = served, loop, engine

    # ---- auth, metrics per request, errors ----
    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        return _error(ApiError(400, str(err.get("msg", "invalid request")),
                               param=".".join(str(x) for x in err.get("loc", ())[1:]) or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(ApiError(e.status_code, str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return _error(ApiError(500, f"internal error: {type(e).__name__}"))

    # ---- the OpenAI API ----
    @app.get("/v1/models")
    async def list_models():
        return models_list(name, created, served.context)

    async def generate(request: Request, shape, prepare, make_events, stream, collect):
        """One generation request: parse and check the body, prepare the prompt (off the event loop), then stream
        its events as SSE or collect them into one response."""
        body = parse(shape, await _read_body(request))
        _check_model(body.model, name)
        prep = await asyncio.to_thread(prepare, served, body)
        metrics.prompt_tokens.inc(len(prep.prompt_ids))
        events = make_events(served, prep)
        if body.stream:
            return await _sse(stream(served, body, prep, await handlers.first_and_rest(events)))
        return await _until_disconnect(request, collect(served, body, prep, events))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionBody, handlers.prepare_completion, handlers.completion_events,
                              handlers.stream_completion, handlers.collect_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatBody, handlers.prepare_chat, handlers.chat_events, handlers.stream_chat,
                              handlers.collect_chat)

    # ---- lmforge's own: what the UI's views show ----
    @app.get("/v1/lmforge/info")
    async def info():
        cfg = model.config
        return {"model": name, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "context": cfg.max_seq_len,
                "vocab_size": tokenizer.vocab_size, "max_batch": engine.max_batch, "rag": rag is not None}

    @app.post("/v1/lmforge/tokenize")
    async def tokenize(request: Request):
        body = parse(inspect_api.TokenizeBody, await _read_body(request))
        return await asyncio.to_thread(inspect_api.tokenize, tokenizer, body)

    @app.post("/v1/lmforge/attention")
    async def attention(request: Request):
        body = parse(inspect_api.AttentionBody, await _read_body(request))
        ids = await asyncio.to_thread(inspect_api.attention_ids, tokenizer, model, body)
        # the forward pass runs on the engine thread, between two steps: the model is never used twice at once
        return await loop.call(lambda: inspect_api.attention(model, tokenizer, ids, body))

    # ---- health, metrics, UI ----
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **loop.stats}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class Guard:
    """ASGI middleware: the API key on /v1 routes, and the requests counter by endpoint and status. (Plain ASGI
    rather than Starlette's BaseHTTPMiddleware, which sits between a streaming response and its client.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and path.startswith("/v1"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    resp = _error(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                           code="invalid_api_key"))
                    return await resp(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(_endpoint(path), str(status[0])).inc()


def _endpoint(path: str) -> str:
    """A bounded label for the requests counter (unknown paths are one label, not one each)."""
    known = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/lmforge/tokenize",
             "/v1/lmforge/attention", "/v1/lmforge/info", "/health", "/metrics", "/")
    return path if path in known else "/static" if path.startswith("/static/") else "other"


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _check_model(model: str, name: str) -> None:
    if model != name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {name!r}", param="model",
                       code="model_not_found")


async def _read_body(request: Request) -> bytes:
    """The request body, refused (413) past MAX_BODY_BYTES without reading the rest."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {int(size)} bytes, more than the limit of {MAX_BODY_BYTES}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _sse(chunks) -> StreamingResponse:
    """Server-Sent Events: `data: {json}` per chunk, then `data: [DONE]`. An error after the stream has started
    (the status line is gone) is sent as one last `data: {"error": ...}` event. The JSON is ASCII (\\uXXXX escapes):
    a token may hold U+2028, U+0085 or other characters that line readers other than SSE's treat as line breaks."""
    async def body():
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            await chunks.aclose()   # a client that left: close the generation now (its engine rows are aborted)
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _until_disconnect(request: Request, coro):
    """Await a whole response while watching the client: one that leaves has its generation aborted."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()
