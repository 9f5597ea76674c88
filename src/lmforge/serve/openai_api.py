"""The OpenAI API's shapes: request bodies checked and turned into engine inputs, and the response objects.

Bodies are parsed by pydantic straight from the bytes (`parse`): strict JSON types (a string is no number),
unknown fields ignored (as OpenAI's clients send fields we have no use for), invalid UTF-8, lone surrogates and
deep nesting refused by the parser. Ranges are SamplingParams' own checks (the one sampling parameter object);
whatever is refused becomes an `ApiError` that the app answers in OpenAI's error shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Chat bodies may also carry lmforge's `rag` field (true, or {"k", "mode", "mmr"}) when the server was started with
--rag-db: see handlers.retrieve_for_chat.

Sampling fields: OpenAI's (n, temperature, top_p, max_tokens / max_completion_tokens, stop, seed,
presence_penalty, frequency_penalty, logit_bias, logprobs) and vLLM's extras (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids), all mapped 1:1 onto SamplingParams. Defaults come from the checkpoint's
generation_config.json, as for `lmforge generate`.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.sampling import SamplingParams

MAX_LOGPROBS = 20              # OpenAI's top_logprobs range is 0..20


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_lmforge(cls, e: LmforgeError, param: str | None = None) -> "ApiError":
        """A user-fixable error from the library (a bad value, a prompt the engine refuses) as a 400."""
        return cls(400, " ".join(str(e.message).split()), param=param or e.field)


# ---------------------------------------------------------------------------------------------------------------
# request bodies

class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaFormat(Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(Body):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


class SamplingBody(Body):
    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM's extra sampling fields (the openai client sends them through extra_body)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionBody(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class RagOptions(Body):
    """lmforge's extra chat field `rag`: answer the last user message from the server's index (--rag-db)."""
    k: int = Field(5, ge=1, le=50)
    mode: Literal["bm25", "dense", "hybrid"] = "hybrid"
    mmr: float | None = Field(None, ge=0, le=1)


class ChatBody(SamplingBody):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    rag: RagOptions | None = None               # lmforge's own: retrieval from --rag-db

    @field_validator("rag", mode="before")
    @classmethod
    def _rag_flag(cls, v):                      # `"rag": true` asks with the defaults, false not at all
        return {} if v is True else None if v is False else v


def parse(model: type[Body], raw: bytes) -> Body:
    """The body as `model`, or a 400 naming the first problem and where it is."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if not _is_type_tag(x))
        msg = err.get("msg", "invalid request body")
        raise ApiError(400, f"{loc}: {msg}" if loc else msg, param=loc or None) from None


def _is_type_tag(x) -> bool:
    """pydantic names the union member it tried ('str', 'list[int]', 'function-after[...]'): not a field."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x)


# ---------------------------------------------------------------------------------------------------------------
# body -> SamplingParams

_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "logit_bias", "min_tokens", "stop", "seed", "ignore_eos", "stop_token_ids")


def sampling_params(body: SamplingBody, defaults: dict, *, max_tokens: int | None, logprobs: int | None,
                    logprobs_param: str = "logprobs", max_tokens_param: str = "max_tokens") -> SamplingParams:
    """SamplingParams of a request: `defaults` (the checkpoint's), then every field the body sets."""
    values = dict(defaults)
    for name in _SAMPLING_FIELDS:
        v = getattr(body, name)
        if v is not None:
            values[name] = v
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    if logprobs is not None:
        if logprobs > MAX_LOGPROBS:
            raise ApiError(400, f"must be at most {MAX_LOGPROBS}, got {logprobs}", param=logprobs_param)
        values["logprobs"] = logprobs
    try:
        return SamplingParams(**values)
    except ConfigError as e:
        field = (e.field or "").split(".")[0]
        param = {"logprobs": logprobs_param, "max_tokens": max_tokens_param}.get(field, e.field)
        raise ApiError.from_lmforge(e, param=param) from None


# ---------------------------------------------------------------------------------------------------------------
# responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(tok, i: int) -> str:
    """A token as OpenAI shows it: its text (bytes that are half a character become U+FFFD)."""
    return tok.id_to_bytes(i).decode("utf-8", errors="replace")


def completion_logprobs(tok, lps, offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists of tokens, their logprobs, {token: logprob} of the top
    alternatives, and each token's character offset in the text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        t = token_text(tok, lp.token_id)
        out["tokens"].append(t)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({token_text(tok, i): v for i, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(t)
    return out


def chat_logprobs(tok, lps) -> dict:
    """The chat shape: one entry per token with its bytes and its top alternatives."""
    def entry(i, v):
        return {"token": token_text(tok, i), "logprob": v, "bytes": list(tok.id_to_bytes(i))}
    return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(i, v) for i, v in lp.top])
                        for lp in lps]}


def models_list(name: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge",
                                        "max_model_len": max_model_len}]}
