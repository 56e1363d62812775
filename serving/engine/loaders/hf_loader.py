"""Hugging Face checkpoint directories: `config.json` and one or many `*.safetensors` files.

The architecture comes from `config.json` (`architectures`, else `model_type`), never from a file
name; one outside `config.SERVABLE_ARCHITECTURES`, or a feature this server does not compute (a
sliding window shorter than the served context, biases on other projections, another RoPE
scaling), is refused naming the key. Weights may be float32, float16 or bfloat16, in one
`model.safetensors` or in shards listed by `model.safetensors.index.json`.

Each tensor is memory-mapped on its own when it is placed (`lazy.from_view`): the mapping is copied
straight into the serving dtype (the model keeps PyTorch's [out, in] order, so nothing is
transposed), and closed again, so the host never holds more than the tensor being placed beside
what already is on the devices.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from serving.engine.config import SERVABLE_ARCHITECTURES, ModelConfig, llama3_rope_factors
from serving.engine.loaders import lazy
from serving.engine.settings import EngineSettings

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint this server cannot serve; the message names the file and key."""


def is_hf_dir(path: str) -> bool:
    return bool(path) and (Path(path) / CONFIG_FILE).is_file()


# ---- config.json ---------------------------------------------------------------------------------


def architecture(config: dict) -> str:
    """The Hugging Face class the checkpoint was saved from; refused unless servable."""
    names = config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"), config.get("model_type"))]
    name = names[0]
    if name not in SERVABLE_ARCHITECTURES:
        raise CheckpointError(
            f"{CONFIG_FILE}: architecture {name!r} is not served by this server; "
            f"servable: {', '.join(SERVABLE_ARCHITECTURES)}"
        )
    return name


def _rope(config: dict, head_dim: int) -> tuple[float, tuple[float, ...]]:
    """(rope base, per-frequency factors) from `rope_parameters` (transformers 5) or the older
    `rope_theta` + `rope_scaling`."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    base = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return base, ()
    if kind != "llama3":
        raise CheckpointError(f"{CONFIG_FILE}: rope_type {kind!r} is not supported (default or llama3)")
    factors = llama3_rope_factors(
        head_dim,
        base,
        params["factor"],
        params["low_freq_factor"],
        params["high_freq_factor"],
        params["original_max_position_embeddings"],
    )
    return base, factors


def _refuse_unsupported(config: dict, arch: str, context_length: int) -> None:
    """Features transformers would compute that this server does not: refuse, naming the key."""
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and window is not None and window < context_length:
        raise CheckpointError(
            f"{CONFIG_FILE}: sliding_window={window} is shorter than the served context "
            f"max_target_length={context_length}; sliding-window attention is not implemented "
            f"(serve at most {window} tokens)"
        )
    if arch != "Qwen2ForCausalLM" and config.get("attention_bias"):
        raise CheckpointError(f"{CONFIG_FILE}: attention_bias=true is not supported for {arch}")
    if config.get("mlp_bias"):
        raise CheckpointError(f"{CONFIG_FILE}: mlp_bias=true is not supported")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{CONFIG_FILE}: hidden_act={act!r} is not supported (silu)")


def read_config(path: Path, context_length: int) -> ModelConfig:
    """The architecture of the checkpoint in directory `path`, served up to `context_length` tokens."""
    config = json.loads((path / CONFIG_FILE).read_text())
    arch = architecture(config)
    _refuse_unsupported(config, arch, context_length)
    d_model, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d_model // n_heads
    rope_base, rope_factors = _rope(config, head_dim)
    eos = config.get("eos_token_id")
    return ModelConfig(
        vocab_size=config["vocab_size"],
        d_model=d_model,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        ffn_dim=config["intermediate_size"],
        rope_base=rope_base,
        rope_freq_factors=rope_factors,
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias")),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        architecture=arch,
    )


# ---- safetensors ---------------------------------------------------------------------------------


def _header(file: Path) -> tuple[int, dict]:
    """(offset of the data section, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def tensor_index(path: Path) -> dict[str, tuple[Path, int, dict]]:
    """Every tensor name -> (file, data offset, header entry), over the index's shards or every
    *.safetensors file of the directory."""
    index = path / INDEX_FILE
    if index.is_file():
        files = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
    tensors = {}
    for file in files:
        start, header = _header(file)
        tensors.update({name: (file, start, entry) for name, entry in header.items()})
    return tensors


class _TensorReader:
    """Safetensors tensors as LazyTensors, each memory-mapped only while it is copied out."""

    def __init__(self, path: Path):
        self._tensors = tensor_index(path)

    def tensor(self, name: str, shape: tuple[int, ...], view) -> lazy.LazyTensor:
        if name not in self._tensors:
            raise CheckpointError(f"tensor {name!r} is missing from the safetensors files")
        file, start, entry = self._tensors[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {entry['dtype']}; supported: {', '.join(SAFETENSORS_DTYPES)}"
            )
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        begin = entry["data_offsets"][0]

        def read() -> np.ndarray:
            stored = np.memmap(file, dtype=dtype, mode="r", offset=start + begin, shape=tuple(entry["shape"]))
            return view(stored)

        return lazy.from_view(read, shape, dtype)


# Our params -> the transformers tensor names (in model.layers.N. for the keys of a layer). The
# model keeps PyTorch's [out, in] order, so every tensor is its declared shape after a reshape.
TENSOR_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def read_params(path: Path, cfg: ModelConfig) -> dict:
    """Lazy host params in the layout of `model.param_infos` (layers stacked on axis 0)."""
    tensors = _TensorReader(path)

    def read(key: str, layer: int | None, shape: tuple[int, ...]) -> lazy.LazyTensor:
        name = TENSOR_NAMES[key] if layer is None else f"model.layers.{layer}.{TENSOR_NAMES[key]}"
        return tensors.tensor(name, shape, lambda w: w.reshape(shape))

    return lazy.assemble_params(cfg, read)


def read_checkpoint(path: str | Path, context_length: int) -> tuple[ModelConfig, dict]:
    """(ModelConfig, lazy host params) of a Hugging Face checkpoint directory."""
    path = Path(path)
    cfg = read_config(path, context_length)
    return cfg, read_params(path, cfg)


def load_hf_checkpoint(settings: EngineSettings):
    """`loaders.Loader` entry: (ModelConfig, lazy host params, tokenizer) for the settings."""
    from serving.engine.tokenizer import tokenizer_from_hf_dir  # provided with the HF tokenizer support

    cfg, params = read_checkpoint(settings.load_parameters_path, settings.max_target_length)
    return cfg, params, tokenizer_from_hf_dir(Path(settings.load_parameters_path))
