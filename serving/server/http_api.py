"""HTTP front end (FastAPI): JetStream's `jetstream-http` API, an OpenAI-compatible API, metrics.

  POST /generate              {"prompt", "max_tokens", "stream"?, sampling?} -> {"response": text}
                              stream: one JSON object per line, {"response": piece}
  GET  /healthcheck           200 {"response": {"is_live": true}} once warm, else 500
  POST /v1/completions        OpenAI completions (stream: server-sent events), with usage
  POST /v1/chat/completions   the same over the model's chat template
  GET  /v1/models             the served model
  GET  /metrics               Prometheus, JetStream's metric names

Handlers only translate: strict pydantic bodies (unknown fields are a 400 naming them; the
legacy fields listed in each model are accepted and ignored) -> GenerateRequest ->
Orchestrator.submit -> wire format. Every error is JSON
{"error": {"message", "type", "param"}} where `param` names the offending field. Generation is
greedy unless the request asks for sampling (temperature > 0), on every endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.engine_api import SamplingParams
from serving.server.orchestrator import Orchestrator
from serving.server.requests import (
    Completion,
    Finish,
    GenerateRequest,
    NotReady,
    Overloaded,
    RequestError,
    ResultStream,
)

_DISCONNECT_POLL_S = 0.25


# -- request bodies ------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampling(_Body):
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, lt=2**31)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)


class GenerateBody(_Sampling):
    """JetStream's /generate. Legacy fields of jetstream-http clients, accepted and ignored:
    session_cache, priority."""

    prompt: str
    max_tokens: int
    stream: bool = False
    session_cache: str | None = None
    priority: int | None = None


class _OpenAIBody(_Sampling):
    """Fields OpenAI clients send that have one supported value are checked, not dropped.
    Accepted and ignored: model (this server serves one), user."""

    model: str | None = None
    user: str | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: Literal[1] = 1
    stop: None | Literal[""] | list[str] = Field(None, max_length=0)  # stop strings: unsupported
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logprobs: None | Literal[False] = None


class CompletionBody(_OpenAIBody):
    prompt: str | list[int]
    max_tokens: int = 16
    echo: Literal[False] = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # accepted and ignored


class ChatBody(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


# -- errors --------------------------------------------------------------------------------------
def _error(status: int, message: str, param: str | None, kind: str, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _validation_error(_: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") in ("json_invalid", "model_attributes_type") or not loc:
        param, message = "body", "request body must be a JSON object"
        if first.get("type") == "missing":
            message = "request body is missing"
    else:
        # a typed union reports its member (`prompt.str`); name the field the client sent
        param = ".".join(p for p in loc if p not in ("str", "list[int]", "int"))
        message = f"{param}: {first.get('msg', 'invalid value')}"
    return _error(400, message, param, "invalid_request_error")


def _submit_error(exc: Exception, rename: dict[str, str]) -> JSONResponse:
    if isinstance(exc, RequestError):
        field = rename.get(exc.field, exc.field)
        return _error(400, f"{field}: {exc.message}", field, "invalid_request_error")
    if isinstance(exc, Overloaded):
        return _error(
            503, str(exc), None, "overloaded", headers={"Retry-After": str(exc.retry_after_s)}
        )
    return _error(503, str(exc), None, "unavailable")


# -- streaming helpers ---------------------------------------------------------------------------
async def _complete(request: fastapi.Request, stream: ResultStream) -> Completion | None:
    """The whole result; None (and the request cancelled) if the client went away first."""
    task = asyncio.ensure_future(stream.acollect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            stream.cancel()
            task.cancel()


async def _deltas(stream: ResultStream) -> AsyncIterator[str]:
    """Non-empty text pieces; a client disconnect (generator closed) cancels the request."""
    try:
        async for delta in stream:
            if delta.text:
                yield delta.text
    finally:
        if not stream.done:
            stream.cancel()


def _usage(finish: Finish) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _finish_reason(finish: Finish) -> str:
    return finish.reason if finish.reason in ("stop", "length") else "error"


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# -- OpenAI formats ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _OpenAIFormat:
    object: str
    chunk_object: str
    id_prefix: str
    choice: Callable[[str, str | None], dict]  # a whole response's choice: (text, finish_reason)
    chunk_choice: Callable[[str, str | None], dict]  # a streamed chunk's choice
    opening_choice: dict | None = None  # sent before the first piece of text


COMPLETION = _OpenAIFormat(
    object="text_completion",
    chunk_object="text_completion",
    id_prefix="cmpl",
    choice=lambda text, reason: {"index": 0, "text": text, "logprobs": None, "finish_reason": reason},
    chunk_choice=lambda text, reason: {"index": 0, "text": text, "logprobs": None, "finish_reason": reason},
)
CHAT = _OpenAIFormat(
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    id_prefix="chatcmpl",
    choice=lambda text, reason: {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": reason,
    },
    chunk_choice=lambda text, reason: {
        "index": 0,
        "delta": {"content": text} if text else {},
        "finish_reason": reason,
    },
    opening_choice={"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
)


async def _openai_response(
    fmt: _OpenAIFormat, body: _OpenAIBody, stream: ResultStream, request: fastapi.Request, model: str
):
    """Streamed (SSE, usage on the final chunk, then [DONE]) or whole, with usage counts."""
    head = {"id": f"{fmt.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}

    def chunk(choice: dict, **extra) -> str:
        return _sse({**head, "object": fmt.chunk_object, "choices": [choice], **extra})

    async def events() -> AsyncIterator[str]:
        if fmt.opening_choice:
            yield chunk(fmt.opening_choice)
        async for piece in _deltas(stream):
            yield chunk(fmt.chunk_choice(piece, None))
        finish = stream.finish
        yield chunk(fmt.chunk_choice("", _finish_reason(finish)), usage=_usage(finish))
        yield _sse("[DONE]")

    if body.stream:
        return StreamingResponse(events(), media_type="text/event-stream")
    result = await _complete(request, stream)
    if result is None or result.finish.reason == "error":
        return _error(500, result.finish.error if result else "cancelled", None, "server_error")
    choice = fmt.choice(result.text, _finish_reason(result.finish))
    return {**head, "object": fmt.object, "choices": [choice], "usage": _usage(result.finish)}


class _JsonBodies:
    """Every POST body here is JSON: read `curl -d '{...}'` (sent as form-urlencoded) or a body
    without a content type as JSON too, instead of failing with a confusing 400. (Pure ASGI, so
    streaming responses still see client disconnects.)"""

    _FORM = b"application/x-www-form-urlencoded"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            content_type = dict(scope["headers"]).get(b"content-type", b"")
            if not content_type or content_type.startswith(self._FORM):
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


# -- the app -------------------------------------------------------------------------------------
def create_app(orchestrator: Orchestrator, *, model_name: str) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="serving", docs_url=None, redoc_url=None)
    app.add_middleware(_JsonBodies)
    app.add_exception_handler(RequestValidationError, _validation_error)
    created = int(time.time())

    def submit(request: GenerateRequest, rename: dict[str, str] | None = None):
        try:
            return orchestrator.submit(request), None
        except (RequestError, Overloaded, NotReady) as exc:
            return None, _submit_error(exc, rename or {})

    @app.get("/healthcheck")
    def healthcheck():
        live = orchestrator.is_live
        return JSONResponse({"response": {"is_live": live}}, status_code=200 if live else 500)

    @app.get("/metrics")
    def metrics():
        return Response(orchestrator.metrics.exposition(), media_type=orchestrator.metrics.content_type)

    @app.get("/v1/models")
    def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "serving"}
        return {"object": "list", "data": [card]}

    @app.post("/generate")
    async def generate(body: GenerateBody, request: fastapi.Request):
        stream, error = submit(GenerateRequest(body.prompt, body.max_tokens, body.sampling()))
        if error:
            return error
        if body.stream:
            lines = (json.dumps({"response": piece}) + "\n" async for piece in _deltas(stream))
            return StreamingResponse(lines, media_type="application/x-ndjson")
        result = await _complete(request, stream)
        if result is None or result.finish.reason == "error":
            return _error(500, result.finish.error if result else "cancelled", None, "server_error")
        return {"response": result.text}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: fastapi.Request):
        prompt = body.prompt if isinstance(body.prompt, str) else tuple(body.prompt)
        stream, error = submit(GenerateRequest(prompt, body.max_tokens, body.sampling()))
        return error or await _openai_response(COMPLETION, body, stream, request, model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: fastapi.Request):
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        prompt = orchestrator.tokenizer.apply_chat_template(messages)
        rename = {"prompt": "messages"}
        if body.max_completion_tokens is not None:  # OpenAI's newer name wins; errors name it
            max_tokens, rename["max_tokens"] = body.max_completion_tokens, "max_completion_tokens"
        elif body.max_tokens is not None:
            max_tokens = body.max_tokens
        else:
            max_tokens = orchestrator.max_tokens_limit
        stream, error = submit(GenerateRequest(prompt, max_tokens, body.sampling()), rename)
        return error or await _openai_response(CHAT, body, stream, request, model_name)

    return app


class HttpServer:
    """uvicorn in a background thread: for tests and for running beside the gRPC server."""

    def __init__(self, app: fastapi.FastAPI, host: str, port: int, log_level: str = "warning"):
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "HttpServer":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("HTTP server failed to start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        """The port bound once started: the one asked for, or a free one when that was 0."""
        return self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=timeout_s)

    def serve_forever(self) -> None:
        """Run in the calling thread (handles SIGINT/SIGTERM) until shut down."""
        self._server.run()
