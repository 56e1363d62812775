"""int8 as a leaf swap: a weight is either an array or a `QuantArray` (int8 values + f32 scales).

The model never branches on quantization: every weight contraction goes through `einsum` and the
embedding lookup through `take`. Scales keep the weight's rank with size-1 contracted axes, so they
share the weight's logical axes (and shardings) one for one.

An int8 weight meets int8 activations: `einsum` quantizes the activations per row (one scale per
token over the contracted axes), multiplies int8 x int8 with int32 accumulation, and applies both
scales to the int32 result. The matmul reads a quarter of the f32 bytes and runs on integer units
(the TPU MXU natively; XLA:CPU through its int8 GEMM kernels, which run at batch >= 2 only: a
single-row product takes a slow generic loop there, so one row is padded to two, see `einsum`).

The KV cache (`quantize_kv`) stores int8 values with one f32 scale per (token, kv head):
`quantize_kv` / `dequantize_kv` are the only two functions that know it. An unquantized bfloat16
cache holds its values' bits as uint16 (`kv_storage_dtype`, `store_kv`): XLA:CPU converts a
bfloat16 array that a loop slices or scatters into to float32 whole, and back, on every step
(three quarters of a 32-slot decode step at Llama 3.2 1B's size); a bitcast is free everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from serving.engine import cpu_matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantArray:
    """int8 `values` [..] and f32 `scale` [..] (contracted axes of size 1): weight = values * scale."""

    values: Any
    scale: Any

    @property
    def shape(self):
        return self.values.shape


def quantize(w: np.ndarray | jax.Array, contract_axes: Sequence[int]) -> QuantArray:
    """Symmetric per-channel int8: one scale per output channel (max |w| over `contract_axes`)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=tuple(contract_axes), keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    values = xp.clip(xp.round(w32 / scale), -127, 127).astype(xp.int8)
    return QuantArray(values=values, scale=scale)


def einsum(
    eq: str, x: jax.Array, w: jax.Array | QuantArray, out_dtype=None, *, cpu_kernels: bool = False, rows=None
) -> jax.Array:
    """`jnp.einsum(eq, x, w)` for a plain weight, or int8 x int8 -> int32 for an int8 weight, in
    `out_dtype` (default x's dtype).

    With `cpu_kernels` (ModelConfig.cpu_kernels: one CPU device), a product of x's last axis with
    a 2-D weight [N, K] runs on serving/engine/cpu_matmul's AVX-512 kernels when it is int8 or
    bfloat16; other products, and float32 ones, stay with XLA. `rows` (traced) says how many leading
    rows of x (its kept axes flattened) matter, as in a prompt padded to its bucket: the kernels
    multiply only those and return zeros for the rest; XLA multiplies every row.

    x's axes come first in the output (as in every einsum of the model), so the per-row
    activation scale and the per-channel weight scale broadcast onto the result in that order.
    A single row is padded to two: XLA:CPU runs a one-row product through other kernels (a slow
    generic loop for int8; a matrix-vector product for float, whose different summation order
    would make a request's tokens depend on how many slots decode beside it). A float product
    accumulates in float32 and is rounded to x's dtype after: XLA:CPU has no bfloat16-output GEMM
    and takes a generic loop for one (25x slower at Llama 3.2 1B's MLP shapes), and accelerators
    accumulate in float32 anyway.
    """
    inputs, out = eq.split("->")
    x_letters, w_letters = inputs.split(",")
    by_rows = out == x_letters[:-1] + w_letters[0] and w_letters[1:] == x_letters[-1]  # x [..., K] . w [N, K]
    if cpu_kernels and by_rows and (isinstance(w, QuantArray) or x.dtype == jnp.bfloat16):
        return _cpu_matmul(x, w, out_dtype or x.dtype, rows)
    x_contracted = tuple(i for i, letter in enumerate(x_letters) if letter not in out)
    rows = math.prod(x.shape) // math.prod(x.shape[i] for i in x_contracted)
    padded = jnp.concatenate([x, jnp.zeros_like(x)], axis=0) if rows == 1 else x
    if isinstance(w, QuantArray):
        y = _int8_einsum(eq, padded, w, x_letters, w_letters, x_contracted, out_dtype or x.dtype)
    else:
        y = jnp.einsum(eq, padded, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)
    return y[: x.shape[0]]


def _int8_einsum(
    eq: str, x: jax.Array, w: QuantArray, x_letters: str, w_letters: str, x_contracted, out_dtype
) -> jax.Array:
    out = eq.split("->")[1]
    w_kept = tuple(i for i, letter in enumerate(w_letters) if letter in out)
    kept_letters = "".join(x_letters[i] for i in range(len(x_letters)) if i not in x_contracted)
    if out != kept_letters + "".join(w_letters[i] for i in w_kept):
        raise ValueError(f"einsum {eq!r}: the output must list x's kept axes, then w's")
    xq, x_scale = quantize_rows(x, x_contracted)
    acc = jnp.einsum(eq, xq, w.values, preferred_element_type=jnp.int32)
    x_scale = jnp.squeeze(x_scale, axis=x_contracted)  # [x's kept axes]
    w_scale = jnp.squeeze(w.scale, axis=tuple(i for i in range(len(w_letters)) if i not in w_kept))
    scale = x_scale.reshape(x_scale.shape + (1,) * w_scale.ndim) * w_scale
    return (acc.astype(jnp.float32) * scale).astype(out_dtype)


def _cpu_matmul(x: jax.Array, w: jax.Array | QuantArray, out_dtype, rows) -> jax.Array:
    """x [..., K] by w [N, K] on cpu_matmul's kernels: int8 (scaled as `_int8_einsum` scales, in the
    same order, so the result is the same to the bit) or bfloat16 with float32 accumulation."""
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(w, QuantArray):
        xq, x_scale = quantize_rows(flat, (1,))
        y = cpu_matmul.matmul(xq, w.values, rows).astype(jnp.float32) * (x_scale * w.scale.reshape(1, -1))
    else:
        y = cpu_matmul.matmul(flat, w.astype(jnp.bfloat16), rows)
    return y.astype(out_dtype).reshape(x.shape[:-1] + (w.shape[0],))


def quantize_rows(x: jax.Array, contract_axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Activations -> int8 values and f32 scales (max |x| over `contract_axes`, kept as size 1)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=tuple(contract_axes), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8), scale


def take(table: jax.Array | QuantArray, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of an embedding table [V, D] (int8 tables carry one scale per row)."""
    if not isinstance(table, QuantArray):
        return table[ids].astype(dtype)
    return table.values[ids].astype(dtype) * table.scale[ids].astype(dtype)


# ---- KV cache ------------------------------------------------------------------------------


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., Dh] -> int8 values [..., Dh], f32 scale [...] (one per token and kv head)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    values = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return values, scale


def kv_storage_dtype(dtype):
    """The dtype an unquantized KV cache of `dtype` values is stored in."""
    return jnp.uint16 if jnp.dtype(dtype) == jnp.bfloat16 else dtype


def store_kv(x: jax.Array) -> jax.Array:
    """Unquantized KV values as the cache stores them (`kv_storage_dtype`)."""
    if x.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def dequantize_kv(values: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    if values.dtype == jnp.uint16:  # bfloat16 bits (store_kv)
        values = jax.lax.bitcast_convert_type(values, jnp.bfloat16)
    if scale is None:
        return values.astype(dtype)
    return values.astype(dtype) * scale[..., None].astype(dtype)
