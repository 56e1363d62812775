"""Allowed-token masks on the device: the host's packed bitmask applied to the logits.

A bitmask is int32 [B, ceil(V / 32)]: bit j of word w allows token 32 * w + j (llguidance's and
xgrammar's layout, so the host copies ~V/8 bytes per constrained row, not V). Tokens past the
mask's width (a model vocabulary padded beyond the tokenizer's) are not allowed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def allowed_tokens(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """bool [B, V] from the packed int32 bitmask [B, W]."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    allowed = bits.reshape(bitmask.shape[0], -1).astype(jnp.bool_)  # [B, 32 W]
    width = allowed.shape[1]
    if width >= vocab_size:
        return allowed[:, :vocab_size]
    return jnp.pad(allowed, ((0, 0), (0, vocab_size - width)))


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits [B, V] with the tokens the bitmask [B, W] does not allow set to -inf."""
    return jnp.where(allowed_tokens(bitmask, logits.shape[-1]), logits, -jnp.inf)
