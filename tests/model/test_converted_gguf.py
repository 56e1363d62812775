"""A tiny model converted by llama.cpp's own convert_hf_to_gguf.py gives the same tokens as the
Hugging Face directory it came from, and as transformers on that directory.

The fixtures (tests/model/data: a bfloat16 directory and its bf16 GGUF per family) are written by
data/make_converted_fixtures.py. llama3 covers llama.cpp's interleaved q/k rows and its
`rope_freqs` tensor; qwen2 covers the q/k/v biases and tied embeddings.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from serving.engine.loaders import gguf_loader, hf_loader
from tests.model import hf_families as families

DATA = Path(__file__).parent / "data"
LOGPROB_ATOL = 1e-3


@pytest.mark.parametrize("name, architecture", [("llama3", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_converted_gguf_equals_its_directory_and_transformers(one_device, name, architecture):
    directory = DATA / f"{name}-hf"
    reader = gguf.GGUFReader(str(DATA / f"{name}.gguf"))
    gguf_cfg = gguf_loader.read_config(reader)
    hf_cfg, hf_params = hf_loader.read_checkpoint(directory, families.MAX_TARGET)
    assert gguf_cfg.architecture == hf_cfg.architecture == architecture
    np.testing.assert_allclose(gguf_cfg.rope_freq_factors or [1.0], hf_cfg.rope_freq_factors or [1.0], rtol=1e-6)

    prompt = families.prompt_ids()
    from_gguf = families.our_reference(gguf_cfg, gguf_loader.read_params(reader, gguf_cfg), prompt, one_device)
    from_dir = families.our_reference(hf_cfg, hf_params, prompt, one_device)
    hf_tokens, hf_logprobs = families.hf_reference(directory, prompt)
    assert from_gguf.tokens == from_dir.tokens == hf_tokens
    assert np.abs(from_gguf.logprobs - from_dir.logprobs).max() < LOGPROB_ATOL
    assert np.abs(from_gguf.logprobs - hf_logprobs).max() < LOGPROB_ATOL
