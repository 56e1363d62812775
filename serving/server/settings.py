"""Server settings from MaxText/JetStream-style `key=value` arguments.

The stack puts MaxText's argument list in the LeaderWorkerSet (a base config path, then
`model_name=... ici_tensor_parallelism=8 ...`), so the bundled server reads the same list:
keys it honours set a field below, keys that only mean something to MaxText's trainer or to its
TPU kernels are accepted and reported once at start (`ServingSettings.ignored`), and any other key
is a startup error that names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from serving.engine.settings import DEFAULT_PREFIX_CACHE_TOKENS, EngineSettings
from serving.protocol import DISAGGREGATED_SERVER, INTERLEAVED_SERVER

# Per JAX backend, what the server runs when the arguments name no weight / KV format. On CPU,
# int8 weights with int8 x int8 matmuls and an int8 KV cache beat float32 at every client count
# (benchmarks/vs_llamacpp.py; README "Speed"). Each default: (value, keys any of which, given,
# leave the field as the arguments say). Other backends keep MaxText's defaults.
# quantize_attention_output alone does not decide the weight format: it only says what int8 means.
WEIGHT_FORMAT_KEYS = frozenset({"quantization", "weight_dtype", "checkpoint_is_quantized"})
BACKEND_DEFAULTS: dict[str, dict[str, tuple[object, frozenset[str]]]] = {
    "cpu": {
        "quantization": ("int8", WEIGHT_FORMAT_KEYS),
        # int8 with wo float: all-int8 lost answers of the bundled SmolLM2 (ModelConfig)
        "quantize_attention_output": (False, WEIGHT_FORMAT_KEYS | {"quantize_attention_output"}),
        "quantize_kvcache": (True, frozenset({"quantize_kvcache", "dtype"})),
    },
}

INFERENCE_SERVERS = (INTERLEAVED_SERVER, DISAGGREGATED_SERVER)

# MaxText keys that do not change what this server computes. Each maps to why.
IGNORED_KEYS = {
    "async_checkpointing": "training only",
    "steps": "training only",
    "compute_axis_order": "TPU kernel layout; XLA picks layouts here",
    "ar_cache_axis_order": "TPU kernel layout; XLA picks layouts here",
    "prefill_cache_axis_order": "TPU kernel layout; XLA picks layouts here",
    "stack_prefill_result_cache": "prefix is always one pytree",
    "inference_benchmark_test": "benchmark harness of MaxText",
    "base_output_directory": "no run outputs",
    "run_name": "no run outputs",
    "attention": "attention kernel is chosen per backend",
    "tokenizer_path": "the tokenizer is read from the checkpoint (GGUF / npz)",
}


class SettingsError(ValueError):
    """A bad key or value; the message names the key and what would be valid."""


def _parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise SettingsError(f"{key}={value!r}: expected true or false")


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{key}={value!r}: expected an integer") from None


def _parse_choice(*choices: str) -> Callable[[str, str], str]:
    def parse(key: str, value: str) -> str:
        if value not in choices:
            raise SettingsError(f"{key}={value!r}: expected one of {', '.join(map(repr, choices))}")
        return value

    return parse


def _parse_str(key: str, value: str) -> str:
    return value


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    """Everything the server runs with, named as in MaxText; the engine's part is `engine_settings()`."""

    model_name: str = "smollm2-135m"  # informational unless it names a tiny test config
    load_parameters_path: str = ""  # checkpoint; empty = the bundled SmolLM2 GGUF
    max_prefill_predict_length: int = 1024
    max_target_length: int = 2048
    per_device_batch_size: int = 0  # 0: the engine's DEFAULT_DECODE_SLOTS over the generate mesh
    ici_fsdp_parallelism: int = 1
    ici_autoregressive_parallelism: int = 1
    ici_tensor_parallelism: int = -1  # -1: all remaining devices
    weight_dtype: str = "float32"
    dtype: str = "float32"  # activations
    quantization: str = ""  # "" or "int8"
    quantize_kvcache: bool = False
    quantize_attention_output: bool = True  # false: wo stays float under int8 (ModelConfig)
    scan_layers: bool = True  # false: one weight tree per layer, the layer loop unrolled (ModelConfig)
    cpu_kernels: bool = True  # int8/bfloat16 products on AVX-512 kernels on one CPU device (cpu_matmul)
    checkpoint_is_quantized: bool = False
    enable_model_warmup: bool = True
    enable_single_controller: bool = False  # Pathways (pathwaysutils)
    inference_server: str = INTERLEAVED_SERVER
    seed: int = 0  # random weights of the tiny test configs
    jax_cache_dir: str = ""  # JAX persistent compilation cache (path or gs:// prefix); "" = off
    enable_prefix_caching: bool = True  # reuse the KV of cached prompt prefixes (vLLM's name)
    prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS  # the prefix cache's size in token positions
    ignored: tuple[str, ...] = ()  # keys accepted but not applicable, reported once at start
    given: frozenset[str] | None = None  # keys the arguments set; None: every field as constructed

    @property
    def disaggregated(self) -> bool:
        return self.inference_server == DISAGGREGATED_SERVER

    def engine_settings(self) -> EngineSettings:
        """What the engine reads of these settings: the one place the server's fields meet the engine's."""
        return EngineSettings(
            model_name=self.model_name,
            load_parameters_path=self.load_parameters_path,
            seed=self.seed,
            max_prefill_predict_length=self.max_prefill_predict_length,
            max_target_length=self.max_target_length,
            per_device_batch_size=self.per_device_batch_size,
            ici_fsdp_parallelism=self.ici_fsdp_parallelism,
            ici_autoregressive_parallelism=self.ici_autoregressive_parallelism,
            ici_tensor_parallelism=self.ici_tensor_parallelism,
            weight_dtype=self.weight_dtype,
            dtype=self.dtype,
            quantization=self.quantization,
            quantize_kvcache=self.quantize_kvcache,
            quantize_attention_output=self.quantize_attention_output,
            scan_layers=self.scan_layers,
            cpu_kernels=self.cpu_kernels,
            checkpoint_is_quantized=self.checkpoint_is_quantized,
            disaggregated=self.disaggregated,
            prefix_cache_tokens=self.prefix_cache_tokens if self.enable_prefix_caching else 0,
        )

    def for_backend(self, backend: str) -> ServingSettings:
        """These settings with `backend`'s BACKEND_DEFAULTS for the fields the arguments left unset."""
        if self.given is None:
            return self
        chosen = {
            field: value
            for field, (value, deciding_keys) in BACKEND_DEFAULTS.get(backend, {}).items()
            if not deciding_keys & self.given
        }
        return dataclasses.replace(self, **chosen)

    def __post_init__(self):
        if self.max_prefill_predict_length <= 0:
            raise SettingsError("max_prefill_predict_length must be > 0")
        if self.max_target_length <= self.max_prefill_predict_length:
            raise SettingsError(
                f"max_target_length ({self.max_target_length}) must exceed "
                f"max_prefill_predict_length ({self.max_prefill_predict_length})"
            )
        if self.per_device_batch_size < 0:
            raise SettingsError("per_device_batch_size must be > 0, or 0 for the default slot count")
        if self.prefix_cache_tokens < 0:
            raise SettingsError(
                f"prefix_cache_tokens={self.prefix_cache_tokens}: expected a size in tokens >= 0 "
                "(0, like enable_prefix_caching=false, turns the prefix cache off)"
            )
        for key in ("ici_fsdp_parallelism", "ici_autoregressive_parallelism", "ici_tensor_parallelism"):
            value = getattr(self, key)
            if value == 0 or value < -1:
                raise SettingsError(f"{key}={value}: expected a positive integer or -1 (fill in)")


_PARSERS: dict[str, Callable[[str, str], object]] = {
    "model_name": _parse_str,
    "load_parameters_path": _parse_str,
    "max_prefill_predict_length": _parse_int,
    "max_target_length": _parse_int,
    "per_device_batch_size": _parse_int,
    "ici_fsdp_parallelism": _parse_int,
    "ici_autoregressive_parallelism": _parse_int,
    "ici_tensor_parallelism": _parse_int,
    "weight_dtype": _parse_choice("float32", "bfloat16"),
    "dtype": _parse_choice("float32", "bfloat16"),
    "quantization": _parse_choice("", "int8"),
    "quantize_kvcache": _parse_bool,
    "quantize_attention_output": _parse_bool,
    "scan_layers": _parse_bool,
    "cpu_kernels": _parse_bool,
    "checkpoint_is_quantized": _parse_bool,
    "enable_model_warmup": _parse_bool,
    "enable_single_controller": _parse_bool,
    "inference_server": _parse_choice(*INFERENCE_SERVERS),
    "seed": _parse_int,
    "jax_cache_dir": _parse_str,
    "enable_prefix_caching": _parse_bool,
    "prefix_cache_tokens": _parse_int,
}


def parse_settings(args: Sequence[str]) -> ServingSettings:
    """Build settings from MaxText-style arguments.

    A leading argument without `=` that ends in .yml/.yaml is MaxText's base config path: accepted
    and reported as ignored (the server's defaults stand in for it). Later keys override earlier ones.
    """
    values: dict[str, object] = {}
    ignored: list[str] = []
    for position, arg in enumerate(args):
        if "=" not in arg:
            if position == 0 and arg.endswith((".yml", ".yaml")):
                ignored.append(arg)
                continue
            raise SettingsError(f"argument {arg!r}: expected key=value (e.g. ici_tensor_parallelism=4)")
        key, value = arg.split("=", 1)
        if key in _PARSERS:
            values[key] = _PARSERS[key](key, value)
        elif key in IGNORED_KEYS:
            ignored.append(f"{key} ({IGNORED_KEYS[key]})")
        else:
            known = ", ".join(sorted(_PARSERS))
            raise SettingsError(f"unknown key {key!r}; known keys: {known}")
    return ServingSettings(**values, ignored=tuple(ignored), given=frozenset(values))
