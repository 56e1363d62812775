"""The one request type both front ends build, and what the orchestrator streams back.

HTTP (`http_api.py`) and gRPC (`grpc_api.py`) validate their own wire formats, then meet here:

  GenerateRequest  -> Orchestrator.submit() -> ResultStream  (Delta ... Delta, then .finish)

Errors a front end must map to its protocol:
  RequestError  a bad field (HTTP 4xx / gRPC INVALID_ARGUMENT); `.field` names it
  Overloaded    the request queue is full (HTTP 503 + Retry-After / gRPC RESOURCE_EXHAUSTED)
  NotReady      still loading or warming up, or the engine failed (HTTP 503 / gRPC UNAVAILABLE)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import AsyncIterator, Iterator, Literal, Sequence

from serving.engine_api import GREEDY, SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]


class RequestError(ValueError):
    """A request field is invalid. `field` is the request's own name for it (e.g. "prompt")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Overloaded(RuntimeError):
    """Too many requests are waiting; the client should retry after `retry_after_s` seconds."""

    def __init__(self, waiting: int, retry_after_s: int = 1):
        super().__init__(f"server overloaded: {waiting} requests already waiting; retry later")
        self.retry_after_s = retry_after_s


class NotReady(RuntimeError):
    """The server cannot take requests (not warmed up yet, stopping, or its engine failed)."""


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt (text as given, or token ids), a token budget and sampling."""

    prompt: str | tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    ignore_eos: bool = False  # keep generating through end-of-sequence tokens, up to max_tokens

    def __post_init__(self):
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))


@dataclasses.dataclass(frozen=True)
class Delta:
    """Newly generated text (whole UTF-8 characters only) and the token ids behind it."""

    text: str
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Finish:
    """How a request ended. completion_tokens excludes the stop token."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole non-streamed result."""

    text: str
    token_ids: tuple[int, ...]
    finish: Finish


class ResultStream:
    """The consumer's end of one request: Deltas in order, then `finish` is set.

    Written by the orchestrator's detokenize thread, read either by a thread (`__iter__`, gRPC) or
    by an asyncio task (`__aiter__`, HTTP). `cancel()` asks the orchestrator to stop the request
    and free its slot (a disconnected client); the stream then ends with reason "cancelled".
    """

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.perf_counter()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._deltas: collections.deque[Delta] = collections.deque()
        self._finish: Finish | None = None
        self._cancelled = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- producer side (orchestrator) ------------------------------------------------------------
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
        return self._cancelled

    @property
    def done(self) -> bool:
        return self._finish is not None

    @property
    def finish(self) -> Finish | None:
        return self._finish

    def cancel(self) -> None:
        self._cancelled = True

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
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"request not finished within {timeout_s}s")
                    self._ready.wait(timeout=0.5)
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
    )
