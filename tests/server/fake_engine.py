"""A hand-computable engine and tokenizer for orchestrator and front-end tests (no model, no JAX).

Tokenizer: one token per UTF-8 byte (ids 0..255), plus EOS = 256 written "<eos>" in text, so
multi-byte characters span several tokens exactly as with byte-level BPE.

Engine ("echo"): the model repeats its prompt forever. For prompt tokens p[0..n-1] the first
token (from prefill) is p[0] and decode step k gives p[k % n]; with sampling (temperature > 0)
every non-EOS token is shifted by the request's seed, mod 256. So prompt "abc" greedily yields
"abcabca...", and "hi<eos>" yields "hi" then stops. Slots keep their own prompt, so any mix-up
between slots shows in the text. Under a token mask (structured outputs) a token the mask does not
allow becomes the lowest allowed id (`masked_token`).

Log probabilities ("echo" model's distribution, see `echo_logprobs`): token t, wherever it
appears, has log probability -t/256, and the most likely tokens at its position are t, t+1, t+2,
... (mod 257) with log probabilities -t/256, -t/256 - 1, -t/256 - 2, ...
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import numpy as np

from serving.engine_api import MAX_TOP_LOGPROBS, Engine, SamplingParams, StepTokens, TokenLogprobs
from serving.server.orchestrator import Orchestrator

EOS = 256
_EOS_TEXT = "<eos>"


class ByteTokenizer:
    eos_ids = frozenset({EOS})
    special_ids = frozenset({EOS})
    vocab_size = 257

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [_EOS_TEXT.encode()]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(_EOS_TEXT)):
            if i:
                ids.append(EOS)
            ids.extend(part.encode("utf-8"))
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)  # no BOS

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode(self.apply_chat_template(messages))

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for token in ids:
            out.extend(_EOS_TEXT.encode() if token == EOS else bytes([token]))
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"[{m['role']}]{m['content']}\n" for m in messages) + "[assistant]"


def echo_tokens(prompt: Sequence[int], count: int, seed_shift: int = 0) -> list[int]:
    """What the fake model generates: the expected values for tests."""
    out = [prompt[k % len(prompt)] for k in range(count)]
    return [t if t == EOS else (t + seed_shift) % 256 for t in out]


def allowed_ids(mask_row: np.ndarray) -> np.ndarray:
    """The token ids a packed mask row (int32 words, bit j of word w = id 32 w + j) allows."""
    return np.nonzero(np.unpackbits(mask_row.view(np.uint8), bitorder="little"))[0]


def masked_token(token: int, mask_row: np.ndarray | None) -> int:
    """The echo token if the mask allows it (or there is no mask), else the lowest allowed id."""
    if mask_row is None:
        return token
    allowed = allowed_ids(mask_row)
    return token if token in allowed else int(allowed[0])


def echo_logprobs(tokens: Sequence[int]) -> TokenLogprobs:
    """The echo model's log probabilities of `tokens` (see the module docstring)."""
    own = -np.asarray(tokens, np.float32) / 256
    ranks = np.arange(MAX_TOP_LOGPROBS)
    top_ids = (np.asarray(tokens, np.int32)[:, None] + ranks) % (EOS + 1)
    return TokenLogprobs(own, top_ids.astype(np.int32), own[:, None] - ranks.astype(np.float32))


class HostTokens(StepTokens):
    def __init__(
        self,
        values: np.ndarray,
        delay_s: float = 0.0,
        logprobs: TokenLogprobs | None = None,
        prompt_logprobs: TokenLogprobs | None = None,
    ):
        self._values = values
        self._delay_s = delay_s
        self._logprobs = logprobs
        self._prompt_logprobs = prompt_logprobs

    def to_host(self) -> np.ndarray:
        if self._delay_s:
            time.sleep(self._delay_s)
        return self._values.copy()

    def logprobs_to_host(self) -> TokenLogprobs | None:
        return self._logprobs

    def prompt_logprobs_to_host(self) -> TokenLogprobs | None:
        return self._prompt_logprobs


@dataclasses.dataclass
class EchoPrefix:
    tokens: np.ndarray  # [n] the prompt
    shift: int
    mesh: str
    logprobs: bool = False  # the request wants log probabilities


class EchoEngine(Engine):
    """See the module docstring. Records its calls; raises if two threads call it at once."""

    def __init__(
        self,
        *,
        slots: int = 4,
        max_prefill_length: int = 16,
        max_target_length: int = 32,
        step_delay_s: float = 0.0,
        mesh: str = "mesh0",
    ):
        self._slots = slots
        self._max_prefill = max_prefill_length
        self._max_target = max_target_length
        self.step_delay_s = step_delay_s
        self.mesh = mesh
        self.calls: list[tuple] = []
        self.masks: list[np.ndarray | None] = []  # the token_mask of each prefill and generate call
        self.warmed: tuple[bool, bool] | None = None  # (prefill, generate) of the last warm-up
        self._busy = threading.Lock()

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def max_target_length(self) -> int:
        return self._max_target

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        buckets, size = [], 1
        while size < self._max_prefill:
            buckets.append(size)
            size *= 2
        return tuple(buckets + [self._max_prefill])

    def _enter(self, call: tuple) -> None:
        if not self._busy.acquire(blocking=False):
            raise AssertionError(f"concurrent engine call {call}")
        self.calls.append(call)

    def load_params(self):
        return {"mesh": self.mesh}

    def init_decode_state(self):
        return {
            "prompt": np.zeros((self._slots, self._max_target), np.int32),
            "prompt_len": np.ones((self._slots,), np.int32),
            "step": np.zeros((self._slots,), np.int32),
            "shift": np.zeros((self._slots,), np.int32),
            "logprobs": np.zeros((self._slots,), np.bool_),
        }

    def prefill(self, *, params, tokens: Sequence[int], sampling: SamplingParams, token_mask=None):
        self._enter(("prefill", len(tokens)))
        try:
            assert params == {"mesh": self.mesh}, "prefill got another engine's params"
            if not 0 < len(tokens) <= self._max_prefill:
                raise ValueError(f"prompt length {len(tokens)} not in [1, {self._max_prefill}]")
            shift = 0 if sampling.greedy else sampling.seed
            wants = sampling.logprobs is not None
            prefix = EchoPrefix(np.asarray(tokens, np.int32), shift, self.mesh, wants)
            first = [masked_token(echo_tokens(tokens, 1, shift)[0], None if token_mask is None else token_mask[0])]
            self.masks.append(token_mask)
            prompt = echo_logprobs(tokens[1:]) if sampling.prompt_logprobs else None
            logprobs = echo_logprobs(first) if wants else None
            return prefix, HostTokens(np.asarray(first, np.int32), logprobs=logprobs, prompt_logprobs=prompt)
        finally:
            self._busy.release()

    def transfer(self, prefix: EchoPrefix) -> EchoPrefix:
        self._enter(("transfer", prefix.mesh))
        try:
            return dataclasses.replace(prefix, mesh=self.mesh)
        finally:
            self._busy.release()

    def insert(self, prefix: EchoPrefix, decode_state, slot: int):
        self._enter(("insert", slot))
        try:
            assert prefix.mesh == self.mesh, "prefix was not transferred to this engine's mesh"
            n = len(prefix.tokens)
            decode_state["prompt"][slot, :n] = prefix.tokens
            decode_state["prompt_len"][slot] = n
            decode_state["step"][slot] = 1  # the first token came from prefill
            decode_state["shift"][slot] = prefix.shift
            decode_state["logprobs"][slot] = prefix.logprobs
            return decode_state
        finally:
            self._busy.release()

    def release(self, decode_state, slot: int):
        """Optional engine method (JaxEngine has it): a freed slot stops decoding."""
        self._enter(("release", slot))
        try:
            decode_state["prompt_len"][slot] = 1
            decode_state["prompt"][slot, 0] = 0
            decode_state["logprobs"][slot] = False
            return decode_state
        finally:
            self._busy.release()

    def generate(self, *, params, decode_state, token_mask=None):
        self._enter(("generate",))
        try:
            assert params == {"mesh": self.mesh}, "generate got another engine's params"
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            s = decode_state
            idx = s["step"] % s["prompt_len"]
            tokens = s["prompt"][np.arange(self._slots), idx]
            tokens = np.where(tokens == EOS, EOS, (tokens + s["shift"]) % 256).astype(np.int32)
            if token_mask is not None:
                tokens = np.array([masked_token(t, row) for t, row in zip(tokens, token_mask, strict=False)], np.int32)
            self.masks.append(token_mask)
            s["step"] = s["step"] + 1
            return s, HostTokens(tokens, logprobs=echo_logprobs(tokens) if s["logprobs"].any() else None)
        finally:
            self._busy.release()

    def warmup(self, params, *, prefill=True, generate=True) -> None:
        super().warmup(params, prefill=prefill, generate=generate)
        self.warmed = (prefill, generate)


def echo_orchestrator(
    engine: Engine | None = None, prefill_engine: Engine | None = None, start: bool = True, **kw
) -> Orchestrator:
    """An orchestrator over echo engines (interleaved unless a separate prefill engine is given)."""
    generate_engine = engine or EchoEngine()
    prefill_engine = prefill_engine or generate_engine
    orch = Orchestrator(
        tokenizer=ByteTokenizer(),
        prefill_engine=prefill_engine,
        generate_engine=generate_engine,
        prefill_params=prefill_engine.load_params(),
        generate_params=generate_engine.load_params(),
        **kw,
    )
    if start:
        orch.start(warmup=False)
    return orch
