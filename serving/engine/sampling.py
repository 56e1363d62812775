"""Per-slot token sampling inside one jitted function: greedy, temperature, top-k, top-p, seed.

Every slot carries its own parameters as arrays, so mixing greedy and sampled requests in one
batch never recompiles. The random key of a token is fold_in(key(seed), position of the token),
so a seeded request gives the same text whatever slot it lands in and whatever runs beside it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from serving.engine_api import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
    """Sampling parameters, scalars (one request) or [B] arrays (one per slot)."""

    temperature: jax.Array  # f32; 0 = greedy
    top_k: jax.Array  # i32; 0 = off
    top_p: jax.Array  # f32; 1 = off
    seed: jax.Array  # u32

    @classmethod
    def host(cls, params: SamplingParams) -> "Sampling":
        """Numpy scalars for one request (placed on device by the engine)."""
        return cls(
            temperature=np.float32(params.temperature),
            top_k=np.int32(params.top_k),
            top_p=np.float32(params.top_p),
            seed=np.uint32(params.seed % 2**32),
        )


def _filtered_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature-scaled logits [B, V] with tokens outside top-k / top-p set to -inf."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [B, 1]
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    n_keep = jnp.maximum(jnp.sum(before < s.top_p[:, None], axis=-1), 1)
    threshold = jnp.take_along_axis(ordered, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(scaled >= jnp.maximum(kth, threshold), scaled, -jnp.inf)


def sample(logits: jax.Array, s: Sampling, positions: jax.Array) -> jax.Array:
    """Next token [B] int32 from f32 logits [B, V]; positions [B] index the random stream."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic():
        keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, positions)
        drawn = jax.vmap(jax.random.categorical)(keys, _filtered_logits(logits, s)).astype(jnp.int32)
        return jnp.where(s.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), stochastic, lambda: greedy)
