"""SmolLM2-135M-Instruct against an independent implementation: Hugging Face transformers reading
the same GGUF on CPU (it dequantizes to float32 and un-permutes Q/K itself).

Measured (f32, CPU): greedy tokens identical for every prompt (20 tokens each); last-position
logits agree to max |diff| 4e-5..6.3e-5 (logits span about -13..32). Asserted: 1e-3 absolute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.engine import model
from tests.model.model_helpers import PROMPTS, generate

pytestmark = pytest.mark.slow

N_TOKENS = 20
LOGIT_ATOL = 1e-3
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
TEXTS = PROMPTS + [
    "Numbers 12345 and 3.14, émojis 😀 and\ttabs  double  spaces\n\nnew lines",
    "<|im_start|><|endoftext|>x",
]


def test_tokenizer_matches_hf(smollm_raw, hf):
    hf_tok, _ = hf
    ours = smollm_raw[2]
    for text in TEXTS:
        assert ours.encode(text) == hf_tok.encode(text, add_special_tokens=False), text


def test_chat_template_matches_hf_jinja(smollm_raw, hf):
    hf_tok, _ = hf
    ours = smollm_raw[2]
    for messages in CHATS:
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == expected


def _hf_greedy(hf_model, ids: list[int], n_tokens: int) -> tuple[list[int], np.ndarray]:
    """Plain argmax decoding with the HF model (no generation-config processors, no EOS stop);
    also returns the prompt's last-position logits."""
    import torch

    seq, first_logits, past, feed = list(ids), None, None, list(ids)
    with torch.no_grad():
        for _ in range(n_tokens):
            out = hf_model(torch.tensor([feed]), past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1].numpy(), out.past_key_values
            first_logits = logits if first_logits is None else first_logits
            feed = [int(logits.argmax())]
            seq += feed
    return seq[len(ids) :], first_logits


def test_greedy_and_logits_match_hf(smollm_raw, smollm_engines, hf, one_device):
    _, hf_model = hf
    tokenizer = smollm_raw[2]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    engines = smollm_engines(one_device, max_prefill_predict_length=32, max_target_length=64, per_device_batch_size=4)
    ours = generate(engines, prompts, N_TOKENS)

    cfg = engines.model_config
    params = engines.generate_engine.load_params()
    for ids, our_tokens in zip(prompts, ours, strict=False):
        hf_tokens, hf_logits = _hf_greedy(hf_model, ids, N_TOKENS)
        assert our_tokens == hf_tokens, tokenizer.decode(our_tokens)

        padded = jnp.zeros((1, 32), jnp.int32).at[0, : len(ids)].set(jnp.array(ids))
        logits, _ = jax.jit(model.prefill, static_argnums=0)(cfg, params, padded, len(ids))
        diff = np.abs(np.asarray(logits[0]) - hf_logits).max()
        print(f"max |logit diff| {diff:.2e} (logit range {hf_logits.min():.1f}..{hf_logits.max():.1f})")
        assert diff < LOGIT_ATOL
