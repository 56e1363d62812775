"""`JaxEngine`: the JetStream engine contract (engine_api.Engine) over `model` on one device mesh.

Three jitted steps, each compiled once per shape (prefill once per bucket):

  prefill   tokens [1, T] (padded to a power-of-two bucket) -> Prefix (KV [L, 1, K, T, E], length,
            first token, sampling) and the first token, replicated for the host
  insert    Prefix -> slot `slot` of the DecodeState (slot is a traced scalar: no recompiles)
  generate  one token for each of the first `rows` slots, once per decode bucket `rows` (powers
            of two up to the slot count); per-slot sampling arrays; tokens [B] replicated

insert and generate donate the DecodeState's arrays, so the KV cache [L, B, K, S, E] is updated in
place. The DecodeState also knows, on the host, which slots are live (insert adds, release
removes), and generate runs the smallest bucket that covers the highest live slot: one live
request costs a one-row step, not a step over every slot (the orchestrator hands out the lowest
free slot, so live slots stay packed low). Buckets apply where the slots are not split over
devices; a mesh that splits them always runs every slot. Decode attention walks the cache in
`kv_block` blocks up to the longest *active* slot (see `model.decode_attention`); free slots sit
at position 0 and neither grow nor lengthen the loop. A slot that keeps running past the cache end
is clamped to the last position, so generate is always safe to call.

`build_engines(settings)` loads the checkpoint once and returns the engines: one engine on all
devices (interleaved), or a prefill engine and a generate engine on the two halves of the devices
(disaggregated), where `generate_engine.transfer(prefix)` moves a Prefix onto the generate mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from serving import engine_api
from serving.engine import model, sharding
from serving.engine.config import ModelConfig
from serving.engine_api import SamplingParams
from serving.engine.loaders import load_checkpoint
from serving.engine.model import ArrayInfo, KVCache
from serving.engine.sampling import Sampling, sample

MIN_BUCKET = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
    """One prefilled prompt: cache [L, 1, K, T, E], length [], first token [], sampling (scalars)."""

    cache: KVCache
    length: jax.Array
    token: jax.Array
    sampling: Sampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotArrays:
    """All slots on device: cache [L, B, K, S, E]; lengths (tokens in cache), tokens (last),
    active, sampling [B]."""

    cache: KVCache
    lengths: jax.Array
    tokens: jax.Array
    active: jax.Array
    sampling: Sampling


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """engine_api.DecodeState: the slots' device arrays, and on the host which slots are live."""

    arrays: SlotArrays
    live: frozenset[int] = frozenset()

    def rows(self, buckets: Sequence[int]) -> int:
        """The smallest decode bucket that covers every live slot."""
        needed = max(self.live, default=-1) + 1
        return next(b for b in buckets if b >= needed)


def _slot_infos(batch: int) -> tuple[ArrayInfo, ...]:
    def info(dtype, init="zeros"):
        return ArrayInfo((batch,), dtype, ("batch",), init=init)

    return info(jnp.int32), info(jnp.int32), info(jnp.bool_), Sampling(
        temperature=info(jnp.float32), top_k=info(jnp.int32), top_p=info(jnp.float32, "ones"), seed=info(jnp.uint32)
    )


def slot_array_infos(cfg: ModelConfig, batch: int, cache_length: int) -> SlotArrays:
    lengths, tokens, active, samp = _slot_infos(batch)
    return SlotArrays(model.cache_infos(cfg, batch, cache_length), lengths, tokens, active, samp)


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


def _nbytes(infos, per_device: bool = False, shardings=None) -> int:
    leaves = jax.tree.leaves(infos, is_leaf=model.is_info)
    if not per_device:
        return sum(math.prod(i.shape) * np.dtype(i.dtype).itemsize for i in leaves)
    shards = jax.tree.leaves(shardings)
    return sum(math.prod(s.shard_shape(i.shape)) * np.dtype(i.dtype).itemsize for i, s in zip(leaves, shards))


@dataclasses.dataclass(frozen=True)
class DeviceTokens:
    """engine_api.StepTokens over a replicated device array."""

    array: jax.Array

    def to_host(self) -> np.ndarray:
        return sharding.to_host(self.array)


class JaxEngine(engine_api.Engine):
    def __init__(self, settings, cfg: ModelConfig, host_params: dict, devices: Sequence[jax.Device]):
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
        self._compile()

    # ---- placement --------------------------------------------------------------------------

    def prefix_shardings(self, bucket: int) -> Prefix:
        cache = model.cache_infos(self.cfg, 1, bucket, batch_axis="prefill_batch")
        rep = self._replicated
        return Prefix(
            cache=sharding.shardings(self.mesh, self.rules, cache),
            length=rep,
            token=rep,
            sampling=Sampling(rep, rep, rep, rep),
        )

    def prefix_infos(self, bucket: int) -> Prefix:
        scalar = lambda dtype: ArrayInfo((), dtype, (), init="zeros")  # noqa: E731
        return Prefix(
            cache=model.cache_infos(self.cfg, 1, bucket, batch_axis="prefill_batch"),
            length=scalar(jnp.int32),
            token=scalar(jnp.int32),
            sampling=Sampling(scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.uint32)),
        )

    def _abstract(self, infos, shardings):
        """ShapeDtypeStructs carrying their shardings, for lowering without device arrays."""
        return jax.tree.map(
            lambda i, sh: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=sh), infos, shardings, is_leaf=model.is_info
        )

    def lower(self, bucket: int | None = None) -> dict[str, "jax.stages.Lowered"]:
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
            "prefill": self._prefill_fns[bucket].lower(
                params, rep(ArrayInfo((1, bucket), jnp.int32, (None, None))), prefix.length, prefix.sampling
            ),
            "insert": self._insert_fn.lower(prefix, state, prefix.length),
            "generate": self._generate_fns[self._batch].lower(params, state),
        }

    def _put_replicated(self, host_tree):
        return sharding.put(host_tree, jax.tree.map(lambda _: self._replicated, host_tree))

    # ---- jitted steps -----------------------------------------------------------------------

    def _compile(self) -> None:
        cfg, rep, per_slot = self.cfg, self._replicated, self.per_slot_attention
        samp_rep = Sampling(rep, rep, rep, rep)
        prefill_shard = sharding.activation_sharder(self.mesh, self.rules, "prefill_batch")
        decode_shard = sharding.activation_sharder(self.mesh, self.rules, "batch")

        def prefill_fn(params, tokens, length, samp: Sampling):
            logits, cache = model.prefill(cfg, params, tokens, length, prefill_shard)
            batched = jax.tree.map(lambda x: x[None], samp)
            token = sample(logits, batched, length[None])  # [1]
            return Prefix(cache, length, token[0], samp), token

        def insert_fn(prefix: Prefix, state: SlotArrays, slot):
            start = (0, slot, 0, 0, 0)
            cache = jax.tree.map(
                lambda dst, src: jax.lax.dynamic_update_slice(dst, src, start[: dst.ndim]), state.cache, prefix.cache
            )
            put = lambda arr, value: arr.at[slot].set(value)  # noqa: E731
            return SlotArrays(
                cache=cache,
                lengths=put(state.lengths, prefix.length),
                tokens=put(state.tokens, prefix.token),
                active=put(state.active, True),
                sampling=jax.tree.map(put, state.sampling, prefix.sampling),
            )

        def release_fn(state: SlotArrays, slot):
            return dataclasses.replace(
                state, lengths=state.lengths.at[slot].set(0), active=state.active.at[slot].set(False)
            )

        def generate_fn(params, state: SlotArrays, rows: int):
            """One token for each of the first `rows` slots; tokens [B] (stale beyond `rows`)."""
            lengths, active = state.lengths[:rows], state.active[:rows]
            positions = jnp.where(active, jnp.minimum(lengths, self.cache_length - 1), 0)
            logits, cache = model.decode_step(
                cfg, params, state.cache, state.tokens[:rows], positions, decode_shard, per_slot_attention=per_slot
            )
            sampling = jax.tree.map(lambda a: a[:rows], state.sampling)
            # freed rows sample greedily: a finished request's temperature would send every row
            # through the stochastic path (a sort over the vocabulary per row)
            sampling = dataclasses.replace(sampling, temperature=jnp.where(active, sampling.temperature, 0.0))
            new = sample(logits, sampling, positions + 1)
            lengths = jnp.where(active, jnp.minimum(lengths + 1, self.cache_length), 0)
            tokens = state.tokens.at[:rows].set(new)
            new_state = dataclasses.replace(state, cache=cache, lengths=state.lengths.at[:rows].set(lengths), tokens=tokens)
            return new_state, tokens

        self._prefill_fns = {
            bucket: jax.jit(
                prefill_fn,
                in_shardings=(self.param_shardings, rep, rep, samp_rep),
                out_shardings=(self.prefix_shardings(bucket), rep),
            )
            for bucket in self.prefill_buckets
        }
        self._insert_fn = jax.jit(
            insert_fn, out_shardings=self.state_shardings, donate_argnums=(1,)
        )
        self._init_fn = _filler(self.state_infos, self.state_shardings)
        self._release_fn = jax.jit(release_fn, out_shardings=self.state_shardings, donate_argnums=(0,))
        self._generate_fns = {
            rows: jax.jit(
                functools.partial(generate_fn, rows=rows),
                in_shardings=(self.param_shardings, self.state_shardings),
                out_shardings=(self.state_shardings, rep),
                donate_argnums=(1,),
            )
            for rows in self.decode_buckets
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

    def prefill(self, *, params, tokens: Sequence[int], sampling: SamplingParams):
        bucket = self.bucket_for(len(tokens))
        padded = np.zeros((1, bucket), np.int32)
        padded[0, : len(tokens)] = tokens
        inputs = self._put_replicated((padded, np.int32(len(tokens)), Sampling.host(sampling)))
        prefix, token = self._prefill_fns[bucket](params, *inputs)
        return prefix, DeviceTokens(token)

    def transfer(self, prefix: Prefix) -> Prefix:
        bucket = prefix.cache.length
        return jax.block_until_ready(jax.device_put(prefix, self.prefix_shardings(bucket)))

    def _slot(self, slot: int) -> jax.Array:
        if not 0 <= slot < self._batch:
            raise ValueError(f"slot {slot} out of range [0, {self._batch})")
        return self._put_replicated(np.int32(slot))

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        arrays = self._insert_fn(prefix, decode_state.arrays, self._slot(slot))
        return DecodeState(arrays, decode_state.live | {slot})

    def release(self, decode_state: DecodeState, slot: int) -> DecodeState:
        """Mark a finished slot free, so it no longer costs decode work (donates state)."""
        arrays = self._release_fn(decode_state.arrays, self._slot(slot))
        return DecodeState(arrays, decode_state.live - {slot})

    def generate(self, *, params, decode_state: DecodeState):
        rows = decode_state.rows(self.decode_buckets)
        arrays, tokens = self._generate_fns[rows](params, decode_state.arrays)
        return DecodeState(arrays, decode_state.live), DeviceTokens(tokens)

    def warmup(self, params, *, prefill: bool = True, generate: bool = True) -> None:
        """Compile every prefill bucket (`prefill`); insert of each bucket's prefix, release and
        every decode bucket (`generate`). A generate-only engine inserts empty prefixes made on
        its own mesh, laid out as `transfer` lands them."""
        prefixes = self.warmup_prefill(params) if prefill else {}
        if not generate:
            return
        state = self.init_decode_state()
        for bucket in self.prefill_buckets:
            prefix = prefixes[bucket] if bucket in prefixes else self._empty_prefix(bucket)
            state = self.release(self.insert(prefix, state, slot=0), slot=0)
        arrays = state.arrays
        for rows in self.decode_buckets:
            arrays, tokens = self._generate_fns[rows](params, arrays)
            DeviceTokens(tokens).to_host()

    def _empty_prefix(self, bucket: int) -> Prefix:
        return _filler(self.prefix_infos(bucket), self.prefix_shardings(bucket))()

    # ---- reporting ---------------------------------------------------------------------------

    def memory(self) -> "MemoryReport":
        return MemoryReport(
            params_bytes=_nbytes(self.param_infos),
            params_bytes_per_device=_nbytes(self.param_infos, True, self.param_shardings),
            kv_cache_bytes=_nbytes(self.state_infos.cache),
            kv_cache_bytes_per_device=_nbytes(self.state_infos.cache, True, self.state_shardings.cache),
            mesh=dict(self.mesh.shape),
        )


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    params_bytes: int
    params_bytes_per_device: int
    kv_cache_bytes: int
    kv_cache_bytes_per_device: int
    mesh: dict

    def describe(self, name: str) -> str:
        mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        mesh = " x ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        return (
            f"{name} mesh {mesh}: params {mib(self.params_bytes)} ({mib(self.params_bytes_per_device)}/device), "
            f"KV cache {mib(self.kv_cache_bytes)} ({mib(self.kv_cache_bytes_per_device)}/device)"
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


def build_engines(settings, devices: Sequence[jax.Device] | None = None) -> EngineSet:
    """Load the checkpoint once and build the engines on `devices` (default: all devices), exactly
    as `settings` say (the server fills in its per-backend defaults before)."""
    cfg, host_params, tokenizer = load_checkpoint(settings)
    return engines_from_params(settings, cfg, host_params, tokenizer, devices)


def engines_from_params(
    settings, cfg: ModelConfig, host_params: dict, tokenizer, devices: Sequence[jax.Device] | None = None
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
    generate_engine = JaxEngine(settings, cfg, host_params, devices[half:])
    return EngineSet(tokenizer, prefill_engine, generate_engine, cfg)
