"""Model architecture configs: one frozen dataclass, static under `jit`, plus exact-name presets.

A `ModelConfig` says what the network is (sizes, RoPE base and per-frequency factors, q/k/v biases,
tying) and how it runs (activation and weight dtypes, int8 weights / KV cache, KV block size of the
decode attention loop). Variants are made with `dataclasses.replace`; nothing mutates a config.

`SERVABLE_ARCHITECTURES` is the data the server refuses other checkpoints with (and the stack
refuses other presets with at preview); `PRESETS` holds the stack's model presets by their names,
so a checkpoint that does not have the shapes of the preset it is deployed as is refused at start
(`check_preset`).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from serving.protocol import KV_BLOCK

# Hugging Face `architectures` names this server computes exactly as transformers does. Mistral's
# checkpoints are Llama's network (its sliding window is refused by the loader when it would apply).
SERVABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


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
    # Per-frequency divisors of RoPE's inverse frequencies (head_dim / 2 of them), as llama.cpp's
    # `rope_freqs` tensor stores them; () for plain RoPE. Llama 3.1+ `llama3` scaling is one.
    rope_freq_factors: tuple[float, ...] = ()
    qkv_bias: bool = False  # Qwen 2: biases on the q, k and v projections
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    eos_id: int = 2
    architecture: str = "LlamaForCausalLM"  # the checkpoint's Hugging Face class name
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
    # Layers stacked on a leading L axis and run by one `lax.scan` (compile time flat in depth), or
    # (False) held as one weight tree per layer and unrolled: XLA:CPU copies each layer's slice of
    # a stacked weight before every product, and converts a bfloat16 stack to float32 whole first.
    scan_layers: bool = True
    # int8 and bfloat16 products on serving/engine/cpu_matmul's AVX-512 kernels (quant.einsum): the
    # engine sets it on one CPU device whose CPU has them; XLA:CPU's own dots use neither VNNI nor
    # AVX512_BF16.
    cpu_kernels: bool = False

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError(
                f"rope_freq_factors has {len(self.rope_freq_factors)} entries, expected head_dim/2 = "
                f"{self.head_dim // 2}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def act_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def param_dtype(self):
        return jnp.dtype(self.weight_dtype)


def llama3_rope_factors(
    head_dim: int,
    rope_base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> tuple[float, ...]:
    """Llama 3.1's `llama3` RoPE scaling as per-frequency divisors: long wavelengths are divided by
    `factor`, short ones kept, the band between interpolated (transformers' and llama.cpp's rule)."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    factors = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * rope_base ** (2 * i / head_dim)
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(float(factor))
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


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

# The stack's model presets (components/core/models.py; a contract test keeps the shapes equal).
_LLAMA2 = {"vocab_size": 32000, "head_dim": 128, "rope_base": 10000.0, "tie_embeddings": False, "eos_id": 2}
_LLAMA31 = {
    "vocab_size": 128256,
    "head_dim": 128,
    "rope_base": 500000.0,
    "tie_embeddings": False,
    "eos_id": 128009,
    "rope_freq_factors": llama3_rope_factors(128, 500000.0, 8.0, 1.0, 4.0, 8192),
}
PRESETS.update(
    {
        "llama2-7b": ModelConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, **_LLAMA2),
        "llama2-70b": ModelConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_LLAMA2),
        "llama3.1-8b": ModelConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, **_LLAMA31),
        "llama3.1-70b": ModelConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_LLAMA31),
        "llama3.1-405b": ModelConfig(d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, **_LLAMA31),
        # Not servable (GemmaForCausalLM is not in SERVABLE_ARCHITECTURES): kept for its shapes.
        "gemma-7b": ModelConfig(
            vocab_size=256000,
            d_model=3072,
            n_layers=28,
            n_heads=16,
            n_kv_heads=16,
            head_dim=256,
            ffn_dim=24576,
            tie_embeddings=True,
            norm_eps=1e-6,
            eos_id=1,
            architecture="GemmaForCausalLM",
        ),
    }
)

STACK_PRESETS = ("llama2-7b", "llama2-70b", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "gemma-7b")
# The stack presets this server can serve (the stack refuses the others at preview).
SERVABLE_PRESETS = tuple(name for name in STACK_PRESETS if PRESETS[name].architecture in SERVABLE_ARCHITECTURES)
# What a checkpoint must match to be served as a stack preset: the shapes of every weight.
SHAPE_FIELDS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size")


def preset(name: str) -> ModelConfig:
    """The preset called exactly `name`; a KeyError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model_name {name!r}; presets: {', '.join(sorted(PRESETS))}") from None


def check_preset(model_name: str, checkpoint: ModelConfig) -> None:
    """Refuse a checkpoint whose shapes differ from the stack preset `model_name` names (no-op for
    any other name: model_name is then informational). The message names both sides."""
    if model_name not in STACK_PRESETS:
        return
    expected = PRESETS[model_name]
    differ = [f for f in SHAPE_FIELDS if getattr(expected, f) != getattr(checkpoint, f)]
    if differ:
        sides = ", ".join(f"{f}: checkpoint {getattr(checkpoint, f)} vs preset {getattr(expected, f)}" for f in differ)
        raise ValueError(f"the checkpoint is not a {model_name} (model_name={model_name!r}): {sides}")
