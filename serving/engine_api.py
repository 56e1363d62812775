"""The seam between the orchestrator and the model: JetStream's engine contract.

The orchestrator (queues, slots, threads) sees only this module. An engine owns a device mesh and
holds three opaque pytrees that the orchestrator passes around without looking inside:

  Params       the model weights, placed on the engine's mesh
  Prefix       the output of one prefill: the prompt's KV cache, its true length, the first token
               and the request's sampling parameters, ready to be inserted into a decode slot
  DecodeState  the KV cache of every decode slot plus per-slot lengths, last tokens and sampling
               parameters; updated in place (donated) by `insert` and `generate`

Flow for one request (interleaved mode: one engine does both; disaggregated mode: a prefill engine
and a generate engine on disjoint meshes, with `transfer` moving the Prefix between them):

  tokens = tokenizer.encode_prompt(prompt)   # or tokenizer.encode_chat(messages)
  prefix, first = prefill_engine.prefill(params=p, tokens=tokens, sampling=s)   # first token
  prefix = generate_engine.transfer(prefix)                                     # no-op if same mesh
  state = generate_engine.insert(prefix, state, slot=i)
  loop: state, step = generate_engine.generate(params=g, decode_state=state)    # one token/slot

Every method is safe to call from any one thread at a time per engine; the orchestrator serialises
calls per engine. Results come back as device arrays (`StepTokens`) so the caller decides when to
block on the host copy (JetStream's detokenize thread does that off the decode loop).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

Params = Any
Prefix = Any
DecodeState = Any


# OpenAI's bounds: top log probabilities per token (chat's top_logprobs), presence and frequency
# penalties, and a logit_bias value; the engine keeps at most MAX_LOGIT_BIAS biased ids per request.
MAX_TOP_LOGPROBS = 20
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 300


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, and which log probabilities to return.

    temperature == 0 means greedy (top_k/top_p ignored). Penalties and logit_bias change the
    logits before temperature, top-k, top-p and argmax, as vLLM applies them (bias, then
    repetition, then frequency and presence):
      logit_bias          ((token id, value), ...): value added to that token's logit
      repetition_penalty  vLLM's (1 = off): a token seen in the prompt or the output has a positive
                          logit divided by it, a negative one multiplied by it
      frequency_penalty   OpenAI's: minus penalty x (times the token was generated so far)
      presence_penalty    OpenAI's: minus penalty x (1 if the token was generated so far)
    Log probabilities are of the model's own distribution (log_softmax of the raw logits, before
    bias, penalties and temperature), as vLLM returns them by default:
      logprobs         None: none; n (0..MAX_TOP_LOGPROBS): each generated token's log probability
                       and the n most likely tokens with theirs
      prompt_logprobs  also every prompt token's log probability given the tokens before it
                       (and the top `logprobs` there), as `echo` needs
    """

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self):
        # logit_bias arrives as any iterable of pairs (a JSON list of lists between hosts)
        object.__setattr__(self, "logit_bias", tuple((int(t), float(v)) for t, v in self.logit_bias))
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), PENALTY_RANGE)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        self._check_logit_bias()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs and self.logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (how many top log probabilities per token)")

    def _check_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        ids = [token for token, _ in self.logit_bias]
        if len(set(ids)) != len(ids):
            raise ValueError("logit_bias names a token id twice")
        for token, value in self.logit_bias:
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
            _check_range(f"logit_bias[{token}]", value, LOGIT_BIAS_RANGE)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name} must be in [{bounds[0]}, {bounds[1]}], got {value}")


GREEDY = SamplingParams()


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a token mask (`Engine.prefill`'s `token_mask`): one bit per token."""
    return (vocab_size + 31) // 32


def unconstrained_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    """[rows, words] int32 of all ones: every token allowed (constrained rows are then filled)."""
    return np.full((rows, bitmask_words(vocab_size)), -1, np.int32)


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log probabilities of n tokens, on the host: each token's own [n] and the most likely
    tokens' ids and log probabilities [n, MAX_TOP_LOGPROBS], best first."""

    logprob: np.ndarray  # [n] f32
    top_ids: np.ndarray  # [n, MAX_TOP_LOGPROBS] i32
    top_logprobs: np.ndarray  # [n, MAX_TOP_LOGPROBS] f32


class StepTokens(abc.ABC):
    """Tokens produced by one engine call, still on device.

    `to_host()` blocks until the values are ready and returns int32 numpy arrays:
      prefill:  tokens [1]
      generate: tokens [max_concurrent_decodes] (one per slot; stale for free slots)
    `logprobs_to_host()`: the same tokens' TokenLogprobs, or None when no request of the call
    asked for log probabilities (rows of slots that did not ask are stale).
    `prompt_logprobs_to_host()` (prefill only): for prompt tokens 1..n-1, each one's TokenLogprobs
    given the tokens before it, or None unless the request asked for prompt_logprobs.
    `cached_tokens` (prefill only): how many of the prompt's tokens came from the prefix cache
    instead of being computed.
    """

    cached_tokens: int = 0

    @abc.abstractmethod
    def to_host(self) -> np.ndarray: ...

    def logprobs_to_host(self) -> TokenLogprobs | None:
        return None

    def prompt_logprobs_to_host(self) -> TokenLogprobs | None:
        return None


class ChatTemplateError(ValueError):
    """A chat template could not render the messages, or the model has none; the message says which
    (the HTTP server answers 400 with it)."""


class Tokenizer(Protocol):
    """Text <-> token ids for one model. Implementations live next to the model loaders."""

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end a generation (EOS, end-of-turn tokens such as <|eot_id|> or <|im_end|>, and
        generation_config.json's eos_token_id list)."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_ids(self) -> frozenset[int]:
        """Control tokens (EOS, chat markers): never part of generated text a grammar constrains."""
        ...

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for, by id (a special token: its own name), for grammar engines."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as given: special tokens in it parsed as such, no BOS added, no template."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """What transformers' `tokenizer(text)` gives: BOS (and EOS) as the tokenizer's configuration
        says, special tokens in the text parsed as such; BOS is not added again if the text starts with it."""
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The chat template rendered with add_generation_prompt=True and encoded without adding BOS
        again, as transformers' `apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`.
        Raises ChatTemplateError if the template fails or the model has none."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The model's chat template over [{"role", "content"}], ending with the assistant prompt."""
        ...


class Engine(abc.ABC):
    """One model on one device mesh. See the module docstring for the flow."""

    @property
    @abc.abstractmethod
    def max_concurrent_decodes(self) -> int:
        """Decode slots in the DecodeState (per_device_batch_size x devices of the mesh)."""

    @property
    @abc.abstractmethod
    def max_prefill_length(self) -> int:
        """Longest prompt `prefill` accepts (max_prefill_predict_length)."""

    @property
    @abc.abstractmethod
    def max_target_length(self) -> int:
        """KV cache length per slot: prompt + generated tokens must stay below it."""

    @property
    @abc.abstractmethod
    def prefill_buckets(self) -> tuple[int, ...]:
        """Padded prompt lengths prefill compiles for (powers of two up to max_prefill_length)."""

    @property
    def prefix_caching(self) -> bool:
        """Whether `prefill` reuses cached prompt prefixes (its StepTokens say how many tokens)."""
        return False

    @abc.abstractmethod
    def load_params(self) -> Params:
        """Weights placed on this engine's mesh with their intended shardings."""

    @abc.abstractmethod
    def init_decode_state(self) -> DecodeState:
        """An empty DecodeState: all slots free."""

    @abc.abstractmethod
    def prefill(
        self, *, params: Params, tokens: Sequence[int], sampling: SamplingParams, token_mask: np.ndarray | None = None
    ) -> tuple[Prefix, StepTokens]:
        """Run the prompt (padded to the next bucket); return its Prefix and the first token.

        `token_mask` (structured outputs): int32 [1, ceil(vocab / 32)], bit j of word w allows
        token 32 * w + j; the first token is sampled among the allowed ones only.
        Raises ValueError if len(tokens) is 0 or exceeds max_prefill_length. With `prefix_caching`,
        only the part of the prompt after its longest cached prefix is computed, with the same result.
        """

    @property
    def prefill_batch_size(self) -> int:
        """How many prompts `prefill_batch` runs in one call (1: one at a time)."""
        return 1

    def prefill_batch(
        self, *, params: Params, prompts: Sequence[tuple[Sequence[int], SamplingParams]]
    ) -> list[tuple[Prefix, StepTokens] | ValueError]:
        """`prefill` of each (tokens, sampling), in order, without token masks: each entry is the
        prompt's (Prefix, first token), or the ValueError its input raised. An engine may run
        several prompts in one call (`prefill_batch_size`); this one runs them one by one."""
        results: list[tuple[Prefix, StepTokens] | ValueError] = []
        for tokens, sampling in prompts:
            try:
                results.append(self.prefill(params=params, tokens=tokens, sampling=sampling))
            except ValueError as exc:
                results.append(exc)
        return results

    def transfer(self, prefix: Prefix) -> Prefix:
        """Move a Prefix made by another engine onto this engine's mesh (disaggregated mode);
        returns once the copy has landed, so the caller can time it."""
        return prefix

    @abc.abstractmethod
    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Place the Prefix into decode slot `slot` (donating decode_state)."""

    def release(self, decode_state: DecodeState, slot: int) -> DecodeState:
        """Mark slot `slot` free so it stops costing decode work (donating decode_state)."""
        return decode_state

    @abc.abstractmethod
    def generate(
        self, *, params: Params, decode_state: DecodeState, token_mask: np.ndarray | None = None
    ) -> tuple[DecodeState, StepTokens]:
        """Advance every live slot by one token (donating decode_state). Free slots' tokens are
        stale; an engine may skip the free slots above the highest live one, so callers fill the
        lowest free slot first. `token_mask`: int32 [max_concurrent_decodes, ceil(vocab / 32)], one
        packed row per slot as in `prefill` (all ones: unconstrained); None costs nothing extra."""

    def warmup_prefill(self, params: Params, token_mask: np.ndarray | None = None) -> dict[int, Prefix]:
        """Run (compile) every prefill bucket once, with `token_mask` if given; the prefixes by bucket."""
        prefixes = {}
        for bucket in self.prefill_buckets:
            prefix, first = self.prefill(params=params, tokens=[0] * bucket, sampling=GREEDY, token_mask=token_mask)
            first.to_host()
            prefixes[bucket] = prefix
        return prefixes

    def warmup(self, params: Params, *, prefill: bool = True, generate: bool = True) -> None:
        """Compile what this engine's role runs, so the first request is not slow: every prefill
        bucket (`prefill`), insert, release and generate (`generate`). A disaggregated server
        warms its prefill engine with generate=False and its generate engine with prefill=False;
        this generic version can then not warm insert (it has no prefix), engines that can make
        one override it."""
        prefixes = self.warmup_prefill(params) if prefill else {}
        if not generate:
            return
        state = self.init_decode_state()
        for prefix in prefixes.values():
            state = self.insert(prefix, state, slot=0)
        state, step = self.generate(params=params, decode_state=state)
        step.to_host()
        self.release(state, slot=0)
