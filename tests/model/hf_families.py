"""Tiny random-weight models of each servable family, built with transformers (no download), and
the two sides of an equivalence check: transformers' greedy tokens and logprobs, and ours.

Weights are drawn wider than transformers' default init (std 0.02 makes every logit nearly equal,
so greedy decoding would test nothing): logits then spread over several nats.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from serving.engine import model
from serving.engine.jax_engine import engines_from_params
from serving.engine.loaders import prepare_params, runtime_config
from serving.server.settings import ServingSettings
from tests.model.model_helpers import generate

VOCAB = 272  # the 256 bytes of the fixtures' byte-level tokenizer, its end-of-text token, padding
PROMPT_LENGTH = 12
N_TOKENS = 16
MAX_PREFILL = 32
MAX_TARGET = 64
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.3,
    "max_position_embeddings": MAX_TARGET,
}
# Llama 3.1's scaling with a short original context, so that every band (kept, interpolated,
# divided by `factor`) holds some of the 16 frequencies of head_dim 32.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 500000.0,
}


def family_configs():
    """name -> a transformers config of one servable family."""
    import transformers

    return {
        # Llama 3.x: llama3 RoPE scaling, untied, GQA, head_dim given explicitly (32 != 64 / 4)
        "llama3": transformers.LlamaConfig(
            **SMALL, head_dim=32, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False
        ),
        # Llama 3.2 1B/3B: the same with tied embeddings
        "llama3-tied": transformers.LlamaConfig(
            **SMALL, head_dim=32, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True
        ),
        # Llama 2: plain RoPE, as many KV heads as query heads, untied
        "llama2": transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=False),
        "mistral": transformers.MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=False),
        # Qwen 2 / 2.5: q/k/v biases, tied embeddings
        "qwen2": transformers.Qwen2Config(**SMALL, tie_word_embeddings=True, rope_theta=1000000.0),
    }


def save_family(name: str, path: Path, dtype: str = "float32", max_shard_size: str | None = None) -> Path:
    """Build family `name` with seeded random weights and save it as safetensors in `path`."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(family_configs()[name], dtype=torch.float32)
    with torch.no_grad():  # biases are zero-initialised by transformers: give them values too
        for param_name, param in hf_model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0.0, 0.5)
    hf_model = hf_model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf_model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def hf_reference(path: Path, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """transformers in float32: greedy tokens (plain argmax, KV cache, no stop) and the log-softmax
    at the last position of prompt + those tokens."""
    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seq, past, feed = list(prompt), None, list(prompt)
    with torch.no_grad():
        for _ in range(N_TOKENS):
            out = hf_model(torch.tensor([feed]), past_key_values=past, use_cache=True)
            past, feed = out.past_key_values, [int(out.logits[0, -1].argmax())]
            seq += feed
        logits = hf_model(torch.tensor([seq[:-1]])).logits[0, -1]
    return seq[len(prompt) :], torch.log_softmax(logits, -1).numpy()


@dataclasses.dataclass
class Ours:
    tokens: list[int]
    logprobs: np.ndarray


def our_engine(arch, host_params, devices, **overrides):
    settings = ServingSettings(
        max_prefill_predict_length=MAX_PREFILL, max_target_length=MAX_TARGET, per_device_batch_size=1, **overrides
    ).engine_settings()
    cfg = runtime_config(arch, settings)
    return engines_from_params(settings, cfg, prepare_params(cfg, host_params, False), None, devices)


def our_reference(arch, host_params, prompt: list[int], devices, **overrides) -> Ours:
    """Our engine in float32 (ServingSettings `overrides` aside): greedy tokens through prefill +
    decode, and the log-softmax at the last position of prompt + those tokens (prefill of the
    whole sequence)."""
    engines = our_engine(arch, host_params, devices, **overrides)
    (tokens,) = generate(engines, [prompt], N_TOKENS)
    seq = prompt + tokens[:-1]
    padded = jnp.zeros((1, MAX_PREFILL), jnp.int32).at[0, : len(seq)].set(jnp.array(seq))
    params = engines.generate_engine.load_params()
    logits, _ = jax.jit(model.prefill, static_argnums=0)(engines.model_config, params, padded, len(seq))
    return Ours(tokens, np.asarray(jax.nn.log_softmax(logits[0])))


def prompt_ids(seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, PROMPT_LENGTH)]
