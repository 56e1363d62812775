"""`JaxEngine`: the JetStream engine contract (engine_api.Engine) over `model` on one device mesh.

Three jitted steps, each compiled once per shape (prefill once per bucket):

  prefill   tokens [1, T] (padded to a power-of-two bucket) -> Prefix (KV [L, 1, K, T, E], length,
            first token, sampling, which tokens the prompt holds) and the first token with its log
            probabilities, replicated for the host; a second variant per bucket, compiled on first
            use, also returns the log probabilities of every prompt token (`prompt_logprobs`)
prefill and generate each have a variant taking a packed allowed-token mask (structured outputs,
`constraints.apply_token_bitmask` after the penalties, before sampling); a step without one neither
uploads nor applies a mask.

  insert    Prefix -> slot `slot` of the DecodeState (slot is a traced scalar: no recompiles)
  generate  one token for each of the first `rows` slots, once per decode bucket `rows` (powers
            of two up to the slot count); per-slot sampling arrays; tokens [B] replicated; a
            second variant per bucket also returns log probabilities, run only while a live slot
            asked for them (their top-k over the vocabulary costs a sort per row)

insert and generate donate the DecodeState's arrays, so the KV cache [L, B, K, S, E] is updated in
place. The DecodeState also knows, on the host, which slots are live (insert adds, release
removes), and generate runs the smallest bucket that covers the highest live slot: one live
request costs a one-row step, not a step over every slot (the orchestrator hands out the lowest
free slot, so live slots stay packed low). Buckets apply where the slots are not split over
devices; a mesh that splits them always runs every slot. Decode attention walks the cache in
`kv_block` blocks up to the longest *active* slot (see `model.decode_attention`); free slots sit
at position 0 and neither grow nor lengthen the loop. A slot that keeps running past the cache end
is clamped to the last position, so generate is always safe to call.

`build_engines(settings)` (`EngineSettings`) loads the checkpoint once and returns the engines: one engine on all
devices (interleaved), or a prefill engine and a generate engine on the two halves of the devices
(disaggregated), where `generate_engine.transfer(prefix)` moves a Prefix onto the generate mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from serving import engine_api
from serving.engine import cpu_matmul, model, sharding
from serving.engine.config import ModelConfig
from serving.engine.constraints import apply_token_bitmask
from serving.engine.loaders import load_checkpoint
from serving.engine.model import ArrayInfo, KVCache
from serving.engine.prefix_cache import DEFAULT_BLOCK_SIZE, CachedPrefix, PrefixBlockIndex
from serving.engine.sampling import (
    Logprobs,
    Sampling,
    TokenCounts,
    adjust_logits,
    count_tokens,
    prompt_presence,
    sample,
    token_logprobs,
)
from serving.engine.settings import EngineSettings
from serving.engine_api import SamplingParams

log = logging.getLogger(__name__)

MIN_BUCKET = 16

# On the CPU kernels (cfg.cpu_kernels), up to this many prompts of one bucket, up to
# PREFILL_BATCH_MAX_BUCKET, prefill in one call: the kernels skip each prompt's padding rows and
# the unused rows, so prompts prefilled together read the weights once for all of them. Longer
# prompts prefill alone: a batch's unused rows still run attention over the bucket.
PREFILL_BATCH = 8
PREFILL_BATCH_MAX_BUCKET = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixArrays:
    """One prefilled prompt on device: cache [L, 1, K, T, E], length [], first token [], sampling
    (scalars), in_prompt [V] (which tokens the prompt holds, for the repetition penalty)."""

    cache: KVCache
    length: jax.Array
    token: jax.Array
    sampling: Sampling
    in_prompt: jax.Array


@dataclasses.dataclass(frozen=True)
class Prefix:
    """engine_api.Prefix: the prompt's device arrays, and on the host whether its request wants log
    probabilities (so generate knows which variant a step needs)."""

    arrays: PrefixArrays
    logprobs: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotArrays:
    """All slots on device: cache [L, B, K, S, E]; lengths (tokens in cache), tokens (last),
    active, sampling [B]; seen [B, V] (tokens generated and in the prompt, for penalties)."""

    cache: KVCache
    lengths: jax.Array
    tokens: jax.Array
    active: jax.Array
    sampling: Sampling
    seen: TokenCounts


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """engine_api.DecodeState: the slots' device arrays, and on the host which slots are live and
    which of them want log probabilities."""

    arrays: SlotArrays
    live: frozenset[int] = frozenset()
    logprob_slots: frozenset[int] = frozenset()

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.live & self.logprob_slots)

    def rows(self, buckets: Sequence[int]) -> int:
        """The smallest decode bucket that covers every live slot."""
        needed = max(self.live, default=-1) + 1
        return next(b for b in buckets if b >= needed)


def sampling_infos(batch: tuple[int, ...], axes: tuple[str | None, ...]) -> Sampling:
    """Sampling arrays of shape `batch` ([] for one request, [B] for the slots); the logit bias
    adds a trailing [MAX_LOGIT_BIAS]."""

    def info(dtype, init="zeros", extra=()):
        return ArrayInfo(batch + extra, dtype, axes + (None,) * len(extra), init=init)

    bias = (engine_api.MAX_LOGIT_BIAS,)
    return Sampling(
        temperature=info(jnp.float32),
        top_k=info(jnp.int32),
        top_p=info(jnp.float32, "ones"),
        seed=info(jnp.uint32),
        presence_penalty=info(jnp.float32),
        frequency_penalty=info(jnp.float32),
        repetition_penalty=info(jnp.float32, "ones"),
        bias_ids=info(jnp.int32, extra=bias),
        bias_values=info(jnp.float32, extra=bias),
    )


def slot_array_infos(cfg: ModelConfig, batch: int, cache_length: int) -> SlotArrays:
    def info(dtype):
        return ArrayInfo((batch,), dtype, ("batch",), init="zeros")

    seen = ArrayInfo((batch, cfg.vocab_size), jnp.int32, ("batch", None), init="zeros")
    return SlotArrays(
        cache=model.cache_infos(cfg, batch, cache_length),
        lengths=info(jnp.int32),
        tokens=info(jnp.int32),
        active=info(jnp.bool_),
        sampling=sampling_infos((batch,), ("batch",)),
        seen=TokenCounts(output=seen, prompt=dataclasses.replace(seen, dtype=jnp.bool_)),
    )


def prefix_cache_index(tokens: int) -> PrefixBlockIndex | None:
    """The prefix cache's index for a pool of `tokens` token positions (0: no prefix cache)."""
    if tokens <= 0:
        return None
    return PrefixBlockIndex(-(-tokens // DEFAULT_BLOCK_SIZE))


def _powers_of_two_up_to(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from `smallest` below `largest`, then `largest` itself."""
    buckets, b = [], smallest
    while b < largest:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (largest,)


def prefill_buckets(max_prefill_length: int) -> tuple[int, ...]:
    """Prompt lengths prefill compiles for: powers of two from MIN_BUCKET, and max_prefill_length."""
    return _powers_of_two_up_to(MIN_BUCKET, max_prefill_length)


def decode_buckets(slots: int) -> tuple[int, ...]:
    """Row counts generate compiles for: powers of two below `slots`, and `slots`."""
    return _powers_of_two_up_to(1, slots)


def _initial_value(info: ArrayInfo) -> jax.Array:
    """An array filled as its declaration's `init` says (zeros, or ones for scales and top_p)."""
    fill = {"zeros": 0, "ones": 1}[info.init]
    return jnp.full(info.shape, fill, dtype=info.dtype)


def _filler(infos, shardings):
    """A jitted function that makes the declared arrays on the devices, each shard where it lives
    (no host copy of the whole), filled as `_initial_value` says."""
    return jax.jit(lambda: jax.tree.map(_initial_value, infos, is_leaf=model.is_info), out_shardings=shardings)


def _pad_rows(a: jax.Array, batch: int) -> jax.Array:
    """[rows, ...] -> [batch, ...], zeros below: a step's per-row results laid out like its tokens."""
    return jnp.zeros((batch,) + a.shape[1:], a.dtype).at[: a.shape[0]].set(a)


def _nbytes(infos, per_device: bool = False, shardings=None) -> int:
    leaves = jax.tree.leaves(infos, is_leaf=model.is_info)
    if not per_device:
        return sum(math.prod(i.shape) * np.dtype(i.dtype).itemsize for i in leaves)
    shards = jax.tree.leaves(shardings)
    return sum(
        math.prod(s.shard_shape(i.shape)) * np.dtype(i.dtype).itemsize for i, s in zip(leaves, shards, strict=False)
    )


@dataclasses.dataclass(frozen=True)
class DeviceTokens(engine_api.StepTokens):
    """engine_api.StepTokens over replicated device arrays: tokens, and the log probabilities when
    the step computed them (`prompt` [T - 1] of a padded prompt, of which `prompt_tokens` - 1 are real)."""

    array: jax.Array
    logprobs: Logprobs | None = None
    prompt: Logprobs | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def to_host(self) -> np.ndarray:
        return sharding.to_host(self.array)

    def logprobs_to_host(self) -> engine_api.TokenLogprobs | None:
        return _host_logprobs(self.logprobs)

    def prompt_logprobs_to_host(self) -> engine_api.TokenLogprobs | None:
        return _host_logprobs(self.prompt, self.prompt_tokens - 1)


def _host_logprobs(logprobs: Logprobs | None, n: int | None = None) -> engine_api.TokenLogprobs | None:
    if logprobs is None:
        return None
    host = [sharding.to_host(a)[:n] for a in (logprobs.logprob, logprobs.top_ids, logprobs.top_logprobs)]
    return engine_api.TokenLogprobs(*host)


def use_cpu_kernels(settings: EngineSettings, devices: Sequence[jax.Device]) -> bool:
    """Whether an engine on `devices` runs its int8/bfloat16 products on cpu_matmul's kernels:
    `cpu_kernels` is set, the engine has one CPU device (a custom call has no sharding rule: on a
    mesh XLA would gather its operands whole), and the kernels run on this machine. Says why not
    when it was asked to and they cannot."""
    if not settings.cpu_kernels or len(devices) != 1 or devices[0].platform != "cpu":
        return False
    if (reason := cpu_matmul.unavailable()) is not None:
        log.warning("cpu_kernels: XLA's own dots instead of the AVX-512 kernels: %s", reason)
        return False
    return True


class JaxEngine(engine_api.Engine):
    def __init__(self, settings: EngineSettings, cfg: ModelConfig, host_params: dict, devices: Sequence[jax.Device]):
        cfg = dataclasses.replace(cfg, cpu_kernels=use_cpu_kernels(settings, devices))
        self.cfg = cfg
        self.mesh = sharding.make_mesh(settings, devices)
        self.rules = sharding.ShardingRules.for_model(cfg, self.mesh)
        self._host_params = host_params
        self._max_prefill = settings.max_prefill_predict_length
        self._max_target = settings.max_target_length
        self._batch = settings.slots_per_device(len(devices)) * len(devices)
        self.cache_length = -(-settings.max_target_length // cfg.kv_block) * cfg.kv_block
        self.param_infos = model.param_infos(cfg)
        self.state_infos = slot_array_infos(cfg, self._batch, self.cache_length)
        self.param_shardings = sharding.shardings(self.mesh, self.rules, self.param_infos)
        self.state_shardings = sharding.shardings(self.mesh, self.rules, self.state_infos)
        self._replicated = sharding.replicated(self.mesh)
        slots_split = max(sharding.axis_size(self.mesh, getattr(self.rules, a)) for a in ("batch", "cache_batch"))
        # slots on one device: generate runs only the live rows (a loop over slots split across
        # devices would gather them). On a CPU each slot also attends on its own (decode_attention's
        # per_slot): faster there at 32 slots, and a token never depends on the rows beside it;
        # accelerators keep the batched attention their kernels are built for.
        self.slots_on_one_device = slots_split == 1
        self.per_slot_attention = self.slots_on_one_device and devices[0].platform == "cpu"
        self.decode_buckets = decode_buckets(self._batch) if self.slots_on_one_device else (self._batch,)
        self.prefix_index = prefix_cache_index(settings.prefix_cache_tokens)
        pool_tokens = self.prefix_index.capacity_tokens if self.prefix_caching else 0
        self.prefix_pool_infos = model.cache_infos(cfg, 1, pool_tokens, batch_axis="prefill_batch")
        self.prefix_pool_shardings = sharding.shardings(self.mesh, self.rules, self.prefix_pool_infos)
        self._prefix_pool = None  # allocated on the first prefill that uses it
        self._compile()

    # ---- placement --------------------------------------------------------------------------

    def prefix_shardings(self, bucket: int) -> PrefixArrays:
        cache = model.cache_infos(self.cfg, 1, bucket, batch_axis="prefill_batch")
        replicated = jax.tree.map(lambda _: self._replicated, self.prefix_infos(bucket), is_leaf=model.is_info)
        return dataclasses.replace(replicated, cache=sharding.shardings(self.mesh, self.rules, cache))

    def prefix_infos(self, bucket: int) -> PrefixArrays:
        scalar = lambda dtype: ArrayInfo((), dtype, (), init="zeros")  # noqa: E731
        return PrefixArrays(
            cache=model.cache_infos(self.cfg, 1, bucket, batch_axis="prefill_batch"),
            length=scalar(jnp.int32),
            token=scalar(jnp.int32),
            sampling=sampling_infos((), ()),
            in_prompt=ArrayInfo((self.cfg.vocab_size,), jnp.bool_, (None,), init="zeros"),
        )

    def _abstract(self, infos, shardings):
        """ShapeDtypeStructs carrying their shardings, for lowering without device arrays."""
        return jax.tree.map(
            lambda i, sh: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=sh), infos, shardings, is_leaf=model.is_info
        )

    def lower(self, bucket: int | None = None) -> dict[str, jax.stages.Lowered]:
        """The jitted steps lowered on abstract inputs (prefill at `bucket`, default the smallest).

        `.compile().as_text()` of each shows the partitioned HLO (collectives) without placing
        any array on device.
        """
        bucket = self.prefill_buckets[0] if bucket is None else bucket
        params = self._abstract(self.param_infos, self.param_shardings)
        state = self._abstract(self.state_infos, self.state_shardings)
        prefix = self._abstract(self.prefix_infos(bucket), self.prefix_shardings(bucket))
        rep = lambda info: self._abstract(info, self._replicated)  # noqa: E731
        return {
            "prefill": self._prefill_fns[bucket, False, False].lower(
                params, rep(ArrayInfo((1, bucket), jnp.int32, (None, None))), prefix.length, prefix.sampling
            ),
            "insert": self._insert_fn.lower(prefix, state, prefix.length),
            "generate": self._generate_fns[self._batch, False, False].lower(params, state),
        }

    def _put_replicated(self, host_tree):
        return sharding.put(host_tree, jax.tree.map(lambda _: self._replicated, host_tree))

    # ---- jitted steps -----------------------------------------------------------------------

    def _compile(self) -> None:
        cfg, rep, per_slot = self.cfg, self._replicated, self.per_slot_attention
        prefill_shard = sharding.activation_sharder(self.mesh, self.rules, "prefill_batch")
        decode_shard = sharding.activation_sharder(self.mesh, self.rules, "batch")
        samp_rep = jax.tree.map(lambda _: rep, sampling_infos((), ()), is_leaf=model.is_info)

        def first_token(params, last, prompt, length, samp: Sampling, token_mask):
            """The first token [1] with its Logprobs [1], sampled from `last` [1, D], the hidden state
            of the prompt's last token; prompt [T] holds the whole padded prompt (for penalties)."""
            logits = model.logits(cfg, params, last, prefill_shard)  # [1, V]
            in_prompt = prompt_presence(prompt, length, cfg.vocab_size)
            batched = jax.tree.map(lambda a: a[None], samp)
            nothing_generated = TokenCounts(jnp.zeros_like(logits, jnp.int32), in_prompt[None])
            adjusted = adjust_logits(logits, batched, nothing_generated, jnp.ones((1,), jnp.bool_))
            if token_mask is not None:
                adjusted = apply_token_bitmask(adjusted, token_mask)
            token = sample(adjusted, batched, length[None])  # [1]
            return token, token_logprobs(logits, token), in_prompt

        def prefill_fn(params, tokens, length, samp: Sampling, token_mask=None, *, with_prompt_logprobs: bool):
            """The Prefix, the first token [1] with its Logprobs [1], and (with_prompt_logprobs)
            the Logprobs [T - 1] of prompt tokens 1.. given those before them."""
            x, cache = model.prefill_hidden(cfg, params, tokens, length, prefill_shard)
            last = jax.lax.dynamic_index_in_dim(x, length - 1, axis=1, keepdims=False)  # [1, D]
            token, logprobs, in_prompt = first_token(params, last, tokens[0], length, samp, token_mask)
            prompt = None
            if with_prompt_logprobs:
                every = model.logits(cfg, params, x[0, :-1], prefill_shard)  # [T - 1, V]
                prompt = token_logprobs(every, tokens[0, 1:])
            return PrefixArrays(cache, length, token[0], samp, in_prompt), (token, logprobs, prompt)

        def prefill_batch_fn(params, tokens, lengths, samp: Sampling):
            """prefill_fn for prompts [P, T] with lengths [P] (0: an unused row, which the CPU
            kernels skip): PrefixArrays with a batch of P, and the first tokens [P] with their
            Logprobs [P]."""
            x, cache = model.prefill_hidden(cfg, params, tokens, lengths, prefill_shard)
            last = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]  # [P, D]
            used = (lengths > 0).astype(jnp.int32)  # one row per prompt
            logits = model.logits(cfg, params, last, prefill_shard, rows=used)  # [P, V]
            in_prompt = jax.vmap(prompt_presence, in_axes=(0, 0, None))(tokens, lengths, cfg.vocab_size)
            nothing_generated = TokenCounts(jnp.zeros_like(logits, jnp.int32), in_prompt)
            adjusted = adjust_logits(logits, samp, nothing_generated, jnp.ones_like(lengths, jnp.bool_))
            token = sample(adjusted, samp, lengths)
            return PrefixArrays(cache, lengths, token, samp, in_prompt), (token, token_logprobs(logits, token))

        def take_fn(arrays: PrefixArrays, token, logprobs: Logprobs, row):
            """Prompt `row` of prefill_batch_fn's results: its PrefixArrays and first token [1] with
            its Logprobs [1], as prefill_fn returns them."""
            one = lambda a, axis=0: jax.lax.dynamic_index_in_dim(a, row, axis, keepdims=False)  # noqa: E731
            cache = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1, axis=1), arrays.cache)
            first = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1), (token, logprobs))
            prefix = PrefixArrays(
                cache, one(arrays.length), one(arrays.token), jax.tree.map(one, arrays.sampling), one(arrays.in_prompt)
            )
            return prefix, first

        def prefill_after_fn(
            params, pool: KVCache, context_positions, start, tokens, prompt, length, samp, token_mask=None
        ):
            """prefill_fn for a prompt whose first `start` tokens the prefix cache holds, at pool
            positions context_positions [S] (S the whole prompt's bucket; entries past `start` are
            overwritten or unused): only tokens [1, T], the prompt's positions start.., run.
            prompt [1, S] is the whole padded prompt. Never with the prompt's log probabilities."""
            context = jax.tree.map(lambda a: jnp.take(a, context_positions, axis=3), pool)
            x, cache = model.prefill_hidden(cfg, params, tokens, length, prefill_shard, context, start)
            last = jax.lax.dynamic_index_in_dim(x, length - 1 - start, axis=1, keepdims=False)  # [1, D]
            token, logprobs, in_prompt = first_token(params, last, prompt[0], length, samp, token_mask)
            return PrefixArrays(cache, length, token[0], samp, in_prompt), (token, logprobs, None)

        def store_fn(pool: KVCache, cache: KVCache, source_positions, pool_positions):
            """pool with the prefix's cache positions source_positions [S] written at pool_positions
            [S] (those past the pool, padding, are dropped)."""
            return jax.tree.map(
                lambda dst, src: dst.at[:, :, :, pool_positions].set(
                    jnp.take(src, source_positions, axis=3), mode="drop"
                ),
                pool,
                cache,
            )

        def insert_fn(prefix: PrefixArrays, state: SlotArrays, slot):
            start = (0, slot, 0, 0, 0)
            cache = jax.tree.map(
                lambda dst, src: jax.lax.dynamic_update_slice(dst, src, start[: dst.ndim]), state.cache, prefix.cache
            )
            put = lambda arr, value: arr.at[slot].set(value)  # noqa: E731
            first = jax.nn.one_hot(prefix.token, cfg.vocab_size, dtype=jnp.int32)  # generated tokens so far
            return SlotArrays(
                cache=cache,
                lengths=put(state.lengths, prefix.length),
                tokens=put(state.tokens, prefix.token),
                active=put(state.active, True),
                sampling=jax.tree.map(put, state.sampling, prefix.sampling),
                seen=TokenCounts(put(state.seen.output, first), put(state.seen.prompt, prefix.in_prompt)),
            )

        def release_fn(state: SlotArrays, slot):
            return dataclasses.replace(
                state, lengths=state.lengths.at[slot].set(0), active=state.active.at[slot].set(False)
            )

        def generate_fn(params, state: SlotArrays, token_mask=None, *, rows: int, with_logprobs: bool):
            """One token for each of the first `rows` slots: tokens [B] (stale beyond `rows`) and,
            with_logprobs, their Logprobs [B] (of the model's logits, before any adjustment)."""
            lengths, active = state.lengths[:rows], state.active[:rows]
            positions = jnp.where(active, jnp.minimum(lengths, self.cache_length - 1), 0)
            logits, cache = model.decode_step(
                cfg, params, state.cache, state.tokens[:rows], positions, decode_shard, per_slot_attention=per_slot
            )
            sampling = jax.tree.map(lambda a: a[:rows], state.sampling)
            # freed rows sample greedily: a finished request's temperature would send every row
            # through the stochastic path (a sort over the vocabulary per row)
            sampling = dataclasses.replace(sampling, temperature=jnp.where(active, sampling.temperature, 0.0))
            adjusted = adjust_logits(logits, sampling, state.seen, active)
            if token_mask is not None:
                adjusted = apply_token_bitmask(adjusted, token_mask[:rows])
            new = sample(adjusted, sampling, positions + 1)
            seen = dataclasses.replace(state.seen, output=count_tokens(state.seen.output, new, active))
            lengths = jnp.where(active, jnp.minimum(lengths + 1, self.cache_length), 0)
            tokens = state.tokens.at[:rows].set(new)
            new_state = dataclasses.replace(
                state, cache=cache, lengths=state.lengths.at[:rows].set(lengths), tokens=tokens, seen=seen
            )
            logprobs = None
            if with_logprobs:
                logprobs = jax.tree.map(functools.partial(_pad_rows, batch=self._batch), token_logprobs(logits, new))
            return new_state, (tokens, logprobs)

        # Keyed (bucket, prompt log probabilities, masked); jit compiles each on its first call.
        self._prefill_fns = {
            (bucket, with_prompt, masked): jax.jit(
                functools.partial(prefill_fn, with_prompt_logprobs=with_prompt),
                in_shardings=(self.param_shardings, rep, rep, samp_rep, *((rep,) if masked else ())),
                out_shardings=(self.prefix_shardings(bucket), rep),
            )
            for bucket in self.prefill_buckets
            for with_prompt in (False, True)
            for masked in (False, True)
        }
        batch_buckets = [b for b in self.prefill_buckets if b <= PREFILL_BATCH_MAX_BUCKET]
        self._prefill_batch_fns = {bucket: jax.jit(prefill_batch_fn) for bucket in batch_buckets}
        self._take_fns = {
            bucket: jax.jit(take_fn, out_shardings=(self.prefix_shardings(bucket), rep)) for bucket in batch_buckets
        }
        pool = self.prefix_pool_shardings
        # Keyed (prompt bucket, bucket of the tokens after the cached prefix, masked); compiled on first use.
        self._prefill_after_fns = {
            (bucket, tail, masked): jax.jit(
                prefill_after_fn,
                in_shardings=(
                    self.param_shardings,
                    pool,
                    rep,
                    rep,
                    rep,
                    rep,
                    rep,
                    samp_rep,
                    *((rep,) if masked else ()),
                ),
                out_shardings=(self.prefix_shardings(bucket), rep),
            )
            for bucket in self.prefill_buckets
            for tail in self.prefill_buckets
            if tail <= bucket
            for masked in (False, True)
        }
        self._store_fn = jax.jit(store_fn, out_shardings=pool, donate_argnums=(0,))
        self._insert_fn = jax.jit(insert_fn, out_shardings=self.state_shardings, donate_argnums=(1,))
        self._init_fn = _filler(self.state_infos, self.state_shardings)
        self._release_fn = jax.jit(release_fn, out_shardings=self.state_shardings, donate_argnums=(0,))
        # Keyed (rows, log probabilities, masked); jit compiles each on its first call.
        self._generate_fns = {
            (rows, with_logprobs, masked): jax.jit(
                functools.partial(generate_fn, rows=rows, with_logprobs=with_logprobs),
                in_shardings=(self.param_shardings, self.state_shardings, *((rep,) if masked else ())),
                out_shardings=(self.state_shardings, rep),
                donate_argnums=(1,),
            )
            for rows in self.decode_buckets
            for with_logprobs in (False, True)
            for masked in (False, True)
        }

    # ---- engine_api.Engine --------------------------------------------------------------------

    @property
    def max_concurrent_decodes(self) -> int:
        return self._batch

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def max_target_length(self) -> int:
        return self._max_target

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        return prefill_buckets(self._max_prefill)

    @property
    def prefix_caching(self) -> bool:
        return self.prefix_index is not None

    def load_params(self):
        return sharding.put(self._host_params, self.param_shardings)

    def init_decode_state(self) -> DecodeState:
        """Filled on the devices, shard by shard: a host copy of the whole cache would need its
        global size in every process (2.8 GiB for SmolLM2's default float32 cache)."""
        return DecodeState(self._init_fn())

    def bucket_for(self, n_tokens: int) -> int:
        if n_tokens <= 0:
            raise ValueError("prefill needs at least one token")
        if n_tokens > self._max_prefill:
            raise ValueError(f"prompt has {n_tokens} tokens; the maximum is {self._max_prefill}")
        return next(b for b in self.prefill_buckets if b >= n_tokens)

    def _checked_bucket(self, tokens: Sequence[int], sampling: SamplingParams) -> int:
        """The prompt's bucket; ValueError for a prompt or logit_bias this engine cannot take."""
        bucket = self.bucket_for(len(tokens))
        vocab = self.cfg.vocab_size
        if any(token >= vocab for token, _ in sampling.logit_bias):
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {vocab}")
        return bucket

    def prefill(self, *, params, tokens: Sequence[int], sampling: SamplingParams, token_mask=None):
        """Prefill the prompt; with the prefix cache on, only the part after its longest cached
        prefix runs (not when the request wants the prompt's log probabilities: those need every
        position), and the prompt's full blocks are cached afterwards."""
        bucket = self._checked_bucket(tokens, sampling)
        cached = self._cached_prefix(tokens, sampling)
        if token_mask is None and self._prefills_together(bucket, sampling, cached):
            return self._prefill_together(params, [(0, tokens, sampling, cached)])[0]
        return self._prefill_one(params, tokens, sampling, token_mask, bucket, cached)

    def _prefills_together(self, bucket: int, sampling: SamplingParams, cached) -> bool:
        """Whether a prompt runs in prefill_batch_fn, alone or beside others: on the CPU kernels,
        a bucket up to PREFILL_BATCH_MAX_BUCKET, no cached prefix, no prompt log probabilities.
        Such a prompt takes that one program even alone, and nothing in it mixes rows, so its
        numbers never depend on whether other prompts were waiting (two programs may round the
        same arithmetic differently: XLA fuses each its own way)."""
        hit = cached is not None and cached.n_blocks > 0
        eligible = bucket <= PREFILL_BATCH_MAX_BUCKET and not sampling.prompt_logprobs and not hit
        return self.prefill_batch_size > 1 and eligible

    @property
    def prefill_batch_size(self) -> int:
        """PREFILL_BATCH where the CPU kernels take the products (int8 weights, or bfloat16
        activations) and so skip each prompt's padding rows; 1 elsewhere, where a batch of prompts
        would pay for every row of the longest one's bucket."""
        cfg = self.cfg
        on_kernels = cfg.cpu_kernels and (cfg.quantize_weights or cfg.act_dtype == jnp.bfloat16)
        return PREFILL_BATCH if on_kernels else 1

    def prefill_batch(self, *, params, prompts):
        """Prompts of buckets up to PREFILL_BATCH_MAX_BUCKET that start with no cached prefix and
        want no prompt log probabilities run PREFILL_BATCH at a time, by bucket (on the CPU
        kernels), each computing what its own prefill computes; the others run as `prefill` runs
        them."""
        results: list = [None] * len(prompts)
        together = []  # (index, tokens, sampling, cached prefix)
        for i, (tokens, sampling) in enumerate(prompts):
            try:
                bucket = self._checked_bucket(tokens, sampling)
            except ValueError as exc:
                results[i] = exc
                continue
            cached = self._cached_prefix(tokens, sampling)
            if self._prefills_together(bucket, sampling, cached):
                together.append((i, tokens, sampling, cached))
            else:
                results[i] = self._prefill_one(params, tokens, sampling, None, bucket, cached)
        by_bucket: dict[int, list] = {}  # one bucket a call: padding to another would change the sums
        for entry in together:
            by_bucket.setdefault(self.bucket_for(len(entry[1])), []).append(entry)
        for group in (
            same[i : i + PREFILL_BATCH] for same in by_bucket.values() for i in range(0, len(same), PREFILL_BATCH)
        ):
            for (i, *_), result in zip(group, self._prefill_together(params, group), strict=True):
                results[i] = result
        return results

    def _prefill_together(self, params, group) -> list[tuple[Prefix, DeviceTokens]]:
        """One prefill_batch_fn call over `group` ((index, tokens, sampling, cached prefix), one
        bucket), its unused rows empty; then each prompt's Prefix and first token taken out of it."""
        bucket = self.bucket_for(len(group[0][1]))
        padded = np.zeros((PREFILL_BATCH, bucket), np.int32)
        lengths = np.zeros((PREFILL_BATCH,), np.int32)
        for row, (_, tokens, _, _) in enumerate(group):
            padded[row, : len(tokens)], lengths[row] = tokens, len(tokens)
        unused = [Sampling.host(engine_api.GREEDY)] * (PREFILL_BATCH - len(group))
        samp = jax.tree.map(lambda *a: np.stack(a), *[Sampling.host(s) for _, _, s, _ in group], *unused)
        arrays, (token, logprobs) = self._prefill_batch_fns[bucket](
            params, *self._put_replicated((padded, lengths, samp))
        )
        results = []
        for row, (_, tokens, sampling, cached) in enumerate(group):
            prefix, (first, first_logprobs) = self._take_fns[bucket](
                arrays, token, logprobs, self._put_replicated(np.int32(row))
            )
            if cached is not None:
                self._store_prefix(prefix.cache, cached)
            wants = sampling.logprobs is not None
            step = DeviceTokens(first, first_logprobs if wants else None, prompt_tokens=len(tokens))
            results.append((Prefix(prefix, logprobs=wants), step))
        return results

    def _prefill_one(self, params, tokens, sampling: SamplingParams, token_mask, bucket: int, cached):
        padded = np.zeros((1, bucket), np.int32)
        padded[0, : len(tokens)] = tokens
        mask = () if token_mask is None else (np.asarray(token_mask, np.int32),)
        hit = cached.n_blocks * self.prefix_index.block_size if cached is not None else 0
        if not hit:
            inputs = (padded, np.int32(len(tokens)), Sampling.host(sampling), *mask)
            fn = self._prefill_fns[bucket, sampling.prompt_logprobs, token_mask is not None]
            arrays, (token, logprobs, prompt) = fn(params, *self._put_replicated(inputs))
        else:
            arrays, (token, logprobs, prompt) = self._prefill_after(
                params, cached.blocks, hit, padded, len(tokens), sampling, mask
            )
        if cached is not None:
            self._store_prefix(arrays.cache, cached)
        wants = sampling.logprobs is not None
        step = DeviceTokens(token, logprobs if wants else None, prompt, prompt_tokens=len(tokens), cached_tokens=hit)
        return Prefix(arrays, logprobs=wants), step

    # ---- prefix cache -------------------------------------------------------------------------

    def _cached_prefix(self, tokens: Sequence[int], sampling: SamplingParams) -> CachedPrefix | None:
        """The prompt's cached prefix (None with the cache off); looked up only when it can be used."""
        if self.prefix_index is None:
            return None
        if sampling.prompt_logprobs:
            return CachedPrefix((), self.prefix_index.digests(tokens))
        return self.prefix_index.match(tokens)

    def _pool(self) -> KVCache:
        if self._prefix_pool is None:
            self._prefix_pool = _filler(self.prefix_pool_infos, self.prefix_pool_shardings)()
        return self._prefix_pool

    def _block_positions(self, blocks: Sequence[int], bucket: int, fill: int) -> np.ndarray:
        """Cache positions [bucket] of `blocks` laid end to end, then `fill`."""
        size = self.prefix_index.block_size
        positions = np.full((bucket,), fill, np.int32)
        spans = (np.asarray(blocks, np.int32)[:, None] * size + np.arange(size, dtype=np.int32)).reshape(-1)
        positions[: len(spans)] = spans
        return positions

    def _prefill_after(self, params, blocks, start: int, padded: np.ndarray, length: int, sampling, mask):
        """Prefill from the prompt's first `start` tokens, held in the pool's `blocks`."""
        bucket = padded.shape[1]
        tail = self.bucket_for(length - start)
        rest = np.zeros((1, tail), np.int32)
        rest[0, : length - start] = padded[0, start:length]
        context = self._block_positions(blocks, bucket, fill=0)
        inputs = (context, np.int32(start), rest, padded, np.int32(length), Sampling.host(sampling), *mask)
        fn = self._prefill_after_fns[bucket, tail, bool(mask)]
        return fn(params, self._pool(), *self._put_replicated(inputs))

    @contextlib.contextmanager
    def _without_prefix_cache(self):
        index, self.prefix_index = self.prefix_index, None
        try:
            yield
        finally:
            self.prefix_index = index

    def _warmup_prefix_store(self, prefixes: dict[int, Prefix]) -> None:
        """Compile the pool's filler and the store of each warmed bucket, storing nothing: the
        hit variants of prefill (one per prompt bucket and tail bucket) compile on first use."""
        for prefix in prefixes.values():
            self._write_pool(prefix.arrays.cache, [])

    def _store_prefix(self, cache: KVCache, cached: CachedPrefix) -> None:
        stores = self.prefix_index.add(cached)
        if stores:
            self._write_pool(cache, stores)

    def _write_pool(self, cache: KVCache, stores: Sequence[tuple[int, int]]) -> None:
        """Copy the prefix cache's blocks `stores` ((block index in the prompt, pool block id)) into the pool."""
        bucket, outside = cache.length, self.prefix_index.capacity_tokens
        source = self._block_positions([index for index, _ in stores], bucket, fill=0)
        target = self._block_positions([block for _, block in stores], bucket, fill=outside)
        self._prefix_pool = self._store_fn(self._pool(), cache, *self._put_replicated((source, target)))

    def transfer(self, prefix: Prefix) -> Prefix:
        bucket = prefix.arrays.cache.length
        arrays = jax.block_until_ready(jax.device_put(prefix.arrays, self.prefix_shardings(bucket)))
        return dataclasses.replace(prefix, arrays=arrays)

    def _slot(self, slot: int) -> jax.Array:
        if not 0 <= slot < self._batch:
            raise ValueError(f"slot {slot} out of range [0, {self._batch})")
        return self._put_replicated(np.int32(slot))

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        arrays = self._insert_fn(prefix.arrays, decode_state.arrays, self._slot(slot))
        logprob_slots = decode_state.logprob_slots - {slot} | ({slot} if prefix.logprobs else set())
        return DecodeState(arrays, decode_state.live | {slot}, frozenset(logprob_slots))

    def release(self, decode_state: DecodeState, slot: int) -> DecodeState:
        """Mark a finished slot free, so it no longer costs decode work (donates state)."""
        arrays = self._release_fn(decode_state.arrays, self._slot(slot))
        return DecodeState(arrays, decode_state.live - {slot}, decode_state.logprob_slots - {slot})

    def generate(self, *, params, decode_state: DecodeState, token_mask=None):
        rows = decode_state.rows(self.decode_buckets)
        fn = self._generate_fns[rows, decode_state.wants_logprobs, token_mask is not None]
        mask = () if token_mask is None else (self._put_replicated(np.asarray(token_mask, np.int32)),)
        arrays, (tokens, logprobs) = fn(params, decode_state.arrays, *mask)
        return dataclasses.replace(decode_state, arrays=arrays), DeviceTokens(tokens, logprobs)

    def warmup(self, params, *, prefill: bool = True, generate: bool = True) -> None:
        """Compile every prefill bucket, plain and masked, and prompts prefilled together
        (`prefill`; the variants with the prompt's log probabilities compile on first use);
        insert of each bucket's prefix, release and every decode bucket: plain, with log
        probabilities, and masked (`generate`; masked with log probabilities compiles on first
        use). A generate-only engine inserts empty prefixes made on its own mesh, laid out as
        `transfer` lands them."""
        with self._without_prefix_cache():  # warm-up prompts are not worth caching
            prefixes = self.warmup_prefill(params) if prefill else {}
            if prefill:  # the masked variants too, so a first structured request is not slow
                self.warmup_prefill(params, token_mask=engine_api.unconstrained_bitmask(1, self.cfg.vocab_size))
        if self.prefix_caching:
            self._warmup_prefix_store(prefixes)
        if not generate:
            return
        state = self.init_decode_state()
        for bucket in self.prefill_buckets:
            prefix = prefixes[bucket] if bucket in prefixes else Prefix(self._empty_prefix(bucket))
            state = self.release(self.insert(prefix, state, slot=0), slot=0)
        arrays, mask = (
            state.arrays,
            self._put_replicated(engine_api.unconstrained_bitmask(self._batch, self.cfg.vocab_size)),
        )
        for (_, with_logprobs, masked), fn in self._generate_fns.items():
            if not (with_logprobs and masked):
                arrays, (tokens, _) = fn(params, arrays, *((mask,) if masked else ()))
                DeviceTokens(tokens).to_host()

    def _empty_prefix(self, bucket: int) -> Prefix:
        return _filler(self.prefix_infos(bucket), self.prefix_shardings(bucket))()

    # ---- reporting ---------------------------------------------------------------------------

    def memory(self) -> MemoryReport:
        return MemoryReport(
            params_bytes=_nbytes(self.param_infos),
            params_bytes_per_device=_nbytes(self.param_infos, True, self.param_shardings),
            kv_cache_bytes=_nbytes(self.state_infos.cache),
            kv_cache_bytes_per_device=_nbytes(self.state_infos.cache, True, self.state_shardings.cache),
            prefix_cache_bytes=_nbytes(self.prefix_pool_infos),  # 0 positions without a prefix cache
            mesh=dict(self.mesh.shape),
        )


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    params_bytes: int
    params_bytes_per_device: int
    kv_cache_bytes: int
    kv_cache_bytes_per_device: int
    prefix_cache_bytes: int
    mesh: dict

    def describe(self, name: str) -> str:
        mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        mesh = " x ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        return (
            f"{name} mesh {mesh}: params {mib(self.params_bytes)} ({mib(self.params_bytes_per_device)}/device), "
            f"KV cache {mib(self.kv_cache_bytes)} ({mib(self.kv_cache_bytes_per_device)}/device)"
            + (f", prefix cache {mib(self.prefix_cache_bytes)}" if self.prefix_cache_bytes else "")
        )


@dataclasses.dataclass
class EngineSet:
    """What the server needs: the tokenizer and the engines (the same object when interleaved)."""

    tokenizer: engine_api.Tokenizer
    prefill_engine: JaxEngine
    generate_engine: JaxEngine
    model_config: ModelConfig

    @property
    def disaggregated(self) -> bool:
        return self.prefill_engine is not self.generate_engine

    def memory_report(self) -> str:
        """Human-readable bytes of params and KV cache per engine (printed at server start)."""
        cfg = self.model_config
        weights = cfg.weight_dtype
        if cfg.quantize_weights:
            kept = "" if cfg.quantize_attention_output else f", attention output {cfg.weight_dtype}"
            weights = f"int8 (int8 x int8 matmuls{kept})"
        head = f"dtype: weights {weights}, activations {cfg.dtype}, KV cache {'int8' if cfg.quantize_kv else cfg.dtype}"
        if self.generate_engine.cfg.cpu_kernels:
            head += "; int8/bfloat16 matmuls on AVX-512 kernels (cpu_matmul)"
        if not self.disaggregated:
            return f"{head}; {self.generate_engine.memory().describe('engine')}"
        return "; ".join(
            [head, self.prefill_engine.memory().describe("prefill"), self.generate_engine.memory().describe("generate")]
        )


CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"  # compiled, then written to the cache


@dataclasses.dataclass
class CompilationCacheStats:
    """Executables the persistent compilation cache served (hits) or had to compile and store
    (misses) since `enable_compilation_cache`: a start with warm caches compiles nothing."""

    directory: str
    hits: int = 0
    misses: int = 0

    def record(self, event: str, *args, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            self.hits += 1
        elif event == CACHE_MISS_EVENT:
            self.misses += 1

    def describe(self) -> str:
        return f"compilation cache {self.directory}: {self.hits} executables loaded, {self.misses} compiled and stored"


def enable_compilation_cache(directory: str) -> CompilationCacheStats:
    """JAX's persistent compilation cache in `directory` (a local path or a gs:// prefix), for
    every executable: the default thresholds (1 s of compile time) would skip most CPU compiles.
    Call before the first compile."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    stats = CompilationCacheStats(directory)
    jax.monitoring.register_event_listener(stats.record)
    return stats


def build_engines(settings: EngineSettings, devices: Sequence[jax.Device] | None = None) -> EngineSet:
    """Load the checkpoint once and build the engines on `devices` (default: all devices), exactly
    as `settings` say (the server fills in its per-backend defaults before)."""
    cfg, host_params, tokenizer = load_checkpoint(settings)
    return engines_from_params(settings, cfg, host_params, tokenizer, devices)


def engines_from_params(
    settings: EngineSettings,
    cfg: ModelConfig,
    host_params: dict,
    tokenizer,
    devices: Sequence[jax.Device] | None = None,
) -> EngineSet:
    """Engines over already-loaded host params: one engine, or prefill/generate on device halves."""
    devices = list(jax.devices() if devices is None else devices)
    if not settings.disaggregated:
        engine = JaxEngine(settings, cfg, host_params, devices)
        return EngineSet(tokenizer, engine, engine, cfg)
    if len(devices) < 2 or len(devices) % 2:
        raise ValueError(f"disaggregated mode splits devices in halves; got {len(devices)} devices")
    half = len(devices) // 2
    prefill_engine = JaxEngine(settings, cfg, host_params, devices[:half])
    # the prefix cache belongs to the engine that prefills
    generate_engine = JaxEngine(dataclasses.replace(settings, prefix_cache_tokens=0), cfg, host_params, devices[half:])
    return EngineSet(tokenizer, prefill_engine, generate_engine, cfg)
