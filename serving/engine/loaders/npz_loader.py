"""This server's own numpy checkpoint: one .npz with the params (optionally int8), config and tokenizer.

It is the target of the offline converter (`python -m serving.convert`), so a quantized checkpoint
can be served with `quantization=int8 checkpoint_is_quantized=true load_parameters_path=model-int8.npz`.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from serving.engine import model, quant
from serving.engine.config import ModelConfig
from serving.engine.tokenizer import HFTokenizer

_ARCH_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_dim",
    "rope_base",
    "norm_eps",
    "tie_embeddings",
    "eos_id",
    "kv_block",
)


def _key(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def save_npz(path: str, cfg: ModelConfig, params: dict, tokenizer: HFTokenizer) -> None:
    """Write host params (float or QuantArray leaves) with the architecture and tokenizer."""
    arrays = {_key(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    quantized = any(
        isinstance(x, quant.QuantArray)
        for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, quant.QuantArray))
    )
    meta = {
        "config": {f: getattr(cfg, f) for f in _ARCH_FIELDS},
        "quantized": quantized,
        "eos_ids": sorted(tokenizer.eos_ids),
        "chat_template": tokenizer.chat_template,
        "special_tokens": tokenizer.special_tokens,
    }
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    arrays["__tokenizer__"] = np.frombuffer(tokenizer.to_json().encode(), np.uint8)
    np.savez(path, **arrays)


def load_npz(path: str):
    """(ModelConfig, host params, tokenizer) from a file written by `save_npz`."""
    with np.load(path) as data:
        meta = json.loads(data["__meta__"].tobytes())
        cfg = ModelConfig(**{f: meta["config"][f] for f in _ARCH_FIELDS})  # files may carry retired fields
        template = model.param_infos(dataclasses.replace(cfg, quantize_weights=meta["quantized"]))
        params = jax.tree_util.tree_map_with_path(lambda p, _: data[_key(p)], template, is_leaf=model.is_info)
        tokenizer = HFTokenizer.from_json(
            data["__tokenizer__"].tobytes().decode(),
            meta["eos_ids"],
            meta["chat_template"],
            meta.get("special_tokens", {}),  # absent in files written before templates saw special tokens
        )
    return cfg, params, tokenizer
