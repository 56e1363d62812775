"""Continuous batching over the engine contract (serving/engine_api.py), after JetStream's
orchestrator: one thread and one queue per stage, a free-slot queue, and nothing model-specific.

Flow of one request:

  submit()            caller's thread: tokenize, validate, admit (or raise Overloaded), enqueue
     | _prefill_q       unbounded, but admission caps requests waiting for a slot
  prefill thread      prefill_engine.prefill(tokens, sampling) -> (Prefix, first token);
     |                  what waits together: prefill_batch, several prompts a call
     |                  first token ----------------------------------------------+
     | _transfer_q      bounded; disaggregated mode only                           |
  transfer thread     generate_engine.transfer(Prefix): onto the generate mesh     |
     | _generate_q      bounded: prefixes hold KV memory until inserted            |
  generate thread     take a slot from _free_slots, insert(Prefix, slot);          |
     |                  then generate() one token for every slot, again and again, |
     |                  except while prompts that have a free slot are prefilled   |
     |                  (interleaved mode: they join the next step instead)        |
     | _detokenize_q    bounded: how far decoding may run ahead of the host copy   |
  detokenize thread   <-------------------------------------------------------------+
                      to_host(); per request: stop on EOS / max_tokens / full cache /
                      cancellation; stream whole UTF-8 text (and the log probabilities of
                      the tokens behind it, when asked). The generate thread sees
                      the request finished, releases its slot in the engine and
                      returns it to _free_slots

Ownership rules that keep slots consistent without sharing engine state across threads:
- Only the generate thread touches the DecodeState and assigns slots. Every decode step carries
  a snapshot of which request owned each slot when the step ran, so tokens of a finished
  request's slot are never attributed to the next request inserted there.
- Only the detokenize thread finishes running requests; only the generate thread frees their
  slots (it sees `finished`). A request that finished before it was inserted (stop token or
  max_tokens=1 at prefill, or cancelled) is skipped at insert; if that races, it is freed on the
  next round. Steps that could only produce tokens past max_tokens or the cache end are not
  run, so a finished slot does not keep the device busy while its last tokens are detokenized.
- The first token of a request is queued for detokenization before its prefix moves on, so it
  is always processed before any decode step of that request.
- Structured outputs (a request with a response_format): its TokenMatcher fills the first token's
  mask in the prefill thread, then belongs to the generate thread, which advances it with every
  token of that request (the first one at insert) and fills the slot's mask row before each step.
  A step with a constrained slot therefore waits for the previous step's tokens on the host; a
  step with none uploads no mask and keeps running ahead of the host copies.
- Calls into one engine are serialised by a lock (interleaved mode shares one engine between
  the prefill and generate threads); JAX dispatch is asynchronous, so the lock is held only
  while work is enqueued and prefill and decode still overlap on the device.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from serving.engine_api import Engine, Params, StepTokens, Tokenizer, TokenLogprobs, unconstrained_bitmask
from serving.server.metrics import ServerMetrics
from serving.server.requests import (
    CONTEXT_LENGTH_EXCEEDED,
    Delta,
    Finish,
    FinishReason,
    GenerateRequest,
    NotReady,
    Overloaded,
    RequestError,
    ResultStream,
    TokenLogprob,
)
from serving.server.structured import GrammarCompiler, TokenMatcher

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often blocked threads look at the stop flag
# The generate thread with no slot decoding: while slots are still held (their requests finished,
# awaiting release), a new prefix should be inserted at once, so it waits only this long per look.
_RELEASE_WAIT_S = 0.005
# Every slot finished but not yet released: the detokenize thread is on their last tokens; yield
# the GIL to it rather than spin.
_DRAIN_SLEEP_S = 0.001
STOP_JOIN_TIMEOUT_S = 5.0  # a stage thread blocked in a device call gets this long to return
# Decode steps that may be in flight ahead of the detokenize thread's host copies: enough to keep
# the device busy while the host reads, few enough that a finished request wastes little work.
DECODE_LOOKAHEAD = 4
# Requests allowed to wait for a slot unless told otherwise: two per slot, so every slot has its
# next request queued while the one before finishes, and at least 64, so a burst of clients (a
# benchmark's default concurrency) queues instead of getting 503s on a small server.
QUEUED_REQUESTS_PER_SLOT = 2
MIN_QUEUED_REQUESTS = 64


def default_max_queued_requests(slots: int) -> int:
    return max(MIN_QUEUED_REQUESTS, QUEUED_REQUESTS_PER_SLOT * slots)


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas that hold only whole UTF-8 characters.

    Decodes a short window (the tokens since the last emitted delta plus the ones before them
    for context) and emits the new text only when it no longer ends in U+FFFD, i.e. when a
    multi-byte character split across tokens is complete. `flush()` emits whatever is held.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token: int) -> str:
        self._ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        decode = self._tokenizer.decode
        seen = decode(self._ids[self._prefix_offset : self._read_offset])
        text = decode(self._ids[self._prefix_offset :])
        if len(text) <= len(seen) and not final:
            return ""
        if text.endswith("\ufffd") and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(seen) :]


@dataclasses.dataclass(eq=False)
class _Request:
    """Orchestrator-side state of one admitted request."""

    stream: ResultStream
    tokens: list[int]
    max_tokens: int
    request: GenerateRequest
    detokenizer: IncrementalDetokenizer
    matcher: TokenMatcher | None = None  # structured outputs: the request's grammar position
    first: StepTokens | None = None  # the first token, from prefill
    generated: int = 0
    waiting: bool = True  # counted against the queue limit until inserted or finished
    finished: bool = False
    steps_dispatched: int = 0  # decode steps run while this request held a slot
    prefill_started: float = 0.0
    prefill_returned: float = 0.0
    first_token_at: float = 0.0
    inserted_at: float = 0.0
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)  # emit vs finish


class Orchestrator:
    """Serves GenerateRequests with continuous batching. See the module docstring for the flow."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        prefill_engine: Engine,
        generate_engine: Engine,
        prefill_params: Params,
        generate_params: Params,
        metrics: ServerMetrics | None = None,
        max_queued_requests: int | None = None,  # None: default_max_queued_requests(slots)
        decode_lookahead: int = DECODE_LOOKAHEAD,
        healthy: Callable[[], bool] = lambda: True,
    ):
        if max_queued_requests is None:
            max_queued_requests = default_max_queued_requests(generate_engine.max_concurrent_decodes)
        if max_queued_requests < 1:
            raise ValueError("max_queued_requests must be >= 1")
        self.tokenizer = tokenizer
        self._prefill_engine = prefill_engine
        self._generate_engine = generate_engine
        self._prefill_params = prefill_params
        self._generate_params = generate_params
        self.metrics = metrics or ServerMetrics()
        self.max_queued_requests = max_queued_requests
        self._healthy = healthy  # extra liveness condition, e.g. every multi-host worker connected
        self._eos_ids = frozenset(tokenizer.eos_ids)
        self._grammars = GrammarCompiler(tokenizer)

        self.slots = generate_engine.max_concurrent_decodes
        self.max_prefill_length = prefill_engine.max_prefill_length
        self.max_target_length = generate_engine.max_target_length
        self.disaggregated = prefill_engine is not generate_engine

        self._prefill_q: queue.Queue[_Request] = queue.Queue()
        self._transfer_q: queue.Queue[tuple[_Request, Any]] = queue.Queue(maxsize=self.slots)
        self._generate_q: queue.Queue[tuple[_Request, Any]] = queue.Queue(maxsize=self.slots)
        self._detokenize_q: queue.Queue[tuple] = queue.Queue(maxsize=decode_lookahead)
        # lowest free slot first: live slots stay packed low, so an engine can run only the rows
        # up to the highest live one (engine_api.Engine.generate)
        self._free_slots: queue.PriorityQueue[int] = queue.PriorityQueue()
        for slot in range(self.slots):
            self._free_slots.put(slot)

        self._engine_locks = {id(e): threading.Lock() for e in (prefill_engine, generate_engine)}
        self._lock = threading.Lock()  # guards _inflight and the waiting count
        self._inflight: set[_Request] = set()
        self._waiting = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._live = False
        self._failure: BaseException | None = None
        self._decode_state: Any = None

        self.metrics.watch(
            prefill_backlog=self._prefill_q.qsize,
            transfer_backlog=self._transfer_q.qsize,
            generate_backlog=self._generate_q.qsize,
            slots_used_percentage=lambda: self.slots_used / self.slots,  # a fraction, as JetStream reports it
            requests_waiting=lambda: self._waiting,
            requests_running=self._requests_running,
            kv_cache_utilization=self._kv_cache_utilization,
        )

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, *, warmup: bool = True, progress: Callable[[str], None] = lambda _: None) -> None:
        """Compile (warm up) every engine, start the stage threads, then report live."""
        if warmup:
            for role, engine, params in self._warmup_roles():
                buckets = f" (prefill buckets {list(engine.prefill_buckets)})" if role != "generate" else ""
                progress(f"warming up the {role} engine{buckets}")
                with self._engine_locks[id(engine)]:
                    engine.warmup(params, prefill=role != "generate", generate=role != "prefill")
        self._grammars.prepare()  # structured outputs' vocabulary, before the first request needs it
        self._decode_state = self._generate_engine.init_decode_state()
        stages = [("prefill", self._prefill_loop), ("generate", self._generate_loop)]
        stages.append(("detokenize", self._detokenize_loop))
        if self.disaggregated:
            stages.append(("transfer", self._transfer_loop))
        for name, loop in stages:
            thread = threading.Thread(target=self._run_stage, args=(name, loop), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._live = True

    def stop(self, timeout_s: float = STOP_JOIN_TIMEOUT_S) -> None:
        self._live = False
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self._finish_all("error", "server stopped")

    @property
    def is_live(self) -> bool:
        threads_ok = self._failure is None and all(t.is_alive() for t in self._threads)
        return self._live and threads_ok and self._healthy()

    @property
    def slots_used(self) -> int:
        return self.slots - self._free_slots.qsize()

    @property
    def context_length(self) -> int:
        """Prompt plus generated tokens one request can hold (the cache's last row is never read)."""
        return self.max_target_length - 1

    @property
    def max_tokens_limit(self) -> int:
        """The largest max_tokens any request could reach (the context minus one prompt token)."""
        return self.context_length - 1

    def _warmup_roles(self):
        """(role, engine, params): one engine that does both, or each engine for its own part."""
        if not self.disaggregated:
            yield "interleaved", self._generate_engine, self._generate_params
            return
        yield "prefill", self._prefill_engine, self._prefill_params
        yield "generate", self._generate_engine, self._generate_params

    # -- admission --------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> ResultStream:
        """Validate and queue a request; its results stream into the returned ResultStream.

        Raises RequestError (bad prompt or max_tokens), Overloaded, or NotReady.
        """
        if not self.is_live:
            raise NotReady("server is not live" if self._failure is None else f"engine failed: {self._failure}")
        tokens = self._prompt_tokens(request.prompt)
        max_tokens = self._max_tokens(request, len(tokens))
        matcher = None
        if request.response_format is not None:
            if request.ignore_eos:
                raise RequestError("ignore_eos", "cannot be combined with response_format: the grammar ends the text")
            matcher = self._grammars.matcher(request.response_format)
        bias_ids = [token for token, _ in request.sampling.logit_bias]
        vocab = self.tokenizer.vocab_size
        if any(token >= vocab for token in bias_ids):
            raise RequestError("logit_bias", f"token ids must be below the vocabulary size {vocab}; got {bias_ids}")
        stream = ResultStream(prompt_tokens=len(tokens))
        item = _Request(
            stream=stream,
            tokens=tokens,
            max_tokens=max_tokens,
            request=request,
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            matcher=matcher,
        )
        with self._lock:
            if self._waiting >= self.max_queued_requests:
                raise Overloaded(self._waiting)
            self._waiting += 1
            self._inflight.add(item)
        self._prefill_q.put(item)
        return stream

    def _max_tokens(self, request: GenerateRequest, prompt_tokens: int) -> int:
        room = self.context_length - prompt_tokens
        if request.max_tokens is None:
            return room
        max_tokens = request.max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise RequestError("max_tokens", "must be an integer")
        # 0: the prompt alone is run, for its log probabilities (a scoring request)
        least = 0 if request.sampling.prompt_logprobs else 1
        if not least <= max_tokens <= self.max_tokens_limit:
            raise RequestError("max_tokens", f"must be between {least} and {self.max_tokens_limit}")
        if request.fit_context and max_tokens > room:
            raise RequestError(
                "prompt",
                f"the context is {self.context_length} tokens, but {prompt_tokens + max_tokens} were requested "
                f"({prompt_tokens} in the prompt, {max_tokens} for the completion); shorten the prompt or "
                "lower max_tokens",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        return max_tokens

    def _prompt_tokens(self, prompt: str | tuple[int, ...]) -> list[int]:
        if isinstance(prompt, str):
            tokens = list(self.tokenizer.encode_prompt(prompt))
        else:
            tokens = list(prompt)
            vocab = self.tokenizer.vocab_size
            bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise RequestError("prompt", f"token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if not tokens:
            raise RequestError("prompt", "must not be empty")
        if len(tokens) > self.max_prefill_length:
            raise RequestError(
                "prompt",
                f"is {len(tokens)} tokens; the maximum is {self.max_prefill_length}",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        return tokens

    # -- stages -----------------------------------------------------------------------------------
    def _run_stage(self, name: str, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:  # a stage died: fail loudly, go unhealthy, release clients
            log.exception("orchestrator %s thread failed", name)
            self._failure = exc
            self._live = False
            self._stop.set()
            self._finish_all("error", f"{name} failed: {exc!r}")

    def _get(self, q: queue.Queue, timeout: float = _POLL_S):
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            return None

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _prefill_loop(self) -> None:
        """Prefill what waits: requests with a structured-output matcher one at a time (their
        first token is masked), the others up to the engine's prefill_batch_size per call."""
        engine = self._prefill_engine
        while not self._stop.is_set():
            item = self._get(self._prefill_q)
            if item is None:
                continue
            batch = [item]
            while (
                len(batch) < engine.prefill_batch_size and (more := self._get(self._prefill_q, timeout=0)) is not None
            ):
                batch.append(more)
            live = []
            for item in batch:
                if item.stream.cancelled:
                    self._finish(item, item.stream.cancel_reason)
                else:
                    item.prefill_started = time.perf_counter()
                    live.append(item)
            together = [item for item in live if item.matcher is None]
            if len(together) < 2:  # one prompt: nothing to prefill beside it
                together = []
            if together:
                with self._engine_locks[id(engine)]:
                    results = engine.prefill_batch(
                        params=self._prefill_params,
                        prompts=[(item.tokens, item.request.sampling) for item in together],
                    )
                for item, result in zip(together, results, strict=True):
                    self._prefilled(item, result)
            for item in live:  # the rest one at a time: masked (their first token), or alone
                if item not in together:
                    self._prefill_one(item)

    def _prefill_one(self, item: _Request) -> None:
        engine = self._prefill_engine
        token_mask = None
        if item.matcher is not None:
            token_mask = unconstrained_bitmask(1, self.tokenizer.vocab_size)
            item.matcher.fill(token_mask[0])
        try:
            with self._engine_locks[id(engine)]:
                result = engine.prefill(
                    params=self._prefill_params,
                    tokens=item.tokens,
                    sampling=item.request.sampling,
                    token_mask=token_mask,
                )
        except ValueError as exc:  # this request's input; the engine itself is fine
            result = exc
        self._prefilled(item, result)

    def _prefilled(self, item: _Request, result) -> None:
        """Hand a prefilled request on (its first token to detokenize, its Prefix to decode), or
        finish it with the error its input raised."""
        if isinstance(result, ValueError):
            self._finish(item, "error", str(result))
            return
        prefix, first = result
        item.first = first
        item.stream.cached_tokens = first.cached_tokens
        item.prefill_returned = time.perf_counter()
        if self._prefill_engine.prefix_caching:
            self.metrics.prefix_cache_lookup(prompt_tokens=len(item.tokens), cached_tokens=first.cached_tokens)
        next_q = self._transfer_q if self.disaggregated else self._generate_q
        if self._put(self._detokenize_q, ("first", item, first)):
            self._put(next_q, (item, prefix))

    def _transfer_loop(self) -> None:
        engine = self._generate_engine
        while not self._stop.is_set():
            entry = self._get(self._transfer_q)
            if entry is None:
                continue
            item, prefix = entry
            if item.finished or item.stream.cancelled:
                self._drop(item)
                continue
            started = time.perf_counter()
            with self._engine_locks[id(engine)]:
                prefix = engine.transfer(prefix)
            self.metrics.transferred(time.perf_counter() - started)
            self._put(self._generate_q, (item, prefix))

    def _generate_loop(self) -> None:
        engine = self._generate_engine
        lock = self._engine_locks[id(engine)]
        owners: list[_Request | None] = [None] * self.slots
        constrained_step: tuple[StepTokens, tuple] | None = None  # the last step a matcher awaits
        while not self._stop.is_set():
            for slot, owner in enumerate(owners):  # free the slots of finished requests
                if owner is not None and owner.finished:
                    with lock:  # a freed slot stops costing decode attention
                        self._decode_state = engine.release(self._decode_state, slot)
                    owners[slot] = None
                    self._free_slots.put(slot)
            decoding = [o for o in owners if o is not None and self._needs_step(o)]
            while not self._free_slots.empty():
                # nothing to decode: wait a little for work (briefly if slots await release)
                wait = 0.0 if decoding else (_POLL_S if self.slots_used == 0 else _RELEASE_WAIT_S)
                try:
                    item, prefix = self._generate_q.get(timeout=wait) if wait else self._generate_q.get_nowait()
                except queue.Empty:
                    break
                if item.finished or item.stream.cancelled:
                    self._drop(item)  # finished at its first token, or cancelled while queued
                    continue
                slot = self._free_slots.get_nowait()
                with lock:
                    self._decode_state = engine.insert(prefix, self._decode_state, slot)
                item.inserted_at = time.perf_counter()
                if item.matcher is not None:
                    item.matcher.advance(int(item.first.to_host()[0]))
                owners[slot] = item
                decoding.append(item)
                self._unwait(item)
            if not decoding:
                if self.slots_used == self.slots:
                    time.sleep(_DRAIN_SLEEP_S)
                continue
            if self._prompts_first():
                continue
            if constrained_step is not None:
                self._advance_matchers(*constrained_step)
            token_mask = self._token_mask(decoding, owners)
            with lock:
                self._decode_state, step = engine.generate(
                    params=self._generate_params, decode_state=self._decode_state, token_mask=token_mask
                )
            for owner in decoding:
                owner.steps_dispatched += 1
            constrained_step = None if token_mask is None else (step, tuple(owners))
            self._put(self._detokenize_q, ("step", step, tuple(owners)))

    def _prompts_first(self) -> bool:
        """Wait for the next prefix instead of stepping while requests that could take a free slot
        are still being prefilled (interleaved mode): prefill and decode share the devices, and a
        step run now would hold back those prompts for the few rows already decoding. Decode resumes
        once every free slot is taken or no request waits for one."""
        if self.disaggregated or self._free_slots.empty() or self._waiting == 0:
            return False
        time.sleep(_RELEASE_WAIT_S)  # then the loop inserts whatever prefix has arrived
        return True

    @staticmethod
    def _advance_matchers(step: StepTokens, owners: tuple) -> None:
        """Advance each constrained request of a step with its token (waits for the host copy)."""
        tokens = step.to_host()
        for slot, owner in enumerate(owners):
            if owner is not None and owner.matcher is not None and not owner.finished:
                owner.matcher.advance(int(tokens[slot]))

    def _token_mask(self, decoding: list[_Request], owners: list[_Request | None]) -> np.ndarray | None:
        """The step's packed allowed-token mask [slots, words]; None when no slot is constrained."""
        if not any(item.matcher is not None for item in decoding):
            return None
        mask = unconstrained_bitmask(self.slots, self.tokenizer.vocab_size)
        for slot, owner in enumerate(owners):
            if owner is not None and owner.matcher is not None and owner in decoding:
                owner.matcher.fill(mask[slot])
        return mask

    def _needs_step(self, item: _Request) -> bool:
        """Whether another decode step can produce a token this request will use. Steps past
        max_tokens or the cache end are known to be wasted; a stop token is not known ahead."""
        if item.finished:
            return False
        if item.stream.cancelled:
            return True  # one more step lets the detokenize thread end it
        produced = 1 + item.steps_dispatched  # the first token came from prefill
        return produced < item.max_tokens and len(item.tokens) + produced < self.max_target_length - 1

    def _detokenize_loop(self) -> None:
        while not self._stop.is_set():
            entry = self._get(self._detokenize_q)
            if entry is None:
                continue
            if entry[0] == "first":
                _, item, first = entry
                token = int(first.to_host()[0])
                if item.request.sampling.prompt_logprobs:
                    item.stream.set_prompt_logprobs(self._prompt_logprobs(item, first.prompt_logprobs_to_host()))
                now = time.perf_counter()
                item.first_token_at = now
                self.metrics.first_token(now - item.stream.submitted_at)
                self.metrics.prefilled(
                    queued_s=item.prefill_started - item.stream.submitted_at,
                    prefill_s=now - item.prefill_started,
                    prompt_tokens=len(item.tokens),
                )
                if item.stream.cancelled:
                    self._finish(item, item.stream.cancel_reason)
                elif item.max_tokens == 0:
                    self._finish(item, "length")
                elif not item.finished:
                    self._emit(item, token, first.logprobs_to_host(), 0)
                continue
            _, step, owners = entry
            tokens, logprobs = step.to_host(), step.logprobs_to_host()
            for slot, owner in enumerate(owners):
                if owner is None or owner.finished:
                    continue  # a free slot, or a request that ended while this step ran
                if owner.stream.cancelled:
                    self._finish(owner, owner.stream.cancel_reason)
                else:
                    self._emit(owner, int(tokens[slot]), logprobs, slot)

    # -- per-request bookkeeping (detokenize thread, except where noted) --------------------------
    def _emit(self, item: _Request, token: int, logprobs: TokenLogprobs | None, row: int) -> None:
        """Stream `token`, with its log probabilities from `logprobs` row `row` if the request
        asked for them."""
        with item.lock:
            if not item.finished:
                self._emit_locked(item, token, logprobs, row)

    def _emit_locked(self, item: _Request, token: int, logprobs: TokenLogprobs | None, row: int) -> None:
        if token in self._eos_ids and not item.request.ignore_eos:
            self._finish(item, "stop")
            return
        item.generated += 1
        top_n = item.request.sampling.logprobs
        entry = () if top_n is None else (_token_logprob(logprobs, row, token, top_n),)
        item.stream.push(Delta(item.detokenizer.add(token), (token,), entry))
        cache_full = len(item.tokens) + item.generated >= self.max_target_length - 1
        if item.generated >= item.max_tokens or cache_full:
            self._finish(item, "length")

    @staticmethod
    def _prompt_logprobs(item: _Request, logprobs: TokenLogprobs) -> list[TokenLogprob]:
        """One entry per prompt token: the first has no log probability (nothing precedes it)."""
        top_n = item.request.sampling.logprobs
        rest = [_token_logprob(logprobs, i, token, top_n) for i, token in enumerate(item.tokens[1:])]
        return [TokenLogprob(item.tokens[0], None)] + rest

    def _drop(self, item: _Request) -> None:
        """A request leaves the pipeline before getting a slot."""
        if item.stream.cancelled:
            self._finish(item, item.stream.cancel_reason)
        self._unwait(item)

    def _unwait(self, item: _Request) -> None:
        with self._lock:
            if item.waiting:
                item.waiting = False
                self._waiting -= 1

    def _finish(self, item: _Request, reason: FinishReason, error: str | None = None) -> None:
        """End a request (any thread). Idempotent; frees its queue place, not its slot."""
        with item.lock:
            with self._lock:
                if item.finished:
                    return
                item.finished = True
                self._inflight.discard(item)
            tail = item.detokenizer.flush()
            if tail:
                item.stream.push(Delta(tail, ()))
        self._unwait(item)
        if reason in ("stop", "length"):  # counted before the client can see the end
            now = time.perf_counter()
            submitted = item.stream.submitted_at
            wait = (item.prefill_started - submitted) + max(item.inserted_at - item.prefill_returned, 0.0)
            self.metrics.completed(
                total_s=now - submitted,
                ttft_s=item.first_token_at - submitted,
                output_tokens=item.generated,
                wait_s=wait,
            )
        item.stream.close(
            Finish(
                reason,
                prompt_tokens=len(item.tokens),
                completion_tokens=item.generated,
                error=error,
                cached_tokens=item.stream.cached_tokens,
            )
        )

    def _finish_all(self, reason: FinishReason, error: str) -> None:
        with self._lock:
            pending = list(self._inflight)
        for item in pending:
            self._finish(item, reason, error)

    def _requests_running(self) -> int:
        """Requests in a decode slot and not finished (the ones _kv_cache_utilization counts)."""
        with self._lock:
            return sum(1 for r in self._inflight if r.inserted_at)

    def _kv_cache_utilization(self) -> float:
        with self._lock:
            used = sum(len(r.tokens) + r.generated for r in self._inflight if r.inserted_at)
        return 100.0 * used / (self.slots * self.max_target_length)


def _token_logprob(logprobs: TokenLogprobs, row: int, token: int, top_n: int) -> TokenLogprob:
    top = zip(logprobs.top_ids[row, :top_n].tolist(), logprobs.top_logprobs[row, :top_n].tolist(), strict=False)
    return TokenLogprob(token, float(logprobs.logprob[row]), tuple(top))
