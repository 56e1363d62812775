"""The one request type both front ends build, and what the orchestrator streams back.

HTTP (`http_api.py`) and gRPC (`grpc_api.py`) validate their own wire formats, then meet here:

  GenerateRequest  -> Orchestrator.submit() -> ResultStream  (Delta ... Delta, then .finish)

Errors a front end must map to its protocol:
  RequestError  a bad field (HTTP 4xx / gRPC INVALID_ARGUMENT); `.field` names it, `.code` says
                what kind of problem it is when a client may act on it (CONTEXT_LENGTH_EXCEEDED)
  Overloaded    the request queue is full (HTTP 503 + Retry-After / gRPC RESOURCE_EXHAUSTED)
  NotReady      still loading or warming up, or the engine failed (HTTP 503 / gRPC UNAVAILABLE)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from serving.engine_api import GREEDY, SamplingParams

if TYPE_CHECKING:  # structured.py raises RequestError from here
    from serving.server.structured import ResponseFormat

FinishReason = Literal["stop", "length", "cancelled", "error"]


# OpenAI's error code for a prompt (or prompt plus max_tokens) that does not fit the context;
# LangChain and LiteLLM look for it to trim a conversation and retry.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class RequestError(ValueError):
    """A request field is invalid. `field` is the request's own name for it (e.g. "prompt")."""

    def __init__(self, field: str, message: str, code: str | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


# A full queue drains at the speed of whole generations, so sooner than this a retry would
# likely be refused again; HTTP's Retry-After counts whole seconds.
DEFAULT_RETRY_AFTER_S = 1


class Overloaded(RuntimeError):
    """Too many requests are waiting; the client should retry after `retry_after_s` seconds."""

    def __init__(self, waiting: int, retry_after_s: int = DEFAULT_RETRY_AFTER_S):
        super().__init__(f"server overloaded: {waiting} requests already waiting; retry later")
        self.retry_after_s = retry_after_s


class NotReady(RuntimeError):
    """The server cannot take requests (not warmed up yet, stopping, or its engine failed)."""


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt (text as given, or token ids), a token budget and sampling.

    `max_tokens` None: as many as the context holds after the prompt. `fit_context`: a prompt plus
    max_tokens over the context is a RequestError (as OpenAI and vLLM answer) instead of a text
    cut short where the cache ends (as JetStream does)."""

    prompt: str | tuple[int, ...]
    max_tokens: int | None  # 0: run only the prompt, for its log probabilities (sampling.prompt_logprobs)
    sampling: SamplingParams = GREEDY
    ignore_eos: bool = False  # keep generating through end-of-sequence tokens, up to max_tokens
    fit_context: bool = False
    response_format: ResponseFormat | None = None  # structured outputs: the text follows its grammar

    def __post_init__(self):
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability (None for a prompt's first token: nothing comes before it) and
    the most likely tokens at its position with theirs, best first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Delta:
    """Newly generated text (whole UTF-8 characters only) and the token ids behind it; with
    `sampling.logprobs` set, one TokenLogprob per token id."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Finish:
    """How a request ended. completion_tokens excludes the stop token."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache held


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole non-streamed result."""

    text: str
    token_ids: tuple[int, ...]
    finish: Finish
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


class ResultStream:
    """The consumer's end of one request: Deltas in order, then `finish` is set.

    Written by the orchestrator's detokenize thread, read either by a thread (`__iter__`, gRPC) or
    by an asyncio task (`__aiter__`, HTTP). `cancel()` (a disconnected client) and `stop()` (the
    front end matched a stop string) ask the orchestrator to end the request and free its slot;
    the stream then ends with reason "cancelled" or "stop", whichever was asked first.
    """

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # of the prompt's tokens, those the prefix cache held; set at prefill
        # with sampling.prompt_logprobs: one per prompt token, set before the first Delta or finish
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
        self.submitted_at = time.perf_counter()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._deltas: collections.deque[Delta] = collections.deque()
        self._finish: Finish | None = None
        self._cancel_reason: FinishReason | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- producer side (orchestrator) ------------------------------------------------------------
    def set_prompt_logprobs(self, logprobs: Sequence[TokenLogprob]) -> None:
        with self._lock:
            self.prompt_logprobs = tuple(logprobs)

    def push(self, delta: Delta) -> None:
        with self._lock:
            if self._finish is not None:
                return
            self._deltas.append(delta)
            self._wake()

    def close(self, finish: Finish) -> None:
        with self._lock:
            if self._finish is not None:
                return
            self._finish = finish
            self._wake()

    def _wake(self) -> None:
        self._ready.notify_all()
        for loop, event in self._async_waiters:
            loop.call_soon_threadsafe(event.set)

    # -- consumer side (front ends) --------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        """The consumer asked for the request to end (`cancel` or `stop`)."""
        return self._cancel_reason is not None

    @property
    def cancel_reason(self) -> FinishReason | None:
        """How a request the consumer ended finishes: "cancelled", "stop", or None if not asked."""
        return self._cancel_reason

    @property
    def done(self) -> bool:
        return self._finish is not None

    @property
    def finish(self) -> Finish | None:
        return self._finish

    def cancel(self) -> None:
        self._ask_end("cancelled")

    def stop(self) -> None:
        """A stop string ended the text: the request completed, as with a stop token."""
        self._ask_end("stop")

    def _ask_end(self, reason: FinishReason) -> None:
        with self._lock:
            if self._cancel_reason is None:
                self._cancel_reason = reason

    def _take(self) -> tuple[list[Delta], bool]:
        deltas = list(self._deltas)
        self._deltas.clear()
        return deltas, self._finish is not None

    def __iter__(self) -> Iterator[Delta]:
        return self.iter()

    def iter(self, timeout_s: float | None = None) -> Iterator[Delta]:
        """Deltas as they come; TimeoutError if the request is not done within timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                while not self._deltas and self._finish is None:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"request not finished within {timeout_s}s")
                    self._ready.wait(timeout=left)  # push() and close() notify
                deltas, finished = self._take()
            yield from deltas
            if finished:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            self._async_waiters.append(waiter)
        try:
            while True:
                with self._lock:
                    deltas, finished = self._take()
                    if not deltas and not finished:
                        event.clear()
                if deltas or finished:
                    for delta in deltas:
                        yield delta
                    if finished:
                        return
                else:
                    await event.wait()
        finally:
            with self._lock:
                self._async_waiters.remove(waiter)

    def collect(self, timeout_s: float | None = None) -> Completion:
        return _join(list(self.iter(timeout_s)), self)

    async def acollect(self) -> Completion:
        return _join([delta async for delta in self], self)


def _join(deltas: Sequence[Delta], stream: ResultStream) -> Completion:
    assert stream.finish is not None
    return Completion(
        text="".join(d.text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        finish=stream.finish,
        logprobs=tuple(lp for d in deltas for lp in d.logprobs),
        prompt_logprobs=stream.prompt_logprobs,
    )


class StopStrings:
    """Cuts generated text at the first of some stop strings, for text that arrives in pieces.

    `feed(piece)` returns the text that may be released now and whether a stop string was found;
    on a match the text before it is released and the stop string and all after it are dropped.
    A tail that could be the start of a stop string completed by a later piece is held back, so a
    streaming client never sees part of a stop string; `flush()` releases it when generation ends
    for another reason.
    """

    def __init__(self, stops: Sequence[str]):
        if not all(stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in stops), default=0)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self._held + piece  # no stop string starts in text released earlier (see _held)
        found = [at for at in (text.find(stop) for stop in self._stops) if at >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        keep = self._stop_prefix_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of a stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
