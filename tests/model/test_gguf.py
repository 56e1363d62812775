"""The GGUF loader and tokenizer on the bundled SmolLM2 file (no reference implementation needed)."""

from __future__ import annotations

import dataclasses

import numpy as np

from serving.engine.config import preset
from serving.engine.loaders import gguf_loader


def test_config_matches_preset_and_params_have_declared_shapes(smollm_raw):
    cfg, params, _ = smollm_raw
    assert dataclasses.replace(cfg, norm_eps=1e-5) == preset("smollm2-135m")  # GGUF stores eps as f32
    assert params["layers"]["wq"].shape == (30, 9, 64, 576) and params["embed"].shape == (49152, 576)
    assert "lm_head" not in params and all(np.isfinite(params["final_norm"]))


def test_unpermute_inverts_llama_cpp_permutation():
    n_heads, head_dim, cols = 3, 8, 5
    w = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    permuted = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)  # llama.cpp convert
    np.testing.assert_array_equal(gguf_loader.unpermute_rope_rows(permuted, n_heads), w)


def test_tokenizer_round_trip_special_tokens_and_chat_template(smollm_raw):
    tok = smollm_raw[2]
    text = "Hello, world! 123 héllo 😀\n\tend"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") == [1, 4093] and tok.encode("<|im_end|>") == [2]
    assert tok.eos_ids == {0, 2} and tok.vocab_size == 49152
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert with_system.startswith("<|im_start|>system\nS<|im_end|>\n")
