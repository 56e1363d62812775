"""HTTP front end (FastAPI): JetStream's `jetstream-http` API, an OpenAI-compatible API, metrics.

  POST /generate              {"prompt", "max_tokens", "stream"?, sampling?} -> {"response": text}
                              stream: one JSON object per line, {"response": piece}
  GET  /healthcheck           200 {"response": {"is_live": true}} once warm, else 500
  POST /v1/completions        OpenAI completions (stream: server-sent events), with usage
  POST /v1/chat/completions   the same over the model's chat template
  GET  /v1/models             the served model
  GET  /v1/models/{id}        its card; 404 for any other id
  POST /v1/responses          OpenAI's Responses API, stateless (responses_api.py)
  POST /tokenize, /detokenize vLLM's token counting (tokenize_api.py)
  GET  /metrics               Prometheus, JetStream's metric names

Handlers only translate: pydantic bodies -> GenerateRequest -> Orchestrator.submit -> wire format.
Every error is JSON {"error": {"message", "type", "param", "code"}} where `param` names the offending
field (openai_errors.py): FastAPI's 404, 405 and validation errors too.
Generation is greedy unless the request asks for sampling (temperature > 0), on every endpoint.

/generate is strict, as JetStream's: an unknown field is a 400 naming it (the legacy fields listed
in GenerateBody are accepted and ignored). The OpenAI endpoints take what OpenAI clients send:
unknown fields are ignored with a logged warning (as vLLM does), null means "not set", `stop`
strings end the text early (the request completes there and frees its slot), `ignore_eos`, `seed`,
`stream_options.include_usage`, `response_format` (json_object, json_schema: see structured.py),
OpenAI's penalties and `logit_bias` and vLLM's `repetition_penalty`, log probabilities
(`logprobs`; chat: `logprobs` + `top_logprobs`) and `echo`, `n` choices (each its own request in
its own slot; with a seed, choice i samples with seed + i, as vLLM); fields asking for what this
server cannot do (best_of, suffix, tools) are a 400 naming the field (see _UNSUPPORTED). A prompt
over the context, or a prompt plus max_tokens over it, is a 400 with code context_length_exceeded.

With an API key every route but /healthcheck and /metrics needs it, and `allowed_origins` turns on
CORS (auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from serving.engine_api import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    MAX_TOP_LOGPROBS,
    PENALTY_RANGE,
    ChatTemplateError,
    SamplingParams,
    Tokenizer,
)
from serving.server import openai_errors
from serving.server.auth import ApiKey, protect_app
from serving.server.orchestrator import Orchestrator
from serving.server.requests import (
    Finish,
    GenerateRequest,
    NotReady,
    Overloaded,
    RequestError,
    ResultStream,
    StopStrings,
    TokenLogprob,
)
from serving.server.structured import parse_response_format

log = logging.getLogger(__name__)

# How often a non-streamed request checks whether its client went away (then it is cancelled and
# its slot freed): short next to a generation, long next to the cost of the check.
_DISCONNECT_POLL_S = 0.25
# OpenAI documents up to 4 stop strings, vLLM takes any number; a bound keeps the per-piece search cheap.
MAX_STOP_STRINGS = 16


# -- request bodies ------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Above this a softmax over logits/temperature is uniform to float32 precision: a larger value is a
# client mistake, not a sharper request.
MAX_TEMPERATURE = 100.0
# OpenAI's bound on completions' `logprobs` (chat's `top_logprobs` goes to MAX_TOP_LOGPROBS).
MAX_COMPLETION_LOGPROBS = 5
# vLLM's (and older OpenAI-compatible servers') way of saying "no top-k filter"; ours is 0.
TOP_K_OFF_ALIASES = (-1,)
SEED_RANGE = 2**31


class _Sampling(_Body):
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    top_k: int = Field(0, ge=min(TOP_K_OFF_ALIASES))
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Any integer (OpenAI's is int64), reduced to SEED_RANGE so any engine can hold it in an int32.
    # Unset: a fresh random seed per request, so unseeded sampled requests draw independent tokens.
    seed: int | None = None

    def sampling(self, choice: int = 0) -> SamplingParams:
        """The sampling of choice `choice` of n: its own seed, seed + choice when one is given."""
        top_k = 0 if self.top_k in TOP_K_OFF_ALIASES else self.top_k
        seed = secrets.randbelow(SEED_RANGE) if self.seed is None else (self.seed + choice) % SEED_RANGE
        return SamplingParams(temperature=self.temperature, top_k=top_k, top_p=self.top_p, seed=seed)


class GenerateBody(_Sampling):
    """JetStream's /generate. Legacy fields of jetstream-http clients, accepted and ignored:
    session_cache, priority."""

    prompt: str
    max_tokens: int
    stream: bool = False
    session_cache: str | None = None
    priority: int | None = None


class _OpenAIModel(BaseModel):
    """OpenAI bodies: unknown fields are kept aside (`model_extra`, logged and ignored) and a null
    field is an unset one, as OpenAI clients send them."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _StreamOptions(_OpenAIModel):
    include_usage: bool = False  # one more chunk before [DONE]: empty choices, the usage counts


class _OpenAIBody(_OpenAIModel, _Sampling):
    """Accepted and ignored: model (this server serves one), user. The fields after `ignore_eos`
    are OpenAI's, checked against _UNSUPPORTED rather than dropped."""

    model_config = _OpenAIModel.model_config

    model: str = ""
    user: str = ""
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] = Field(default_factory=list)
    ignore_eos: bool = False  # keep generating through end-of-sequence tokens, up to max_tokens
    n: int = 1
    presence_penalty: float = Field(0.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    frequency_penalty: float = Field(0.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's; 1 = off
    # token id (a string in JSON) -> value added to its logit
    logit_bias: dict[str, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    # structured outputs, validated by structured.parse_response_format (json_object, json_schema)
    response_format: dict[str, Any] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_ids_and_values(cls, bias: dict[str, float]) -> dict[str, float]:
        low, high = LOGIT_BIAS_RANGE
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit()):
                message = "keys must be token ids (non-negative integers), got {key}"
                raise PydanticCustomError("logit_bias_key", message, {"key": repr(key)})
            if not low <= value <= high:
                message = "values must be in [{low}, {high}], got {value} for {key}"
                context = {"low": low, "high": high, "value": value, "key": key}
                raise PydanticCustomError("logit_bias_value", message, context)
        return bias

    def sampling(self, choice: int = 0) -> SamplingParams:
        return dataclasses.replace(
            super().sampling(choice),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=tuple((int(key), value) for key, value in self.logit_bias.items()),
            logprobs=self.top_logprobs_count,
            prompt_logprobs=self.echo_logprobs,
        )

    @property
    def top_logprobs_count(self) -> int | None:
        """How many top log probabilities each token gets; None: no log probabilities at all."""
        return None

    @property
    def echo_logprobs(self) -> bool:
        """Whether the prompt's own log probabilities are returned too (completions' echo)."""
        return False

    @field_validator("stop")
    @classmethod
    def _stop_strings_are_few_and_not_empty(cls, stop: str | list[str]) -> str | list[str]:
        stops = [stop] if isinstance(stop, str) else stop
        if not all(stops):
            raise PydanticCustomError("stop_empty", "stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise PydanticCustomError("stop_count", f"at most {MAX_STOP_STRINGS} stop strings")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(_OpenAIBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = 16  # OpenAI's default
    echo: bool = False  # the prompt before the completion (and its log probabilities, with logprobs)
    best_of: int = 1
    suffix: str = ""
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # top log probabilities per token

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    @property
    def echo_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    def single_prompt(self) -> str | tuple[int, ...]:
        """The one prompt: text, token ids, or a batch of one of either."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > 1:
                raise RequestError("prompt", "one prompt per request is supported; send one request per prompt")
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else tuple(prompt)


class _TextPart(_OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(_OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str = ""  # accepted and ignored

    def for_template(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": role, "content": text}


class ChatBody(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False  # chat: whether to return log probabilities
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def top_logprobs_count(self) -> int | None:
        return self.top_logprobs if self.logprobs else None


# OpenAI fields this server cannot honour, with the test a value passes when it asks for nothing;
# any other value is a 400 naming the field, since ignoring it would answer another question.
_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("best_of", lambda v: v == 1, "only best_of=1 is supported; ask for n choices instead"),
    ("suffix", lambda v: not v, "suffix is not supported"),
    ("tools", lambda v: not v, "tool calling is not supported"),
)


def _check_supported(body: _OpenAIBody, slots: int) -> None:
    if not 1 <= body.n <= slots:
        raise RequestError("n", f"must be between 1 and {slots} (each choice takes one of the server's decode slots)")
    fields = type(body).model_fields
    for name, asks_nothing, reason in _UNSUPPORTED:
        if name in fields and not asks_nothing(getattr(body, name)):
            raise RequestError(name, reason)
    if body.stream_options is not None and not body.stream:
        raise RequestError("stream_options", "only allowed when stream is true")
    if isinstance(body, ChatBody) and body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs", "needs logprobs: true")
    if isinstance(body, CompletionBody) and body.max_tokens == 0 and not body.echo_logprobs:
        raise RequestError("max_tokens", "0 is allowed only with echo and logprobs (the prompt's log probabilities)")


def _ignored_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the unknown fields in an OpenAI body, nested ones included."""
    names = [prefix + name for name in model.model_extra or {}]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if isinstance(item, BaseModel) and item.model_config.get("extra") == "allow":
                names += _ignored_fields(item, f"{prefix}{name}." + ("" if index is None else f"{index}."))
    return names


def _warn_ignored(body: BaseModel, path: str) -> None:
    ignored = _ignored_fields(body)
    if ignored:
        log.warning("%s: ignoring fields this server does not know: %s", path, ", ".join(ignored))


def _accept_openai(body: _OpenAIBody, path: str, slots: int) -> None:
    """Refuse what cannot be honoured (RequestError); log what is ignored."""
    _check_supported(body, slots)
    _warn_ignored(body, path)


# -- errors --------------------------------------------------------------------------------------
_error = openai_errors.error_response


def _is_field(part: str | int) -> bool:
    """A pydantic error location part that names a field or an index, not a union member's type
    (`str`, `list[int]`, ...), so errors name the field the client sent."""
    return isinstance(part, int) or ("[" not in part and part not in ("str", "int", "float", "bool"))


async def _validation_error(_: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # a union field reports one error per member; the deepest names what is wrong inside it
    field = errors[0].get("loc", ())[:2]
    first = max((e for e in errors if e.get("loc", ())[:2] == field), key=lambda e: len(e.get("loc", ())))
    loc = [p for p in first.get("loc", ()) if p != "body"]
    code = openai_errors.validation_code(first.get("type", ""))
    if first.get("type") in ("json_invalid", "model_attributes_type") or not loc:
        param, message, code = "body", "request body must be a JSON object", "invalid_json"
        if first.get("type") == "missing":
            message = "request body is missing"
    else:
        param = ".".join(str(p) for p in loc if _is_field(p))
        message = f"{param}: {first.get('msg', 'invalid value')}"
    return _error(400, message, param, openai_errors.INVALID_REQUEST, code)


def _submit_error(exc: Exception, rename: dict[str, str]) -> JSONResponse:
    if isinstance(exc, RequestError):
        field = rename.get(exc.field, exc.field)
        return _error(400, f"{field}: {exc.message}", field, openai_errors.INVALID_REQUEST, exc.code)
    if isinstance(exc, Overloaded):
        return _error(503, str(exc), None, "overloaded", headers={"Retry-After": str(exc.retry_after_s)})
    return _error(503, str(exc), None, "unavailable")


# -- generated text ------------------------------------------------------------------------------
class _Text:
    """One request's text as its client sees it: cut at the first stop string, if any. A stop
    string ends the request early (`ResultStream.stop`: its slot is freed and it counts as
    completed, reason "stop"); a client that goes away (the generator closed) cancels it.
    `finish` is set once `pieces()` is exhausted; completion_tokens then counts the tokens behind
    the text up to the stop string."""

    def __init__(self, stream: ResultStream, stops: Sequence[str] = ()):
        self._stream = stream
        self._stops = StopStrings(stops) if stops else None
        self._tokens = 0
        self._logprobs: list[TokenLogprob] = []  # of the tokens read since the last take_logprobs()
        self.finish: Finish | None = None

    def take_logprobs(self) -> list[TokenLogprob]:
        """Log probabilities of the tokens read since the last call (with a stop string, up to the
        token that completed it), when the request asked for them."""
        taken, self._logprobs = self._logprobs, []
        return taken

    async def pieces(self) -> AsyncIterator[str]:
        """Non-empty pieces of text, in order."""
        try:
            async for delta in self._stream:
                self._tokens += len(delta.token_ids)
                self._logprobs.extend(delta.logprobs)
                text, stopped = self._stops.feed(delta.text) if self._stops else (delta.text, False)
                if text:
                    yield text
                if stopped:
                    self._stream.stop()
                    self.finish = Finish(
                        "stop", self._stream.prompt_tokens, self._tokens, cached_tokens=self._stream.cached_tokens
                    )
                    return
            held = self._stops.flush() if self._stops else ""
            if held:
                yield held
            self.finish = self._stream.finish
        finally:
            if not self._stream.done:
                self._stream.cancel()

    async def whole(self, request: fastapi.Request) -> str | None:
        """All of it; None (and the request cancelled) if the client went away first."""

        async def join() -> str:
            async with contextlib.aclosing(self.pieces()) as pieces:
                return "".join([piece async for piece in pieces])

        task = asyncio.ensure_future(join())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    return None
        finally:
            if not task.done():
                self._stream.cancel()
                task.cancel()


def _failed(text: str | None, finished: _Text) -> JSONResponse | None:
    """The 500 for a non-streamed request that did not complete."""
    if text is None:
        return _error(500, "cancelled", None, "server_error")
    if finished.finish.reason == "error":
        return _error(500, finished.finish.error or "generation failed", None, "server_error")
    return None


def _usage(*finishes: Finish) -> dict:
    """The counts of one request's choices: the prompt once (and of it, the tokens the prefix cache
    held, as OpenAI reports cached prompt tokens), every choice's completion tokens."""
    prompt = finishes[0].prompt_tokens
    completion = sum(finish.completion_tokens for finish in finishes)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": finishes[0].cached_tokens},
    }


def _finish_reason(finish: Finish) -> str:
    return finish.reason if finish.reason in ("stop", "length") else "error"


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# -- OpenAI formats ------------------------------------------------------------------------------
class _Logprobs:
    """Log probabilities in OpenAI's shapes, token strings decoded one token at a time (a token
    holding part of a UTF-8 character reads as U+FFFD). Completions' `text_offset` counts from the
    start of the returned text (the echoed prompt included) across a stream's chunks."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._offset = 0

    def _text(self, token: int) -> str:
        return self._tokenizer.decode([token])

    def completion(self, entries: Sequence[TokenLogprob]) -> dict[str, list]:
        tokens = [self._text(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else {self._text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, list]:
        def one(token: int, logprob: float) -> dict:
            text = self._text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
        }


@dataclasses.dataclass(frozen=True)
class _OpenAIFormat:
    object: str
    chunk_object: str
    id_prefix: str
    choice: Callable[[str, str | None, dict | None], dict]  # a whole response's: (text, finish_reason, logprobs)
    chunk_choice: Callable[[str, str | None, dict | None], dict]  # a streamed chunk's
    logprobs: Callable[[_Logprobs, Sequence[TokenLogprob]], dict]  # entries in this API's shape
    opening_choice: dict | None = None  # sent before the first piece of text


COMPLETION = _OpenAIFormat(
    object="text_completion",
    chunk_object="text_completion",
    id_prefix="cmpl",
    choice=lambda text, reason, lp: {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason},
    chunk_choice=lambda text, reason, lp: {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason},
    logprobs=_Logprobs.completion,
)
CHAT = _OpenAIFormat(
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    id_prefix="chatcmpl",
    choice=lambda text, reason, lp: {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": lp,
        "finish_reason": reason,
    },
    chunk_choice=lambda text, reason, lp: {
        "index": 0,
        "delta": {"content": text} if text else {},
        "logprobs": lp,
        "finish_reason": reason,
    },
    logprobs=_Logprobs.chat,
    opening_choice={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
)


def _indexed(choice: dict, index: int) -> dict:
    """A format's choice as choice `index` of n."""
    return {**choice, "index": index}


async def _interleaved(texts: Sequence[_Text]) -> AsyncIterator[tuple[int, str | None, list[TokenLogprob]]]:
    """(choice index, piece, log probabilities of the tokens behind it) as each choice's text
    arrives, and (index, None, the rest) when it ends. Closing this generator (the client went
    away) cancels every choice still running."""
    arrivals: asyncio.Queue[tuple[int, str | None, list[TokenLogprob]]] = asyncio.Queue()

    async def drain(index: int, text: _Text) -> None:
        try:
            async with contextlib.aclosing(text.pieces()) as pieces:
                async for piece in pieces:
                    await arrivals.put((index, piece, text.take_logprobs()))
        finally:
            arrivals.put_nowait((index, None, text.take_logprobs()))

    tasks = [asyncio.ensure_future(drain(index, text)) for index, text in enumerate(texts)]
    try:
        running = len(tasks)
        while running:
            index, piece, entries = await arrivals.get()
            running -= piece is None
            yield index, piece, entries
    finally:
        for task in tasks:
            task.cancel()


class _Choice:
    """One choice of n as the client sees it: its text, its log probabilities in the API's shape
    (when asked for) and, with echo, the prompt (and its log probabilities) before its first text."""

    def __init__(self, fmt: _OpenAIFormat, body: _OpenAIBody, stream: ResultStream, tokenizer: Tokenizer, echo: str):
        self.fmt, self.stream = fmt, stream
        self.text = _Text(stream, body.stop_strings)
        self._logprobs = _Logprobs(tokenizer) if body.top_logprobs_count is not None else None
        self._unsent_echo = [echo]

    def _lead(self) -> tuple[str, list[TokenLogprob]]:
        """The echoed prompt and its log probabilities, once (the stream sets them before any text)."""
        if not self._unsent_echo:
            return "", []
        return self._unsent_echo.pop(), list(self.stream.prompt_logprobs or ())

    def _rendered(self, entries: list[TokenLogprob]) -> dict | None:
        return None if self._logprobs is None else self.fmt.logprobs(self._logprobs, entries)

    def chunk(self, piece: str, entries: list[TokenLogprob], reason: str | None = None) -> dict:
        """A streamed chunk's choice: the piece, with the log probabilities of the tokens behind it."""
        prompt, prompt_entries = self._lead()
        entries = prompt_entries + entries
        return self.fmt.chunk_choice(prompt + piece, reason, self._rendered(entries) if entries else None)

    def whole(self, text: str) -> dict:
        prompt, prompt_entries = self._lead()
        entries = prompt_entries + self.text.take_logprobs()
        return self.fmt.choice(prompt + text, _finish_reason(self.text.finish), self._rendered(entries))


async def _openai_response(
    fmt: _OpenAIFormat,
    body: _OpenAIBody,
    streams: Sequence[ResultStream],
    request: fastapi.Request,
    model: str,
    tokenizer: Tokenizer,
    echo: str = "",
):
    """Whole, with usage; or streamed as server-sent events ending in [DONE]. One choice per
    stream (`n`), each with its `index`; streamed, each chunk carries one choice and the log
    probabilities of the tokens read since that choice's last chunk. Usage counts the prompt once
    and every choice's completion tokens. Streamed usage: with stream_options.include_usage, as
    OpenAI: `"usage": null` on every chunk, then one more chunk before [DONE] with empty choices
    and the counts; without it, the counts ride on the last chunk with a finish_reason, as
    llama.cpp's server has long sent them (clients that never ask for usage still count tokens).
    `echo` (the prompt's text) comes before each choice's first text, with the prompt's log
    probabilities when they were asked for."""
    head = {"id": f"{fmt.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    choices = [_Choice(fmt, body, stream, tokenizer, echo) for stream in streams]
    texts = [choice.text for choice in choices]
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(parts: list[dict], **extra) -> str:
        usage = {"usage": None} if include_usage else {}
        return _sse({**head, "object": fmt.chunk_object, "choices": parts, **usage, **extra})

    async def events() -> AsyncIterator[str]:
        if fmt.opening_choice:
            for index in range(len(choices)):
                yield chunk([_indexed(fmt.opening_choice, index)])
        finished = 0
        async with contextlib.aclosing(_interleaved(texts)) as arrivals:
            async for index, piece, entries in arrivals:
                if piece is not None:
                    yield chunk([_indexed(choices[index].chunk(piece, entries), index)])
                    continue
                finished += 1
                last = finished == len(texts) and not include_usage
                extra = {"usage": _usage(*(t.finish for t in texts))} if last else {}
                reason = _finish_reason(texts[index].finish)
                yield chunk([_indexed(choices[index].chunk("", entries, reason), index)], **extra)
        if include_usage:
            yield chunk([], usage=_usage(*(t.finish for t in texts)))
        yield _sse("[DONE]")

    if body.stream:
        return StreamingResponse(events(), media_type="text/event-stream")
    wholes = await asyncio.gather(*(text.whole(request) for text in texts))
    failed = next(filter(None, (_failed(whole, text) for whole, text in zip(wholes, texts, strict=False))), None)
    if failed:
        return failed
    parts = [
        _indexed(choice.whole(whole), index) for index, (choice, whole) in enumerate(zip(choices, wholes, strict=False))
    ]
    return {**head, "object": fmt.object, "choices": parts, "usage": _usage(*(t.finish for t in texts))}


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
def create_app(
    orchestrator: Orchestrator,
    *,
    model_name: str,
    api_key: ApiKey | None = None,
    allowed_origins: Sequence[str] = (),
) -> fastapi.FastAPI:
    """The routes above; with `api_key` every route but /healthcheck and /metrics needs it, and
    `allowed_origins` (none by default) may call from a browser (CORS)."""
    # the Responses API and tokenize routes are built from this module's helpers
    from serving.server import responses_api, tokenize_api

    app = fastapi.FastAPI(title="serving", docs_url=None, redoc_url=None)
    app.add_middleware(_JsonBodies)
    protect_app(app, api_key, allowed_origins)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, openai_errors.http_exception)
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

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "serving"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # ids may hold a slash (org/name)
    def model(model_id: str):
        if model_id != model_name:
            message = f"the model {model_id!r} does not exist; this server serves {model_name!r}"
            return _error(404, message, "model", openai_errors.INVALID_REQUEST, "model_not_found")
        return card

    @app.post("/generate")
    async def generate(body: GenerateBody, request: fastapi.Request):
        stream, error = submit(GenerateRequest(body.prompt, body.max_tokens, body.sampling()))
        if error:
            return error
        text = _Text(stream)

        async def lines() -> AsyncIterator[str]:
            async with contextlib.aclosing(text.pieces()) as pieces:
                async for piece in pieces:
                    yield json.dumps({"response": piece}) + "\n"

        if body.stream:
            return StreamingResponse(lines(), media_type="application/x-ndjson")
        whole = await text.whole(request)
        return _failed(whole, text) or {"response": whole}

    def submit_openai(body: _OpenAIBody, path: str, prompt, max_tokens: int | None, rename: dict[str, str]):
        """One request per choice; all of them or none (the ones taken are cancelled)."""
        try:
            _accept_openai(body, path, orchestrator.slots)
            response_format = parse_response_format(body.response_format)
        except RequestError as exc:
            return None, _submit_error(exc, rename)
        streams = []
        for choice in range(body.n):
            sampling = body.sampling(choice)
            request = GenerateRequest(
                prompt,
                max_tokens,
                sampling,
                ignore_eos=body.ignore_eos,
                fit_context=True,
                response_format=response_format,
            )
            stream, error = submit(request, rename)
            if error:
                for taken in streams:
                    taken.cancel()
                return None, error
            streams.append(stream)
        return streams, None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: fastapi.Request):
        try:
            prompt = body.single_prompt()
        except RequestError as exc:
            return _submit_error(exc, {})
        streams, error = submit_openai(body, "/v1/completions", prompt, body.max_tokens, {})
        if error:
            return error
        echo = "" if not body.echo else prompt if isinstance(prompt, str) else orchestrator.tokenizer.decode(prompt)
        return await _openai_response(COMPLETION, body, streams, request, model_name, orchestrator.tokenizer, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: fastapi.Request):
        try:
            prompt = tuple(orchestrator.tokenizer.encode_chat([m.for_template() for m in body.messages]))
        except ChatTemplateError as exc:
            return _submit_error(RequestError("messages", str(exc)), {})
        rename = {"prompt": "messages"}
        if body.max_completion_tokens is not None:  # OpenAI's newer name wins; errors name it
            max_tokens, rename["max_tokens"] = body.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens = body.max_tokens  # None: as many as the context holds after the prompt
        streams, error = submit_openai(body, "/v1/chat/completions", prompt, max_tokens, rename)
        return error or await _openai_response(CHAT, body, streams, request, model_name, orchestrator.tokenizer)

    responses_api.add_routes(app, orchestrator, model_name)
    tokenize_api.add_routes(app, orchestrator)
    return app


# uvicorn's start-up is a socket bind, well under this on any machine; past it something is wrong.
_HTTP_START_TIMEOUT_S = 30.0
_HTTP_START_POLL_S = 0.01
# In-flight requests get this long to finish when the server stops (uvicorn drains connections).
_HTTP_STOP_TIMEOUT_S = 10.0


class HttpServer:
    """uvicorn in a background thread, beside the gRPC server (and in tests)."""

    def __init__(self, app: fastapi.FastAPI, host: str, port: int, log_level: str = "warning"):
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self, timeout_s: float = _HTTP_START_TIMEOUT_S) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("HTTP server failed to start")
            time.sleep(_HTTP_START_POLL_S)
        return self

    @property
    def port(self) -> int:
        """The port bound once started: the one asked for, or a free one when that was 0."""
        return self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self, timeout_s: float = _HTTP_STOP_TIMEOUT_S) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=timeout_s)
