"""What the engine reads of a run's settings: `EngineSettings`, its own type.

The server parses its MaxText-style arguments into settings of its own and maps them onto this type
in one place (`engine_settings` in serving/server/settings.py), so the engine never sees the server's
settings, and a renamed server field fails where that mapping is written, not inside the engine. Fields keep
MaxText's key names because the engine's error messages name them (`set quantization=int8`,
`ici_tensor_parallelism=3`). Pure Python, no JAX: the server's settings module imports it.
"""

from __future__ import annotations

import dataclasses

# Decode slots when per_device_batch_size is not given (0): spread over the generate mesh's devices.
# 32 serves 32 concurrent clients at once; idle slots cost nothing (the engine runs only the
# rows up to the highest live slot).
DEFAULT_DECODE_SLOTS = 32

# The prefix cache's default size: eight prompts of the default 1,024-token prefill length. Its
# memory is this many positions of one slot's KV cache (SmolLM2-135M in float32: 46 KB a token,
# 0.4 GB; a Llama 3.2 1B shape in bfloat16: 32 KB a token).
DEFAULT_PREFIX_CACHE_TOKENS = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """The checkpoint, its serving formats, the cache and batch sizes, and the device mesh."""

    model_name: str  # a tiny preset's name means random weights; else the preset the checkpoint must match
    load_parameters_path: str  # checkpoint; empty = the bundled SmolLM2 GGUF
    seed: int  # random weights of the tiny presets
    max_prefill_predict_length: int
    max_target_length: int
    per_device_batch_size: int  # 0: DEFAULT_DECODE_SLOTS over the engine's devices
    ici_fsdp_parallelism: int
    ici_autoregressive_parallelism: int
    ici_tensor_parallelism: int  # -1: all remaining devices
    weight_dtype: str
    dtype: str  # activations
    quantization: str  # "" or "int8"
    quantize_kvcache: bool
    quantize_attention_output: bool  # false: wo stays float under int8 (ModelConfig)
    scan_layers: bool  # false: one weight tree per layer, the layer loop unrolled (ModelConfig)
    cpu_kernels: bool  # int8/bfloat16 products on cpu_matmul's kernels where they run (one CPU device)
    checkpoint_is_quantized: bool
    disaggregated: bool  # prefill and generate engines on separate halves of the devices
    prefix_cache_tokens: int = 0  # token positions the prefix cache keeps (prefill engine); 0: no prefix cache

    def slots_per_device(self, devices: int) -> int:
        """per_device_batch_size, or DEFAULT_DECODE_SLOTS over `devices` (rounded up) when unset."""
        return self.per_device_batch_size or -(-DEFAULT_DECODE_SLOTS // devices)
