"""Each servable family from a Hugging Face checkpoint directory equals transformers: the same 16
greedy tokens and last-position logprobs within 1e-3 (float32), for float32, bfloat16 and sharded
safetensors; and checkpoints this server does not compute are refused, naming the key.

Measured (CPU, float32): greedy tokens equal for every family and format; largest logprob
difference 4.8e-6 (qwen2 bf16) .. 1.1e-5 (llama2, llama3 bf16); logprobs span about 12..15 nats.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from serving.engine.config import SERVABLE_ARCHITECTURES, check_preset
from serving.engine.loaders import hf_loader, load_checkpoint
from serving.server.settings import ServingSettings
from tests.model import hf_families as families

LOGPROB_ATOL = 1e-3


def _compare(path, devices, arch_change=None, **overrides):
    prompt = families.prompt_ids()
    hf_tokens, hf_logprobs = families.hf_reference(path, prompt)
    arch, params = hf_loader.read_checkpoint(path, families.MAX_TARGET)
    if arch_change:
        arch = dataclasses.replace(arch, **arch_change)
    ours = families.our_reference(arch, params, prompt, devices, **overrides)
    return hf_tokens, ours.tokens, float(np.abs(hf_logprobs - ours.logprobs).max())


CASES = [(name, "float32", None) for name in families.family_configs()] + [
    ("llama3", "bfloat16", None),
    ("qwen2", "bfloat16", None),
    ("llama3", "float32", "20KB"),  # several model-0000N-of-0000M.safetensors + index
]


@pytest.mark.parametrize("name, dtype, shard", CASES, ids=[f"{n}-{d}-{'sharded' if s else 'one'}" for n, d, s in CASES])
def test_family_equals_transformers(tmp_path, one_device, name, dtype, shard):
    path = families.save_family(name, tmp_path, dtype, shard)
    if shard:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / hf_loader.INDEX_FILE).is_file()
    hf_tokens, our_tokens, diff = _compare(path, one_device)
    print(f"{name} {dtype}: max |logprob diff| {diff:.2e}")
    assert our_tokens == hf_tokens
    assert diff < LOGPROB_ATOL


def test_unscanned_layers_equal_transformers(tmp_path, one_device):
    """scan_layers=false reads each layer's tensors on their own (no stacked copy) and unrolls the
    layer loop: still transformers' tokens and logprobs."""
    hf_tokens, our_tokens, diff = _compare(families.save_family("llama3", tmp_path), one_device, scan_layers=False)
    assert our_tokens == hf_tokens
    assert diff < LOGPROB_ATOL


@pytest.mark.parametrize("name, change", [("llama3", {"rope_freq_factors": ()}), ("qwen2", {"qkv_bias": False})])
def test_the_comparison_sees_rope_scaling_and_biases(tmp_path, one_device, name, change, monkeypatch):
    """Without llama3 scaling or the biases the logprobs differ far beyond the tolerance: the
    equivalence above does depend on them."""
    path = families.save_family(name, tmp_path)
    if "qkv_bias" in change:  # params without the bias leaves, as a bias-free checkpoint would give
        monkeypatch.setattr(hf_loader, "read_config", _without_bias(hf_loader.read_config))
    _, _, diff = _compare(path, one_device, change)
    assert diff > 100 * LOGPROB_ATOL


def _without_bias(read_config):
    return lambda path, length: dataclasses.replace(read_config(path, length), qkv_bias=False)


def test_config_is_read_from_config_json(tmp_path):
    cfg = hf_loader.read_config(families.save_family("llama3", tmp_path), families.MAX_TARGET)
    assert (cfg.architecture, cfg.head_dim, cfg.n_kv_heads, cfg.tie_embeddings) == ("LlamaForCausalLM", 32, 2, False)
    assert cfg.rope_base == 500000.0 and len(cfg.rope_freq_factors) == 16
    assert {1.0, 8.0} <= set(cfg.rope_freq_factors) and any(1 < f < 8 for f in cfg.rope_freq_factors)
    qwen = hf_loader.read_config(families.save_family("qwen2", tmp_path / "q"), families.MAX_TARGET)
    assert qwen.qkv_bias and qwen.tie_embeddings and qwen.architecture == "Qwen2ForCausalLM"


def _write_config(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _refusal(tmp_path, context_length=families.MAX_TARGET, **config) -> str:
    with pytest.raises(hf_loader.CheckpointError) as error:
        hf_loader.read_config(_write_config(tmp_path, **config), context_length)
    return str(error.value)


def test_gemma_and_other_architectures_are_refused_naming_them_and_the_supported_list(tmp_path):
    for name in ("GemmaForCausalLM", "Gemma2ForCausalLM", "PhiForCausalLM"):
        message = _refusal(tmp_path, architectures=[name], model_type="x")
        assert name in message and all(servable in message for servable in SERVABLE_ARCHITECTURES)
    assert "'gemma'" in _refusal(tmp_path, model_type="gemma")  # no architectures key: the model type


def test_features_not_computed_are_refused_naming_the_key(tmp_path):
    llama = families.family_configs()["llama3"].to_dict()
    mistral = families.family_configs()["mistral"].to_dict()
    window = _refusal(tmp_path, **{**mistral, "architectures": ["MistralForCausalLM"], "sliding_window": 16})
    assert "sliding_window=16" in window and "max_target_length=64" in window
    hf_loader.read_config(_write_config(tmp_path, **{**mistral, "sliding_window": 4096}), families.MAX_TARGET)
    assert "attention_bias" in _refusal(tmp_path, **{**llama, "attention_bias": True})
    assert "hidden_act" in _refusal(tmp_path, **{**llama, "hidden_act": "gelu"})
    assert "'linear'" in _refusal(tmp_path, **{**llama, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})


def test_a_checkpoint_that_is_not_the_stack_preset_is_refused_naming_both_sides(tmp_path):
    cfg = hf_loader.read_config(families.save_family("llama3", tmp_path), families.MAX_TARGET)
    check_preset("some-other-name", cfg)  # not a stack preset: model_name is informational
    with pytest.raises(ValueError, match=r"llama3.1-8b.*n_layers: checkpoint 2 vs preset 32"):
        check_preset("llama3.1-8b", cfg)
    with pytest.raises(ValueError, match=r"not a llama2-7b.*n_kv_heads: checkpoint 3 vs preset 32"):
        load_checkpoint(ServingSettings(model_name="llama2-7b").engine_settings())  # the bundled SmolLM2 GGUF


def test_a_directory_loads_through_load_checkpoint_with_its_tokenizer(tmp_path, monkeypatch):
    """The server's entry point picks the Hugging Face loader for a directory holding config.json
    and takes the tokenizer from the directory (the tokenizer module's constructor)."""
    from serving.engine import tokenizer

    path = families.save_family("qwen2", tmp_path)
    monkeypatch.setattr(
        tokenizer, "tokenizer_from_hf_dir", lambda directory: ("tokenizer of", directory), raising=False
    )
    settings = ServingSettings(
        load_parameters_path=str(path), max_prefill_predict_length=32, max_target_length=64, weight_dtype="bfloat16"
    ).engine_settings()
    cfg, params, loaded_tokenizer = load_checkpoint(settings)
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.weight_dtype == "bfloat16"
    assert np.asarray(params["layers"]["wq"]).dtype == np.dtype("bfloat16") and loaded_tokenizer == (
        "tokenizer of",
        path,
    )
    with pytest.raises(ValueError, match="not a llama3.1-8b"):
        load_checkpoint(dataclasses.replace(settings, model_name="llama3.1-8b"))
