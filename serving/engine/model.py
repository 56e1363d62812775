"""A Llama-family decoder in pure JAX: plain functions over a params pytree.

Shapes use these letters (einsum letters match):
  B batch (decode slots)   T query positions   S cache positions   D d_model   F ffn hidden
  H query heads   K kv heads   G query heads per kv head (H = K*G)   E head_dim   V vocab   L layers

Every array is declared once as an `ArrayInfo` (shape, dtype, logical axes, which axes a matmul
contracts); `param_infos` / `cache_infos` build those trees and everything else derives from them:
host init (`init_params`), int8 swap (`quant`), shardings (`sharding.ShardingRules`).

Layers are stacked on a leading L axis and run with `lax.scan`, so compile time does not grow with
depth; with `cfg.scan_layers` off, params["layers"] is instead a tuple of one weight tree per
layer and the layer loop is unrolled (`over_layers`), which XLA:CPU runs faster (no per-layer
slice copies). The KV cache keeps its L axis either way.

RoPE uses the Hugging Face "rotate_half" layout; the GGUF loader un-permutes llama.cpp's
interleaved Q/K rows into it. Matrices keep the checkpoints' own [out, in] order (PyTorch's
`nn.Linear` and GGUF's rows: wq [H, E, D], w_up [F, D], w_down [D, F], ...): loading is then a copy
of each tensor, never a transpose, and every einsum contracts the weight's last axes.

Decode attention walks the cache in `cfg.kv_block`-sized blocks with an online softmax, for
ceil(max live length / block) blocks only (a `fori_loop` with a traced bound), so its cost follows
the longest live sequence, not the cache size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from serving.engine import quant
from serving.engine.config import ModelConfig

NEG_INF = -1e30

# Activation sharding: `shard(x, logical_axes)` pins an activation to the mesh layout its logical
# axes map to (sharding.activation_sharder builds it from ShardingRules); the identity off-mesh.
# Without these pins XLA propagates two layouts into the residual stream on meshes where the
# batch and the weights' d_model share the fsdp axis, and falls back to full rematerialization.
Shard = Callable[[jax.Array, tuple], jax.Array]
BTD = ("act_batch", None, "act_embed")  # residual stream [B, T, D]
BTF = ("act_batch", None, "mlp")  # MLP hidden [B, T, F]
BTH = ("act_batch", None, "q_heads", None)  # queries / attention output [B, T, H, E]
BTK = ("act_batch", None, "kv_heads", None)  # keys, values [B, T, K, E]
BV = ("act_batch", "vocab")  # logits [B, V]
CACHE_BH = ("cache_batch", "q_heads", None)  # decode attention's queries and output [B, H, E]


def no_shard(x: jax.Array, axes: tuple) -> jax.Array:
    return x


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One array: shape, dtype, logical axis per dim, and the axes a matmul contracts over.

    `contract` empty means the array is never quantized (norms, caches); `float_under_int8` keeps
    a matmul weight in its float dtype when the others are int8. `init` is the random-init rule
    for test weights ("normal" scaled by 1/sqrt(fan in), "ones", "zeros").
    """

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]
    contract: tuple[int, ...] = ()
    init: str = "normal"
    float_under_int8: bool = False

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")


def is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


# ---- declarations --------------------------------------------------------------------------


def _float_param_infos(cfg: ModelConfig) -> dict:
    L, D, F, V = cfg.n_layers, cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    w = cfg.param_dtype
    layers = {
        "attn_norm": ArrayInfo((L, D), jnp.float32, ("layers", "norm"), init="ones"),
        "wq": ArrayInfo((L, H, E, D), w, ("layers", "q_heads", "head_dim", "embed"), (3,)),
        "wk": ArrayInfo((L, K, E, D), w, ("layers", "kv_heads", "head_dim", "embed"), (3,)),
        "wv": ArrayInfo((L, K, E, D), w, ("layers", "kv_heads", "head_dim", "embed"), (3,)),
        "wo": ArrayInfo(
            (L, D, H, E),
            w,
            ("layers", "embed", "q_heads", "head_dim"),
            (2, 3),
            float_under_int8=not cfg.quantize_attention_output,
        ),
        "mlp_norm": ArrayInfo((L, D), jnp.float32, ("layers", "norm"), init="ones"),
        **(_qkv_bias_infos(cfg) if cfg.qkv_bias else {}),
        "w_gate": ArrayInfo((L, F, D), w, ("layers", "mlp", "embed"), (2,)),
        "w_up": ArrayInfo((L, F, D), w, ("layers", "mlp", "embed"), (2,)),
        "w_down": ArrayInfo((L, D, F), w, ("layers", "embed", "mlp"), (2,)),
    }
    infos = {
        # Embedding rows are also the tied output projection: contract D, one scale per vocab row.
        "embed": ArrayInfo((V, D), w, ("vocab", "embed"), (1,)),
        "final_norm": ArrayInfo((D,), jnp.float32, ("norm",), init="ones"),
        "layers": layers,
    }
    if not cfg.tie_embeddings:
        infos["lm_head"] = ArrayInfo((V, D), w, ("vocab", "embed"), (1,))
    return infos


def _qkv_bias_infos(cfg: ModelConfig) -> dict:
    """Biases of the q, k, v projections [L, H|K, E] (float32: they are added after the matmul)."""
    L, H, K, E = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {
        "bq": ArrayInfo((L, H, E), jnp.float32, ("layers", "q_heads", "head_dim"), init="zeros"),
        "bk": ArrayInfo((L, K, E), jnp.float32, ("layers", "kv_heads", "head_dim"), init="zeros"),
        "bv": ArrayInfo((L, K, E), jnp.float32, ("layers", "kv_heads", "head_dim"), init="zeros"),
    }


def quantized(info: ArrayInfo) -> bool:
    """Whether int8 weights make this array a QuantArray."""
    return bool(info.contract) and not info.float_under_int8


def _quantized_info(info: ArrayInfo) -> ArrayInfo | quant.QuantArray:
    if not quantized(info):
        return info
    scale_shape = tuple(1 if i in info.contract else n for i, n in enumerate(info.shape))
    scale_axes = tuple(None if i in info.contract else a for i, a in enumerate(info.axes))
    return quant.QuantArray(
        values=dataclasses.replace(info, dtype=jnp.int8),
        scale=ArrayInfo(scale_shape, jnp.float32, scale_axes, init="ones"),
    )


def _layer_info(info: ArrayInfo) -> ArrayInfo:
    """One layer's part of a declaration stacked on L."""
    contract = tuple(axis - 1 for axis in info.contract)
    return dataclasses.replace(info, shape=info.shape[1:], axes=info.axes[1:], contract=contract)


def split_layers(cfg: ModelConfig, tree: dict, take: Callable[[Any, int], Any]) -> dict:
    """`tree` (params or infos, layers stacked on L) with params["layers"] as cfg asks: stacked
    as it is, or (scan_layers off) a tuple of per-layer trees, leaf `take(stacked leaf, layer)`."""
    if cfg.scan_layers:
        return tree
    layers = tuple(
        jax.tree.map(lambda a, i=i: take(a, i), tree["layers"], is_leaf=is_info) for i in range(cfg.n_layers)
    )
    return {**tree, "layers": layers}


def param_infos(cfg: ModelConfig) -> dict:
    """The params tree of ArrayInfo leaves (QuantArray of infos where int8 weights are on)."""
    infos = split_layers(cfg, _float_param_infos(cfg), lambda info, _: _layer_info(info))
    if cfg.quantize_weights:
        infos = jax.tree.map(_quantized_info, infos, is_leaf=is_info)
    return infos


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """k, v [L, B, K, S, E] (int8 when quantized, with scales [L, B, K, S]; else scales are None)."""

    k: Any
    v: Any
    k_scale: Any = None
    v_scale: Any = None

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def pairs(self) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
        """(k, k_scale), (v, v_scale): each values array with its scales (None unless int8)."""
        return (self.k, self.k_scale), (self.v, self.v_scale)


def cache_infos(cfg: ModelConfig, batch: int, length: int, batch_axis: str = "cache_batch") -> KVCache:
    """KV cache declaration. Prefixes use batch=1 with batch_axis="prefill_batch" (unsharded)."""
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)
    axes = ("layers", batch_axis, "kv_heads", "cache_seq", "head_dim")
    if not cfg.quantize_kv:
        kv = ArrayInfo(shape, quant.kv_storage_dtype(cfg.act_dtype), axes, init="zeros")
        return KVCache(k=kv, v=kv)
    kv = ArrayInfo(shape, jnp.int8, axes, init="zeros")
    scale = ArrayInfo(shape[:-1], jnp.float32, axes[:-1], init="ones")
    return KVCache(k=kv, v=kv, k_scale=scale, v_scale=scale)


def abstract(infos):
    """ShapeDtypeStructs for a tree of ArrayInfo."""
    return jax.tree.map(lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype), infos, is_leaf=is_info)


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """Random host (numpy) weights for tests, float (quantization is applied by the loader)."""
    rng = np.random.default_rng(seed)

    def init(info: ArrayInfo) -> np.ndarray:
        if info.init in ("ones", "zeros"):
            return np.full(info.shape, info.init == "ones", info.dtype)
        fan_in = math.prod(info.shape[i] for i in info.contract) if info.contract else 1
        values = rng.standard_normal(info.shape, np.float32) / math.sqrt(fan_in)
        return values.astype(info.dtype)

    stacked = jax.tree.map(init, _float_param_infos(cfg), is_leaf=is_info)  # the same values either way
    return split_layers(cfg, stacked, lambda a, i: a[i])


# ---- blocks ---------------------------------------------------------------------------------

# XLA:CPU sums a row reduction in one order for few rows and another once it vectorizes across
# rows (from 8 rows up here); the norms pad fewer rows to this many, so every row count takes the
# second path and a slot's tokens do not depend on how many rows decode beside it.
MIN_REDUCTION_ROWS = 16


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    squares = (x32 * x32).reshape(-1, x.shape[-1])
    rows = squares.shape[0]
    if rows < MIN_REDUCTION_ROWS:
        squares = jnp.pad(squares, ((0, MIN_REDUCTION_ROWS - rows), (0, 0)))
    mean_sq = jnp.mean(squares, axis=-1)[:rows].reshape(x.shape[:-1] + (1,))
    normed = x32 * jax.lax.rsqrt(mean_sq + eps)
    return (normed * weight).astype(x.dtype)


def rope_table(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, E/2] at positions [B, T]; computed once per step, shared by all layers."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (jnp.arange(half, dtype=jnp.float32) / half))  # [E/2]
    if cfg.rope_freq_factors:
        inv_freq = inv_freq / jnp.asarray(cfg.rope_freq_factors, jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope(x: jax.Array, table: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate x [B, T, N, E] by `rope_table` (rotate_half layout: pairs (i, i + E/2))."""
    cos, sin = table
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def qkv(cfg: ModelConfig, layer: dict, x: jax.Array, rope_tab, shard: Shard = no_shard, rows=None):
    """x [B, T, D] -> q [B, T, H, E], k, v [B, T, K, E] (q, k rotated by `rope_table`).

    Each projection runs with its heads and head_dim merged ([B, T, D] x [H*E, D], free reshapes
    of contiguous dims), as `attn_out`'s does: contracting into two output axes made XLA:CPU
    transpose every layer's weight on every call (a third of a 32-slot int8 decode step at Llama
    3.2 1B's size). `rows`: the leading rows of [B*T] that matter (quant.einsum).
    """
    h = rms_norm(x, layer["attn_norm"], cfg.norm_eps)
    q, k, v = (_project_heads(cfg, h, layer[name], rows) for name in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
        q, k, v = (x + layer[b].astype(x.dtype) for x, b in ((q, "bq"), (k, "bk"), (v, "bv")))
    q, k, v = shard(q, BTH), shard(k, BTK), shard(v, BTK)
    return rope(q, rope_tab), rope(k, rope_tab), v


def _project_heads(cfg: ModelConfig, x: jax.Array, w, rows=None) -> jax.Array:
    """x [B, T, D] by a head projection w [N, E, D] (int8: scale [N, E, 1]) -> [B, T, N, E]."""
    n, e = w.shape[:2]
    merged = jax.tree.map(lambda a: a.reshape(n * e, a.shape[-1]), w)  # [N*E, D]; int8 scale [N*E, 1]
    y = quant.einsum("btd,fd->btf", x, merged, cpu_kernels=cfg.cpu_kernels, rows=rows)
    return y.reshape(y.shape[:2] + (n, e))


def attn_out(cfg: ModelConfig, layer: dict, x: jax.Array, attn: jax.Array, shard: Shard = no_shard, rows=None):
    """Residual plus the output projection of attention [B, T, H, E].

    Heads and head_dim are merged first ([B, T, H*E] x [D, H*E], free reshapes of contiguous
    dims): contracting two axes made XLA transpose wo on every call.
    """
    b, t, h, e = attn.shape
    flat = shard(attn, BTH).reshape(b, t, h * e)
    wo = jax.tree.map(lambda w: w.reshape(w.shape[0], -1), layer["wo"])  # [D, H*E]; int8 scale [D, 1]
    return shard(x + quant.einsum("btf,df->btd", flat, wo, cpu_kernels=cfg.cpu_kernels, rows=rows), BTD)


def mlp_block(cfg: ModelConfig, layer: dict, x: jax.Array, shard: Shard = no_shard, rows=None) -> jax.Array:
    """SwiGLU with residual: x [B, T, D] -> x + mlp(x) [B, T, D]."""
    with jax.named_scope("mlp"):
        h = rms_norm(x, layer["mlp_norm"], cfg.norm_eps)
        product = functools.partial(quant.einsum, cpu_kernels=cfg.cpu_kernels, rows=rows)
        gate = shard(product("btd,fd->btf", h, layer["w_gate"]), BTF)
        up = shard(product("btd,fd->btf", h, layer["w_up"]), BTF)
        down = product("btf,df->btd", jax.nn.silu(gate) * up, layer["w_down"])
        return shard(x + down, BTD)


def embed(cfg: ModelConfig, params: dict, tokens: jax.Array, shard: Shard = no_shard) -> jax.Array:
    """tokens [B, T] -> [B, T, D].

    The table's d_model is gathered (over fsdp) before the lookup: a lookup into a d_model-sharded
    table yields rows sharded on D, which XLA cannot reshard to the batch-sharded residual stream
    without replicating it.
    """
    table = jax.tree.map(lambda w: shard(w, ("vocab", "act_embed")), params["embed"])
    return shard(quant.take(table, tokens, cfg.act_dtype), BTD)


def logits(cfg: ModelConfig, params: dict, x: jax.Array, shard: Shard = no_shard, rows=None) -> jax.Array:
    """x [B, D] -> f32 logits [B, V] (tied: the embedding table is the output projection).

    The product runs in the activation dtype and accumulates in float32, as every other does: a
    float32 copy of a bfloat16 table, which XLA:CPU would make on every call, reads and writes
    the model's largest weight three times over.
    """
    with jax.named_scope("logits"):
        h = rms_norm(x, params["final_norm"], cfg.norm_eps)
        table = params["embed"] if cfg.tie_embeddings else params["lm_head"]
        product = quant.einsum("bd,vd->bv", h, table, out_dtype=jnp.float32, cpu_kernels=cfg.cpu_kernels, rows=rows)
        return shard(product, BV)


def _group(cfg: ModelConfig, q: jax.Array) -> jax.Array:
    """q [B, T, H, E] -> [B, T, K, G, E] (query heads grouped by the kv head they share)."""
    b, t = q.shape[:2]
    return q.reshape(b, t, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)


# ---- prefill ----------------------------------------------------------------------------------


def prefill_attention(cfg: ModelConfig, q, k, v, length, start=0) -> jax.Array:
    """Causal attention of prompt positions start.. (q [B, T, H, E]) over cache positions 0..
    (k, v [B, K, S, E], S >= start + T), the first `length` of them real (a scalar, or [B] for
    prompts prefilled together) -> [B, T, H, E]."""
    # Both products accumulate in float32 (`preferred_element_type`), as quant.einsum's do: XLA:CPU
    # runs a bfloat16-output product as a slow generic loop.
    with jax.named_scope("attention"):
        scores = jnp.einsum("btkge,bkse->bkgts", _group(cfg, q), k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(cfg.head_dim)
        query_pos, key_pos = start + jnp.arange(q.shape[1]), jnp.arange(k.shape[2])
        real = key_pos[None, None, :] < jnp.reshape(length, (-1, 1, 1))  # [B or 1, 1, S]
        mask = (key_pos[None, :] <= query_pos[:, None]) & real  # [B or 1, T, S]
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, NEG_INF), axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bkse->btkge", probs, v, preferred_element_type=jnp.float32)
        return out.astype(q.dtype).reshape(q.shape)


def prefill(cfg: ModelConfig, params: dict, tokens: jax.Array, length: jax.Array, shard: Shard = no_shard):
    """Run a padded prompt tokens [1, T] with `length` real tokens.

    Returns f32 logits [1, V] at position length-1 and the prompt's KVCache (B=1, S=T).
    """
    x, cache = prefill_hidden(cfg, params, tokens, length, shard)
    last = jax.lax.dynamic_index_in_dim(x, length - 1, axis=1, keepdims=False)  # [1, D]
    return logits(cfg, params, last, shard), cache


def prefill_hidden(
    cfg: ModelConfig,
    params: dict,
    tokens: jax.Array,
    length: jax.Array,
    shard: Shard = no_shard,
    context: KVCache | None = None,
    start: jax.Array | int = 0,
):
    """`prefill` up to the last decoder layer: the residual stream [1, T, D] at every position
    (for log probabilities of the prompt's own tokens) and the prompt's KVCache. Several prompts
    run together as tokens [P, T] with lengths [P] (no `context`; 0: an unused row): nothing mixes
    rows, so in one program a prompt's numbers do not depend on the others.

    With `context` (a KVCache [L, 1, K, S, E] already holding the prompt's first `start` positions,
    from the prefix cache), tokens [1, T] are positions start..start+T-1 of a prompt of `length`
    tokens: they attend to the context too, their k, v are written into it, and the returned cache
    is the context so filled (S positions; those past S, padding only, are dropped). Without it,
    start is 0 and the cache has S = T positions.
    """
    positions = start + jnp.arange(tokens.shape[1])
    rope_tab = rope_table(cfg, positions[None, :])  # positions [1, T]
    rows = length - start  # real tokens; the rest pads the bucket, and the CPU kernels skip them
    x = embed(cfg, params, tokens, shard)

    def layer_step(x, layer_and_context):
        layer, layer_context = layer_and_context
        with jax.named_scope("decoder_layer"):
            q, k, v = qkv(cfg, layer, x, rope_tab, shard, rows)
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [1, K, T, E]
            cache = _to_cache(cfg, k, v)
            if layer_context is not None:
                cache = _write_positions(layer_context, cache, positions)
            # keys and values as the cache holds them (an int8 cache: rounded), as decode reads
            # them: a prompt then attends alike whether its start came from the prefix cache or not
            k, v = (quant.dequantize_kv(*pair, cfg.act_dtype) for pair in cache.pairs())
            attn = prefill_attention(cfg, q, k, v, length, start)
            x = attn_out(cfg, layer, x, attn, shard, rows)
            x = mlp_block(cfg, layer, x, shard, rows)
            return x, cache

    return over_layers(cfg, layer_step, x, params["layers"], context)  # cache [L, 1, K, S, E]


def over_layers(cfg: ModelConfig, step, carry, layers, xs):
    """`lax.scan(step, carry, (layers, xs))` over the decoder layers, or with per-layer weights
    (scan_layers off) the same steps unrolled: layer i gets its own tree and xs[i]; the
    per-layer outputs are stacked on L as scan stacks them."""
    if cfg.scan_layers:
        return jax.lax.scan(step, carry, (layers, xs))
    outputs = []
    for i, layer in enumerate(layers):
        carry, out = step(carry, (layer, jax.tree.map(lambda a, i=i: a[i], xs)))
        outputs.append(out)
    return carry, jax.tree.map(lambda *parts: jnp.stack(parts), *outputs)


def _write_positions(cache: KVCache, new: KVCache, positions: jax.Array) -> KVCache:
    """`cache` (one layer, [B, K, S, ...]) with `new` ([B, K, T, ...]) at positions [T] (past S: dropped)."""
    return jax.tree.map(lambda dst, src: dst.at[:, :, positions].set(src, mode="drop"), cache, new)


def _to_cache(cfg: ModelConfig, k: jax.Array, v: jax.Array) -> KVCache:
    if not cfg.quantize_kv:
        return KVCache(k=quant.store_kv(k.astype(cfg.act_dtype)), v=quant.store_kv(v.astype(cfg.act_dtype)))
    (kq, ks), (vq, vs) = quant.quantize_kv(k), quant.quantize_kv(v)
    return KVCache(k=kq, v=vq, k_scale=ks, v_scale=vs)


# ---- decode -----------------------------------------------------------------------------------


def _write_token(cfg: ModelConfig, cache: KVCache, layer_idx, k, v, positions) -> KVCache:
    """Write k, v [B, K, E] of layer `layer_idx` at per-slot positions [B]."""
    batch = jnp.arange(k.shape[0])
    new = _to_cache(cfg, k, v)
    updated = {
        name: getattr(cache, name).at[layer_idx, batch, :, positions].set(getattr(new, name))
        for name in ("k", "v", "k_scale", "v_scale")
        if getattr(cache, name) is not None
    }
    return dataclasses.replace(cache, **updated)


def _cache_block(cfg: ModelConfig, cache: KVCache, name: str, layer_idx, slot, start, rows: int) -> jax.Array:
    """Dequantized block [rows, K, blk, E] of cache field `name`: slots slot..slot+rows-1 of
    layer `layer_idx`, positions from `start`."""
    values = getattr(cache, name)
    k, e = values.shape[2], values.shape[4]
    block = jax.lax.dynamic_slice(values, (layer_idx, slot, 0, start, 0), (1, rows, k, cfg.kv_block, e))[0]
    scales = getattr(cache, name + "_scale")
    if scales is not None:
        scales = jax.lax.dynamic_slice(scales, (layer_idx, slot, 0, start), (1, rows, k, cfg.kv_block))[0]
    return quant.dequantize_kv(block, scales, cfg.act_dtype)


def _attend(cfg: ModelConfig, qg, cache: KVCache, layer_idx, slot, lengths, n_blocks) -> jax.Array:
    """Online softmax of scaled queries qg [R, K, G, E] of slots slot..slot+R-1 over the first
    `n_blocks` (traced) cache blocks, positions < lengths [R] -> [R, K, G, E]."""
    rows = qg.shape[0]
    shape = (rows, cfg.n_kv_heads, cfg.q_per_kv)
    init = (jnp.full(shape, NEG_INF), jnp.zeros(shape), jnp.zeros(shape + (cfg.head_dim,)))

    def block_step(j, carry):
        m, denom, acc = carry
        start = j * cfg.kv_block
        kb = _cache_block(cfg, cache, "k", layer_idx, slot, start, rows).astype(jnp.float32)  # [R, K, blk, E]
        vb = _cache_block(cfg, cache, "v", layer_idx, slot, start, rows).astype(jnp.float32)
        s = jnp.einsum("bkge,bkse->bkgs", qg, kb)
        live = (start + jnp.arange(cfg.kv_block))[None, :] < lengths[:, None]  # [R, blk]
        s = jnp.where(live[:, None, None, :], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        denom = denom * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgs,bkse->bkge", p, vb)
        return m_new, denom, acc

    _, denom, acc = jax.lax.fori_loop(0, n_blocks, block_step, init)
    return acc / denom[..., None]


def _blocks(cfg: ModelConfig, lengths) -> jax.Array:
    return (jnp.max(lengths) + cfg.kv_block - 1) // cfg.kv_block


def decode_attention(
    cfg: ModelConfig, q, cache: KVCache, layer_idx, lengths, shard: Shard = no_shard, per_slot: bool = False
) -> jax.Array:
    """One query per slot q [B, H, E] over cache positions < lengths [B], block by block; B may
    be fewer than the cache's slots (its first B are read).

    Online softmax over ceil(length / block) blocks, so the work follows the live lengths, not
    the cache size. Batched (`per_slot` False), all slots walk the longest slot's blocks, with
    the slots laid out as the cache's ("cache_batch"), so no cache data moves on a mesh.
    `per_slot` loops over the slots instead, each walking only its own blocks, and computes a
    slot's attention with the same program whatever B is: XLA:CPU's batched kernels sum in an
    order that depends on B, which would make a request's tokens depend on how many slots run
    beside it. Only for slots that are not split over devices (a loop would gather them).
    """
    with jax.named_scope("attention"):
        b = q.shape[0]
        q = shard(q, CACHE_BH)
        qg = _group(cfg, q[:, None])[:, 0].astype(jnp.float32) / math.sqrt(cfg.head_dim)  # [B, K, G, E]
        if per_slot:

            def one_slot(args):
                slot, q_slot, length = args
                return _attend(cfg, q_slot[None], cache, layer_idx, slot, length[None], _blocks(cfg, length))[0]

            out = jax.lax.map(one_slot, (jnp.arange(b), qg, lengths))
        else:
            out = _attend(cfg, qg, cache, layer_idx, 0, lengths, _blocks(cfg, lengths))
        return shard(out.reshape(b, cfg.n_heads, cfg.head_dim).astype(q.dtype), CACHE_BH)


def decode_step(
    cfg: ModelConfig,
    params: dict,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    shard: Shard = no_shard,
    per_slot_attention: bool = False,
):
    """One token per slot: tokens [B] at positions [B] (< cache length), for the cache's first B
    slots (the engine runs only as many as are live; the others are left as they are).

    Writes each slot's k, v at its position, attends to positions <= it (`decode_attention`,
    `per_slot_attention` as its `per_slot`), returns f32 logits [B, V] and the updated cache.
    """
    lengths = positions + 1
    x = embed(cfg, params, tokens[:, None], shard)  # [B, 1, D]
    rope_tab = rope_table(cfg, positions[:, None])

    def layer_step(carry, layer_and_idx):
        x, cache = carry
        layer, idx = layer_and_idx
        with jax.named_scope("decoder_layer"):
            q, k, v = qkv(cfg, layer, x, rope_tab, shard)
            cache = _write_token(cfg, cache, idx, k[:, 0], v[:, 0], positions)
            attn = decode_attention(cfg, q[:, 0], cache, idx, lengths, shard, per_slot_attention)  # [B, H, E]
            x = attn_out(cfg, layer, x, attn[:, None], shard)
            x = mlp_block(cfg, layer, x, shard)
            return (x, cache), None

    (x, cache), _ = over_layers(cfg, layer_step, (x, cache), params["layers"], np.arange(cfg.n_layers))
    return logits(cfg, params, x[:, 0], shard), cache
