"""Shared fixtures for the model/engine tests: the SmolLM2 checkpoint is read once per session."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from serving.engine.jax_engine import EngineSet, engines_from_params
from serving.engine.loaders import gguf_loader, prepare_params, runtime_config
from serving.server.settings import ServingSettings


@pytest.fixture(scope="session")
def smollm_raw():
    """(architecture config, float32 host params, tokenizer) straight from the bundled GGUF, read
    once (the loader's params are lazy: every placement would dequantize the file again)."""
    cfg, params, tokenizer = gguf_loader.load_gguf(gguf_loader.bundled_gguf_path())
    return cfg, jax.tree.map(np.asarray, params), tokenizer


@pytest.fixture(scope="session")
def smollm_engines(smollm_raw):
    """engines(devices, **settings) -> EngineSet on the real model, without re-reading the GGUF."""
    arch, raw_params, tokenizer = smollm_raw

    def make(devices, **overrides) -> EngineSet:
        defaults = dict(max_prefill_predict_length=32, max_target_length=64, per_device_batch_size=1)
        settings = ServingSettings(**{**defaults, **overrides}).engine_settings()
        cfg = runtime_config(arch, settings)
        params = prepare_params(cfg, raw_params, already_quantized=False)
        return engines_from_params(settings, cfg, params, tokenizer, devices)

    return make


@pytest.fixture(scope="session")
def one_device():
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def hf():
    """SmolLM2 in Hugging Face transformers (tokenizer, model), reading the bundled GGUF; one per module
    (test_reference.py, test_sampling_reference.py). transformers and torch are test requirements: a
    missing one is an error of every test using it, never a skip."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = gguf_loader.bundled_gguf_path()
    kwargs = dict(gguf_file=path.name)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, **kwargs).eval()
    return tok, hf_model
