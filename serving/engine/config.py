"""Model architecture configs: one frozen dataclass, static under `jit`, plus exact-name presets.

A `ModelConfig` says what the network is (sizes, RoPE base, tying) and how it runs (activation and
weight dtypes, int8 weights / KV cache, KV block size of the decode attention loop). Variants are
made with `dataclasses.replace`; nothing mutates a config.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from serving.protocol import KV_BLOCK


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Hashable, so it can be a static argument of jitted functions."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    eos_id: int = 2
    # How it runs.
    dtype: str = "float32"  # activations and KV cache (when not int8)
    weight_dtype: str = "float32"  # unquantized weights
    quantize_weights: bool = False  # int8 per-channel weights (quant.QuantArray leaves)
    quantize_kv: bool = False  # int8 KV cache with per-token/per-head scales
    # False keeps wo (attention output projection) float under int8 weights: int8 activations at
    # the attention output, with int8 everywhere else, flipped SmolLM2's answers ("What is the
    # capital of France?" lost "Paris"); wo is the smallest weight whose float product restores
    # them (7% of the weights).
    quantize_attention_output: bool = True
    kv_block: int = KV_BLOCK  # decode attention walks the cache in blocks of this many positions

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def act_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def param_dtype(self):
        return jnp.dtype(self.weight_dtype)


# Exact-name presets. SmolLM2's sizes are also read from its GGUF; the loader checks they agree.
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        rope_base=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
    # Random weights for fast unit tests. 4 q / 2 kv heads: TP=2 shards heads, TP=4/8 replicates them.
    "tiny": ModelConfig(
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        rope_base=10000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        kv_block=16,
    ),
}
PRESETS["tiny-untied"] = dataclasses.replace(PRESETS["tiny"], tie_embeddings=False)  # separate lm head


def preset(name: str) -> ModelConfig:
    """The preset called exactly `name`; a KeyError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model_name {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
