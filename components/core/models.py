"""Model presets: architecture numbers for the planner and the MaxText/JetStream serving recipe.

A preset is plain data. The architecture fields (parameters, layers, heads, KV heads, head dim,
vocabulary) feed the HBM planner; the recipe fields say which MaxText flags the server gets, in
which order, and with which fixed values. Values the user controls (checkpoint, lengths, batch,
parallelism, quantization) are *derived* by the stack and only their position comes from here.
Every flag stays overridable through the `serverFlags` config key.

The two reference deployments' recipes are reproduced flag for flag (llama3.1-405b interleaved on
v6e-16, llama2-70b disaggregated on 2 x v6e-8); the other presets use the generic recipe.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

# The flag order of a recipe. Derived flags are emitted only when the recipe lists them, so a
# recipe can leave e.g. tokenizer_path to its base config file.
GENERIC_FLAG_ORDER = (
    "tokenizer_path",
    "model_name",
    "load_parameters_path",
    "max_prefill_predict_length",
    "max_target_length",
    "ici_fsdp_parallelism",
    "ici_autoregressive_parallelism",
    "ici_tensor_parallelism",
    "scan_layers",
    "weight_dtype",
    "per_device_batch_size",
    "quantization",
    "quantize_kvcache",
    "checkpoint_is_quantized",
    "enable_single_controller",
    "stack_prefill_result_cache",
    "inference_server",
    "enable_model_warmup",
)

GENERIC_FIXED_FLAGS = types.MappingProxyType(
    {"scan_layers": "false", "weight_dtype": "bfloat16", "enable_model_warmup": "true"}
)

EMPTY: Mapping[str, str] = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """One servable model: architecture for planning, recipe for the server command line."""

    name: str  # the `model` config value
    maxtext_model_name: str  # MaxText model_name=
    params: float  # parameter count
    layers: int
    d_model: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    vocab: int
    ffn_dim: int  # MLP hidden size (gate, up and down projections)
    tie_embeddings: bool  # the output projection reuses the embedding table
    tokenizer_path: str  # MaxText tokenizer asset (emitted when the recipe lists tokenizer_path)
    hf_model_id: str  # the model on the Hugging Face Hub (vLLM's --model and --served-model-name)
    family: str = "llama"  # the architecture (GGUF's general.architecture): which servers can run it
    maxtext_config: str = "MaxText/configs/base.yml"  # positional base config of the server
    # Serving defaults (each overridable by a config key). The parallelism is a recipe, fitted
    # to the slice by the planner (planner.preset_axes): tensor as given, one axis filling in.
    per_device_batch_size: int = 4
    max_prefill_length: int = 1024
    max_target_length: int = 2048
    tensor_parallelism: int = -1
    autoregressive_parallelism: int = 1
    fsdp_parallelism: int = 1
    startup_probe_delay_seconds: int = 120  # checkpoint restore time before the first probe
    probe_failure_threshold: int = 10  # liveness/readiness failures (one per probe period) before a restart
    # Recipe.
    flag_order: tuple[str, ...] = GENERIC_FLAG_ORDER
    fixed_flags: Mapping[str, str] = dataclasses.field(default_factory=lambda: GENERIC_FIXED_FLAGS)
    # Recipe extras only in disaggregated mode.
    disaggregated_flags: Mapping[str, str] = dataclasses.field(default_factory=lambda: EMPTY)
    resource_manager_flags: tuple[str, ...] = ()  # extra pathways-rm flags of the recipe


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="llama2-7b",
            maxtext_model_name="llama2-7b",
            hf_model_id="meta-llama/Llama-2-7b-hf",
            params=6.74e9,
            layers=32,
            d_model=4096,
            heads=32,
            kv_heads=32,
            head_dim=128,
            vocab=32000,
            ffn_dim=11008,
            tie_embeddings=False,
            tokenizer_path="assets/tokenizer.llama2",
            per_device_batch_size=8,
            startup_probe_delay_seconds=60,
        ),
        ModelPreset(
            name="llama2-70b",
            maxtext_model_name="llama2-70b",
            hf_model_id="meta-llama/Llama-2-70b-hf",
            params=68.98e9,
            layers=80,
            d_model=8192,
            heads=64,
            kv_heads=8,
            head_dim=128,
            vocab=32000,
            ffn_dim=28672,
            tie_embeddings=False,
            tokenizer_path="assets/tokenizer.llama2",
            # The disaggregated reference deployment (2 x v6e-8), flag for flag.
            per_device_batch_size=1,
            tensor_parallelism=-1,
            startup_probe_delay_seconds=240,
            probe_failure_threshold=100,
            flag_order=(
                "tokenizer_path",
                "load_parameters_path",
                "max_prefill_predict_length",
                "max_target_length",
                "model_name",
                "ici_fsdp_parallelism",
                "ici_autoregressive_parallelism",
                "ici_tensor_parallelism",
                "scan_layers",
                "weight_dtype",
                "per_device_batch_size",
                "checkpoint_is_quantized",
                "quantization",
                "quantize_kvcache",
                "compute_axis_order",
                "ar_cache_axis_order",
                "stack_prefill_result_cache",
                "enable_single_controller",
                "inference_server",
                "inference_benchmark_test",
                "enable_model_warmup",
            ),
            fixed_flags=types.MappingProxyType(
                {
                    "scan_layers": "false",
                    "weight_dtype": "bfloat16",
                    # KV-cache layouts the reference deployment tuned for llama2-70b on v6e.
                    "compute_axis_order": "0,2,1,3",
                    "ar_cache_axis_order": "0,2,1,3",
                    "enable_model_warmup": "True",
                }
            ),
            disaggregated_flags=types.MappingProxyType({"inference_benchmark_test": "True"}),
        ),
        ModelPreset(
            name="llama3.1-8b",
            maxtext_model_name="llama3.1-8b",
            hf_model_id="meta-llama/Llama-3.1-8B",
            params=8.03e9,
            layers=32,
            d_model=4096,
            heads=32,
            kv_heads=8,
            head_dim=128,
            vocab=128256,
            ffn_dim=14336,
            tie_embeddings=False,
            tokenizer_path="assets/tokenizer_llama3.tiktoken",
            per_device_batch_size=8,
            startup_probe_delay_seconds=60,
        ),
        ModelPreset(
            name="llama3.1-70b",
            maxtext_model_name="llama3.1-70b",
            hf_model_id="meta-llama/Llama-3.1-70B",
            params=70.55e9,
            layers=80,
            d_model=8192,
            heads=64,
            kv_heads=8,
            head_dim=128,
            vocab=128256,
            ffn_dim=28672,
            tie_embeddings=False,
            tokenizer_path="assets/tokenizer_llama3.tiktoken",
            per_device_batch_size=2,
            startup_probe_delay_seconds=240,
        ),
        ModelPreset(
            name="llama3.1-405b",
            maxtext_model_name="llama3.1-405b",
            hf_model_id="meta-llama/Llama-3.1-405B",
            params=405.85e9,
            layers=126,
            d_model=16384,
            heads=128,
            kv_heads=8,
            head_dim=128,
            vocab=128256,
            ffn_dim=53248,
            tie_embeddings=False,
            tokenizer_path="assets/tokenizer_llama3.tiktoken",
            # The interleaved reference deployment (v6e-16), flag for flag. Its base config sets the
            # tokenizer, so the recipe does not pass tokenizer_path. On a slice other than 16 chips
            # the planner keeps tensor 8 and lets autoregressive take the rest.
            maxtext_config="MaxText/configs/v5e/inference/llama3_405b_v5e-64.yml",
            per_device_batch_size=10,
            tensor_parallelism=8,
            autoregressive_parallelism=2,
            startup_probe_delay_seconds=900,
            flag_order=(
                "model_name",
                "load_parameters_path",
                "max_prefill_predict_length",
                "max_target_length",
                "async_checkpointing",
                "steps",
                "ici_fsdp_parallelism",
                "ici_autoregressive_parallelism",
                "ici_tensor_parallelism",
                "scan_layers",
                "weight_dtype",
                "per_device_batch_size",
                "enable_single_controller",
                "quantization",
                "quantize_kvcache",
                "checkpoint_is_quantized",
                "stack_prefill_result_cache",
                "inference_server",
                "enable_model_warmup",
            ),
            fixed_flags=types.MappingProxyType(
                {
                    "async_checkpointing": "false",
                    "steps": "1",
                    "scan_layers": "false",
                    "weight_dtype": "bfloat16",
                    "enable_model_warmup": "true",
                }
            ),
            # The interleaved reference deployment passes this debugging flag to the resource manager of
            # the 4x4 405B slice.
            resource_manager_flags=(
                "--temporary_flags_for_debugging=temporary_flag_for_debugging_worker_expected_tpu_chip_config=megachip_tccontrol",
            ),
        ),
        ModelPreset(
            name="gemma-7b",
            maxtext_model_name="gemma-7b",
            hf_model_id="google/gemma-7b",
            family="gemma",
            params=8.54e9,
            layers=28,
            d_model=3072,
            heads=16,
            kv_heads=16,
            head_dim=256,
            vocab=256000,
            ffn_dim=24576,
            tie_embeddings=True,
            tokenizer_path="assets/tokenizer.gemma",
            per_device_batch_size=8,
            startup_probe_delay_seconds=60,
        ),
    )
}
