"""Checkpoint loading: `load_checkpoint(settings) -> (ModelConfig, host params, Tokenizer)`.

A loader turns a checkpoint into an architecture `ModelConfig`, host params in the layout of
`model.param_infos` (numpy arrays, or `lazy.LazyTensor`s read only when placed), and a tokenizer.
`load_checkpoint` then applies the run settings (dtypes, int8 weights and KV cache), checks every
array against its declaration, makes each leaf read in its serving dtype (quantized on load unless
the checkpoint already is int8, `checkpoint_is_quantized`), and refuses a checkpoint that does not
have the shapes of the stack preset `model_name` names.

Loaders are tried in order; add a format (MaxText/Orbax) by appending a `Loader`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from serving.engine import model, quant
from serving.engine.config import PRESETS, ModelConfig, check_preset
from serving.engine.loaders import gguf_loader, hf_loader, lazy, npz_loader
from serving.engine.settings import EngineSettings
from serving.engine.tokenizer import ByteTokenizer
from serving.engine_api import Tokenizer

LoadResult = tuple[ModelConfig, dict, Tokenizer]


@dataclasses.dataclass(frozen=True)
class Loader:
    name: str
    matches: Callable[[EngineSettings], bool]
    load: Callable[[EngineSettings], LoadResult]


def _is_random_preset(settings: EngineSettings) -> bool:
    """Exactly a tiny preset's name (`tiny`, `tiny-untied`); any other model_name is informational."""
    name = settings.model_name
    return name in PRESETS and name.startswith("tiny") and not settings.load_parameters_path


def _load_random(settings: EngineSettings) -> LoadResult:
    """Random weights for a preset (tiny test models); byte tokenizer."""
    cfg = PRESETS[settings.model_name]
    return cfg, model.init_params(cfg, settings.seed), ByteTokenizer(eos_id=cfg.eos_id)


def _load_gguf(settings: EngineSettings) -> LoadResult:
    path = settings.load_parameters_path or gguf_loader.bundled_gguf_path()
    return gguf_loader.load_gguf(path)


LOADERS: tuple[Loader, ...] = (
    Loader("random", _is_random_preset, _load_random),
    Loader("hf", lambda s: hf_loader.is_hf_dir(s.load_parameters_path), hf_loader.load_hf_checkpoint),
    Loader(
        "npz", lambda s: s.load_parameters_path.endswith(".npz"), lambda s: npz_loader.load_npz(s.load_parameters_path)
    ),
    Loader("gguf", lambda s: s.load_parameters_path in ("",) or s.load_parameters_path.endswith(".gguf"), _load_gguf),
)


def runtime_config(arch: ModelConfig, settings: EngineSettings) -> ModelConfig:
    """The architecture with the run's dtypes and int8 choices."""
    return dataclasses.replace(
        arch,
        dtype=settings.dtype,
        weight_dtype=settings.weight_dtype,
        quantize_weights=settings.quantization == "int8",
        quantize_kv=settings.quantize_kvcache,
        quantize_attention_output=settings.quantize_attention_output,
        scan_layers=settings.scan_layers,
    )


def _check_shape(value, info: model.ArrayInfo, path) -> None:
    if tuple(np.shape(value)) != info.shape:
        raise ValueError(
            f"checkpoint array {jax.tree_util.keystr(path)} has shape {np.shape(value)}, expected {info.shape}"
        )


def prepare_params(cfg: ModelConfig, params: dict, already_quantized: bool) -> dict:
    """Check host params against `model.param_infos(cfg)`; each float leaf becomes a LazyTensor
    read in its serving dtype, or int8-quantized as it is read."""
    float_infos = model.param_infos(dataclasses.replace(cfg, quantize_weights=False))
    has_quant = any(
        isinstance(x, quant.QuantArray)
        for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, quant.QuantArray))
    )
    if has_quant != already_quantized:
        state = "is" if has_quant else "is not"
        raise ValueError(f"checkpoint {state} int8 but checkpoint_is_quantized={already_quantized}")
    if has_quant and not cfg.quantize_weights:
        raise ValueError("checkpoint is int8: set quantization=int8 to serve it")

    def prepare(path, info: model.ArrayInfo, value):
        if isinstance(value, quant.QuantArray):
            _check_shape(value.values, info, path)
            return value
        _check_shape(value, info, path)
        if not isinstance(value, lazy.LazyTensor):
            value = lazy.from_view(lambda value=value: value, np.shape(value), np.asarray(value).dtype)
        if cfg.quantize_weights and model.quantized(info):
            return lazy.quantized(value, info.contract)
        return value.cast(info.dtype)

    params = model.split_layers(cfg, params, lazy.layer_of)  # loaders stack the layers
    return jax.tree_util.tree_map_with_path(prepare, float_infos, params, is_leaf=model.is_info)


def load_checkpoint(settings: EngineSettings) -> LoadResult:
    """(runtime ModelConfig, host params ready for placement, tokenizer) for the settings."""
    for loader in LOADERS:
        if loader.matches(settings):
            arch, params, tokenizer = loader.load(settings)
            check_preset(settings.model_name, arch)
            cfg = runtime_config(arch, settings)
            return cfg, prepare_params(cfg, params, settings.checkpoint_is_quantized), tokenizer
    names = ", ".join(loader.name for loader in LOADERS)
    raise ValueError(
        f"no loader for model_name={settings.model_name!r} load_parameters_path="
        f"{settings.load_parameters_path!r} (formats: {names}; tiny presets: "
        f"{', '.join(n for n in PRESETS if n.startswith('tiny'))})"
    )
