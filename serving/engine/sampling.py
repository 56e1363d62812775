"""Per-slot token sampling inside one jitted function: logit bias and penalties, then greedy,
temperature, top-k, top-p, seed; and the log probabilities of the chosen tokens.

Every slot carries its own parameters as arrays, so mixing greedy and sampled requests, or
penalised and plain ones, in one batch never recompiles. The random key of a token is
fold_in(key(seed), position of the token), so a seeded request gives the same text whatever slot
it lands in and whatever runs beside it.

Penalties need to know which tokens a slot has seen: `TokenCounts` holds, per slot, how often each
vocabulary entry was generated so far and whether it is in the prompt ([B, V] each). When no row
of a step uses a bias or a penalty, `adjust_logits` skips all of it (a `lax.cond`), so plain
requests pay only the one-element count update per row. Neutral values are exact identities (x + 0,
x / 1, x * 1, x - 0 * n), so a neutral row's logits stay bit for bit what the model gave even when
rows beside it are penalised.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from serving.engine_api import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
    """Sampling parameters, scalars (one request) or [B] arrays (one per slot); the logit bias is
    [M] or [B, M] (M = MAX_LOGIT_BIAS ids, padded with id 0 and value 0, which adds nothing)."""

    temperature: jax.Array  # f32; 0 = greedy
    top_k: jax.Array  # i32; 0 = off
    top_p: jax.Array  # f32; 1 = off
    seed: jax.Array  # u32
    presence_penalty: jax.Array  # f32; 0 = off
    frequency_penalty: jax.Array  # f32; 0 = off
    repetition_penalty: jax.Array  # f32; 1 = off
    bias_ids: jax.Array  # i32 [M]
    bias_values: jax.Array  # f32 [M]

    @classmethod
    def host(cls, params: SamplingParams) -> Sampling:
        """Numpy values for one request (placed on device by the engine)."""
        bias_ids = np.zeros((MAX_LOGIT_BIAS,), np.int32)
        bias_values = np.zeros((MAX_LOGIT_BIAS,), np.float32)
        for i, (token, value) in enumerate(params.logit_bias):
            bias_ids[i], bias_values[i] = token, value
        return cls(
            temperature=np.float32(params.temperature),
            top_k=np.int32(params.top_k),
            top_p=np.float32(params.top_p),
            seed=np.uint32(params.seed % 2**32),
            presence_penalty=np.float32(params.presence_penalty),
            frequency_penalty=np.float32(params.frequency_penalty),
            repetition_penalty=np.float32(params.repetition_penalty),
            bias_ids=bias_ids,
            bias_values=bias_values,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenCounts:
    """What each slot has seen: output [B, V] i32 (times each token was generated), prompt [B, V]
    bool (the token is in the prompt). One request's are [V]."""

    output: jax.Array
    prompt: jax.Array


def uses_adjustments(s: Sampling) -> jax.Array:
    """[B] bool: the row has a logit bias or a penalty that is not neutral."""
    return (
        (s.presence_penalty != 0)
        | (s.frequency_penalty != 0)
        | (s.repetition_penalty != 1)
        | jnp.any(s.bias_values != 0, axis=-1)
    )


def adjust_logits(logits: jax.Array, s: Sampling, seen: TokenCounts, live: jax.Array) -> jax.Array:
    """Logits [B, V] with vLLM's order of adjustments: logit bias, then the repetition penalty
    (tokens in the prompt or the output), then frequency and presence penalties (output only).
    `seen` may hold more rows than the logits (all slots; only the first B are read, and only when
    a `live` [B] row uses an adjustment)."""
    rows = logits.shape[0]

    def adjusted():
        output, prompt = seen.output[:rows], seen.prompt[:rows]
        biased = logits.at[jnp.arange(rows)[:, None], s.bias_ids].add(s.bias_values)
        generated = output > 0
        rep = s.repetition_penalty[:, None]
        repeated = jnp.where(biased > 0, biased / rep, biased * rep)
        penalised = jnp.where(generated | prompt, repeated, biased)
        counts = output.astype(jnp.float32)
        return penalised - s.frequency_penalty[:, None] * counts - s.presence_penalty[:, None] * generated

    return jax.lax.cond(jnp.any(uses_adjustments(s) & live), adjusted, lambda: logits)


def count_tokens(counts: jax.Array, tokens: jax.Array, live: jax.Array) -> jax.Array:
    """counts [B, V] plus one for each row's new token [B] where `live` [B]."""
    return counts.at[jnp.arange(tokens.shape[0]), tokens].add(live.astype(counts.dtype))


def prompt_presence(tokens: jax.Array, length: jax.Array, vocab: int) -> jax.Array:
    """[V] bool: which tokens occur among the first `length` of the padded prompt tokens [T]."""
    real = (jnp.arange(tokens.shape[0]) < length).astype(jnp.int32)
    return jnp.zeros((vocab,), jnp.int32).at[tokens].add(real) > 0


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
    """Next token [B] int32 from f32 logits [B, V] (already adjusted); positions [B] index the
    random stream."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic():
        keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, positions)
        drawn = jax.vmap(jax.random.categorical)(keys, _filtered_logits(logits, s)).astype(jnp.int32)
        return jnp.where(s.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), stochastic, lambda: greedy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Logprobs:
    """Device twin of engine_api.TokenLogprobs: logprob [N], top_ids and top_logprobs [N, K]."""

    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> Logprobs:
    """Log probabilities under the model's own distribution: of tokens [N] given logits [N, V],
    and the K = MAX_TOP_LOGPROBS most likely tokens (all of them if the vocabulary is smaller)."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    return Logprobs(chosen, top_ids.astype(jnp.int32), top_logprobs)
