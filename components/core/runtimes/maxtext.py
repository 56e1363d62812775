"""MaxText's `key=value` command line, which JetStream's server and the bundled server both read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.core.config import StackConfig

# MaxText flags the planner derives from config keys: overriding them through serverFlags would
# bypass the HBM and sharding checks, so they must be set through their own key.
PLANNED_FLAGS = {
    "model_name": "model",
    "load_parameters_path": "checkpointPath",
    "quantization": "quantization",
    "checkpoint_is_quantized": "quantization",
    "weight_dtype": "quantization",
    "dtype": "quantization",
    "quantize_kvcache": "quantizeKvCache",
    "per_device_batch_size": "perDeviceBatchSize",
    "max_prefill_predict_length": "maxPrefillLength",
    "max_target_length": "maxTargetLength",
    "ici_tensor_parallelism": "tensorParallelism",
    "ici_autoregressive_parallelism": "autoregressiveParallelism",
    "ici_fsdp_parallelism": "fsdpParallelism",
    "inference_server": "mode",
}


def _derived_flags(cfg: StackConfig, axis_flags: Mapping[str, int], load_path: str) -> dict[str, str]:
    flags = {
        "tokenizer_path": cfg.model.tokenizer_path,
        "model_name": cfg.model.maxtext_model_name,
        "load_parameters_path": load_path,
        "max_prefill_predict_length": str(cfg.server.max_prefill_length),
        "max_target_length": str(cfg.server.max_target_length),
        # The axes the plan used (a -1 stays -1: the server fills it in exactly as the planner did).
        **{f"ici_{axis}_parallelism": str(size) for axis, size in axis_flags.items()},
        "per_device_batch_size": str(cfg.server.per_device_batch_size),
        "quantize_kvcache": "true" if cfg.server.quantize_kv_cache else "false",
    }
    if cfg.server.quantization == "int8":
        flags |= {"quantization": "int8", "checkpoint_is_quantized": "true"}
    return flags


def maxtext_args(
    cfg: StackConfig, axis_flags: Mapping[str, int], *, load_path: str, always: Mapping[str, str]
) -> tuple[str, ...]:
    """The server's args: the base config, then key=value flags in the recipe's order.

    `axis_flags` are the ici_* values the plan used (Plan.axis_flags). Recipe flags come in
    `flag_order`; the runtime's `always` flags (mode, memory, metrics) are always present;
    `serverFlags` overrides replace a value in place or are appended.
    """
    values = {**cfg.model.fixed_flags, **_derived_flags(cfg, axis_flags, load_path), **always}
    order = [key for key in cfg.model.flag_order if key in values]
    order += [key for key in always if key not in order]
    values |= cfg.server.flags
    order += [key for key in cfg.server.flags if key not in order]
    return (cfg.model.maxtext_config, *(f"{key}={values[key]}" for key in order))
