"""OpenAI's Responses API, stateless: `POST /v1/responses` (the `openai` client's `responses.create`).

  input                a string (one user message) or a list of messages: role user / system /
                       developer / assistant, content a string or input_text / output_text parts
  instructions         a system message before the input
  max_output_tokens    default: as many as the context holds after the prompt
  temperature, top_p   as on the other endpoints (greedy unless temperature > 0); top_k, seed too
  stream               server-sent events, each with its `sequence_number`: response.created,
                       response.in_progress, response.output_item.added, response.content_part.added,
                       response.output_text.delta ..., response.output_text.done,
                       response.content_part.done, response.output_item.done, then
                       response.completed (or response.incomplete when max_output_tokens cut it,
                       response.failed when generation failed)
  text.format          text, json_object or json_schema (structured outputs, see structured.py)

Nothing is stored: the response always says `"store": false` (a request with store true is served
and the flag ignored, with a logged warning, since OpenAI's clients may send it by default), and
`previous_response_id` and `tools` are a 400 that says so. Unknown fields are ignored with a
logged warning, as on the other OpenAI endpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import fastapi
from fastapi.responses import StreamingResponse
from pydantic import Field

from serving.engine_api import ChatTemplateError
from serving.server.http_api import (
    ChatMessage,
    _failed,
    _OpenAIModel,
    _Sampling,
    _submit_error,
    _Text,
    _warn_ignored,
)
from serving.server.orchestrator import Orchestrator
from serving.server.requests import Finish, GenerateRequest, NotReady, Overloaded, RequestError
from serving.server.structured import ResponseFormat, parse_response_format

log = logging.getLogger(__name__)

PATH = "/v1/responses"
# The orchestrator's names for request fields, as this API names them in errors.
_RENAME = {"prompt": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class _ContentPart(_OpenAIModel):
    type: Literal["input_text", "output_text"]  # output_text: an earlier assistant turn, sent back
    text: str


class InputMessage(ChatMessage):
    """A chat message as the Responses API writes it: typed, with input_text / output_text parts."""

    type: Literal["message"] = "message"
    content: str | list[_ContentPart]


class _TextConfig(_OpenAIModel):
    # structured outputs in the Responses API's flat shape, validated by structured.parse_response_format
    format: dict[str, Any] | None = None


class ResponsesBody(_OpenAIModel, _Sampling):
    model_config = _OpenAIModel.model_config

    model: str = ""
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str = ""
    max_output_tokens: int | None = None
    stream: bool = False
    store: bool = False
    text: _TextConfig | None = None
    metadata: dict[str, str] = Field(default_factory=dict)  # returned as sent
    user: str = ""
    previous_response_id: str = ""
    tools: list[dict[str, Any]] = Field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        turns = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return system + [turn.for_template() for turn in turns]


def _text_format(body: ResponsesBody) -> ResponseFormat | None:
    """The grammar `text.format` asks for (None for plain text; errors are renamed by _RENAME)."""
    return parse_response_format(body.text.format if body.text is not None else None)


def _check_stateless(body: ResponsesBody) -> None:
    """Nothing is stored and no tools are called: refuse what depends on either."""
    if body.previous_response_id:
        raise RequestError(
            "previous_response_id", "responses are not stored here; send the whole conversation in input instead"
        )
    if body.tools:
        raise RequestError("tools", "tool calling is not supported")
    if body.store:
        log.warning("%s: store=true ignored; this server stores no responses", PATH)


# -- the response object -------------------------------------------------------------------------
def _status(finish: Finish | None) -> str:
    if finish is None:
        return "in_progress"
    return {"stop": "completed", "length": "incomplete"}.get(finish.reason, "failed")


def _usage(finish: Finish) -> dict[str, Any]:
    return {
        "input_tokens": finish.prompt_tokens,
        "input_tokens_details": {"cached_tokens": finish.cached_tokens},
        "output_tokens": finish.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Response:
    """One response's ids and the request fields it echoes; builds its JSON at each stage."""

    def __init__(self, body: ResponsesBody, model: str):
        self.body = body
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())

    def message(self, text: str | None, finish: Finish | None) -> dict[str, Any]:
        """The output message: no content yet (None), or its text so far."""
        status = "in_progress" if finish is None else ("completed" if finish.reason == "stop" else "incomplete")
        content = [] if text is None else [_text_part(text)]
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def json(self, text: str | None = None, finish: Finish | None = None) -> dict[str, Any]:
        body, status = self.body, _status(finish)
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": [] if text is None else [self.message(text, finish)],
            "usage": None if finish is None else _usage(finish),
            "instructions": body.instructions or None,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "text": {"format": {"type": "text"}},
            "store": False,
            "previous_response_id": None,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "metadata": body.metadata,
            "user": body.user or None,
            "error": {"code": "server_error", "message": finish.error or "generation failed"}
            if status == "failed"
            else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        }


def _closing_event(finish: Finish) -> str:
    return {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
        _status(finish), "response.failed"
    )


async def _events(response: _Response, text: _Text) -> AsyncIterator[str]:
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    where = {"item_id": response.message_id, "output_index": 0}
    yield event("response.created", response=response.json())
    yield event("response.in_progress", response=response.json())
    yield event("response.output_item.added", output_index=0, item=response.message(None, None))
    yield event("response.content_part.added", **where, content_index=0, part=_text_part(""))
    pieces = []
    async with contextlib.aclosing(text.pieces()) as stream:
        async for piece in stream:
            pieces.append(piece)
            yield event("response.output_text.delta", **where, content_index=0, delta=piece, logprobs=[])
    whole, finish = "".join(pieces), text.finish
    yield event("response.output_text.done", **where, content_index=0, text=whole, logprobs=[])
    yield event("response.content_part.done", **where, content_index=0, part=_text_part(whole))
    yield event("response.output_item.done", output_index=0, item=response.message(whole, finish))
    yield event(_closing_event(finish), response=response.json(whole, finish))


def _chat_prompt(orchestrator: Orchestrator, body: ResponsesBody) -> tuple[int, ...]:
    """The conversation through the model's chat template, as token ids (the template writes BOS)."""
    try:
        return tuple(orchestrator.tokenizer.encode_chat(body.messages()))
    except ChatTemplateError as exc:
        raise RequestError("input", str(exc)) from None


def add_routes(app: fastapi.FastAPI, orchestrator: Orchestrator, model_name: str) -> None:
    @app.post(PATH)
    async def responses(body: ResponsesBody, request: fastapi.Request):
        try:
            _check_stateless(body)
            response_format = _text_format(body)
            _warn_ignored(body, PATH)
            prompt = _chat_prompt(orchestrator, body)
            generate = GenerateRequest(
                prompt, body.max_output_tokens, body.sampling(), fit_context=True, response_format=response_format
            )
            stream = orchestrator.submit(generate)
        except (RequestError, Overloaded, NotReady) as exc:
            return _submit_error(exc, _RENAME)
        response, text = _Response(body, model_name), _Text(stream)
        if body.stream:
            return StreamingResponse(_events(response, text), media_type="text/event-stream")
        whole = await text.whole(request)
        return _failed(whole, text) or response.json(whole, text.finish)
