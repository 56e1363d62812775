"""serving/server/settings.py: MaxText-style key=value arguments."""

from __future__ import annotations

import dataclasses

import pytest

from serving.engine.settings import DEFAULT_DECODE_SLOTS, EngineSettings
from serving.server.settings import (
    DISAGGREGATED_SERVER,
    ServingSettings,
    SettingsError,
    parse_settings,
)


def test_defaults():
    s = parse_settings([])
    assert s == ServingSettings(given=frozenset())
    assert (s.max_prefill_predict_length, s.max_target_length, s.ignored) == (1024, 2048, ())
    assert not s.disaggregated
    assert (s.quantization, s.quantize_kvcache) == ("", False)  # MaxText's, on every backend but CPU


def test_slots_default_spreads_over_the_devices():
    assert DEFAULT_DECODE_SLOTS == 32
    assert [ServingSettings().engine_settings().slots_per_device(n) for n in (1, 3, 8, 64)] == [32, 11, 4, 1]
    assert ServingSettings(per_device_batch_size=2).engine_settings().slots_per_device(8) == 2


def test_the_engine_gets_every_field_it_reads_from_the_arguments():
    """Each EngineSettings field comes from the argument of the same key (inference_server decides
    `disaggregated`); the values differ from every default, so a field mapped from the wrong one fails."""
    s = parse_settings(
        [
            "model_name=tiny-untied",
            "load_parameters_path=/models/m.gguf",
            "seed=7",
            "max_prefill_predict_length=64",
            "max_target_length=256",
            "per_device_batch_size=3",
            "ici_fsdp_parallelism=2",
            "ici_autoregressive_parallelism=4",
            "ici_tensor_parallelism=8",
            "weight_dtype=bfloat16",
            "dtype=bfloat16",
            "quantization=int8",
            "quantize_kvcache=true",
            "quantize_attention_output=false",
            "scan_layers=false",
            "cpu_kernels=false",
            "checkpoint_is_quantized=true",
            f"inference_server={DISAGGREGATED_SERVER}",
            "prefix_cache_tokens=512",
        ]
    )
    engine = s.engine_settings()
    assert isinstance(engine, EngineSettings)
    shared = {f.name for f in dataclasses.fields(EngineSettings)} - {"disaggregated", "prefix_cache_tokens"}
    assert {name: getattr(engine, name) for name in shared} == {name: getattr(s, name) for name in shared}
    assert engine.disaggregated and not ServingSettings().engine_settings().disaggregated
    defaults = ServingSettings()
    assert all(getattr(engine, name) != getattr(defaults, name) for name in shared)
    assert engine.prefix_cache_tokens == 512 and defaults.engine_settings().prefix_cache_tokens == 8192
    off = parse_settings(["prefix_cache_tokens=512", "enable_prefix_caching=false"]).engine_settings()
    assert off.prefix_cache_tokens == 0


def test_a_negative_prefix_cache_size_is_refused_naming_the_key():
    with pytest.raises(SettingsError, match="prefix_cache_tokens=-1: expected a size in tokens >= 0"):
        parse_settings(["prefix_cache_tokens=-1"])


def test_cpu_defaults_apply_only_to_what_the_arguments_left_unset():
    cpu = parse_settings([]).for_backend("cpu")
    assert (cpu.quantization, cpu.quantize_kvcache, cpu.quantize_attention_output) == ("int8", True, False)
    # MaxText's int8 (the stack's): every matmul weight int8, as its planner counts them
    assert parse_settings(["quantization=int8"]).for_backend("cpu").quantize_attention_output
    assert parse_settings([]).for_backend("tpu") == parse_settings([])
    chosen = parse_settings(["weight_dtype=float32", "dtype=float32"]).for_backend("cpu")
    assert (chosen.quantization, chosen.quantize_kvcache) == ("", False)
    kv_only = parse_settings(["quantize_kvcache=false"]).for_backend("cpu")
    assert (kv_only.quantization, kv_only.quantize_kvcache) == ("int8", False)
    # quantize_attention_output says what int8 covers; alone it keeps the CPU's int8 default
    all_int8 = parse_settings(["quantize_attention_output=true"]).for_backend("cpu")
    assert (all_int8.quantization, all_int8.quantize_attention_output) == ("int8", True)
    # settings built in code (not parsed) mean exactly what they say
    assert ServingSettings().for_backend("cpu") == ServingSettings()


def test_lws_argument_list_is_honoured():
    s = parse_settings(
        [
            "MaxText/configs/base.yml",
            "model_name=llama3.1-405b",
            "max_prefill_predict_length=512",
            "max_target_length=1024",
            "per_device_batch_size=2",
            "ici_tensor_parallelism=8",
            "ici_autoregressive_parallelism=2",
            "quantization=int8",
            "quantize_kvcache=true",
            "enable_model_warmup=false",
            "weight_dtype=bfloat16",
            f"inference_server={DISAGGREGATED_SERVER}",
            "scan_layers=false",
            "compute_axis_order=0,1,2,3",
        ]
    )
    assert s.model_name == "llama3.1-405b"
    assert (s.max_prefill_predict_length, s.max_target_length, s.per_device_batch_size) == (512, 1024, 2)
    assert (s.ici_tensor_parallelism, s.ici_autoregressive_parallelism) == (8, 2)
    assert s.quantization == "int8" and s.quantize_kvcache and not s.enable_model_warmup
    assert s.weight_dtype == "bfloat16" and s.disaggregated and not s.scan_layers
    assert s.ignored[0] == "MaxText/configs/base.yml"
    assert s.ignored[1].startswith("compute_axis_order")


def test_later_keys_override_earlier():
    assert parse_settings(["seed=1", "seed=7"]).seed == 7


@pytest.mark.parametrize(
    "args,named",
    [
        (["frobnicate=1"], "frobnicate"),
        (["per_device_batch_size=two"], "per_device_batch_size"),
        (["quantize_kvcache=maybe"], "quantize_kvcache"),
        (["quantization=int4"], "quantization"),
        (["dtype=float16"], "dtype"),
        (["inference_server=Other"], "inference_server"),
        (["ici_tensor_parallelism=0"], "ici_tensor_parallelism"),
        (["ici_fsdp_parallelism=-2"], "ici_fsdp_parallelism"),
        (["per_device_batch_size=-1"], "per_device_batch_size"),
        (["max_prefill_predict_length=0"], "max_prefill_predict_length"),
        (["max_prefill_predict_length=256", "max_target_length=256"], "max_target_length"),
        (["base.yml", "other.yml"], "other.yml"),
        (["seed=1", "base.yml"], "base.yml"),
    ],
)
def test_bad_arguments_name_the_key(args, named):
    with pytest.raises(SettingsError, match=named):
        parse_settings(args)


def test_fill_in_parallelism_is_allowed():
    assert parse_settings(["ici_tensor_parallelism=-1"]).ici_tensor_parallelism == -1
