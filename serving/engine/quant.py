"""int8 as a leaf swap: a weight is either an array or a `QuantArray` (int8 values + f32 scales).

The model never branches on quantization: every weight contraction goes through `einsum`, which
applies the per-channel scale after the int8 matmul, and the embedding lookup goes through `take`.
Scales keep the weight's rank with size-1 contracted axes, so they share the weight's logical axes
(and shardings) one for one.

The KV cache (`quantize_kv`) stores int8 values with one f32 scale per (token, kv head):
`quantize_kv` / `dequantize_kv` are the only two functions that know it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def dequantize(q: QuantArray, dtype=jnp.float32) -> jax.Array:
    return q.values.astype(dtype) * q.scale.astype(dtype)


def einsum(eq: str, x: jax.Array, w: jax.Array | QuantArray) -> jax.Array:
    """`jnp.einsum(eq, x, w)` for a plain or int8 weight (scale applied to the output channels)."""
    if not isinstance(w, QuantArray):
        return jnp.einsum(eq, x, w.astype(x.dtype))
    inputs, out = eq.split("->")
    _, w_letters = inputs.split(",")
    y = jnp.einsum(eq, x, w.values.astype(x.dtype))
    kept = [i for i, letter in enumerate(w_letters) if letter in out]
    contracted = tuple(i for i in range(len(w_letters)) if i not in kept)
    scale = jnp.squeeze(w.scale, axis=contracted).astype(x.dtype)
    scale_letters = "".join(w_letters[i] for i in kept)
    return jnp.einsum(f"{out},{scale_letters}->{out}", y, scale)


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


def dequantize_kv(values: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    if scale is None:
        return values.astype(dtype)
    return values.astype(dtype) * scale[..., None].astype(dtype)
