"""Token masks in the engine (structured outputs) on the tiny random-weight model: the packed mask is
applied before sampling, on the first token from prefill and at every decode step, greedy and
sampled; an all-ones row changes nothing, token for token."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from serving.engine.constraints import allowed_tokens, apply_token_bitmask
from serving.engine.jax_engine import build_engines
from serving.engine.loaders.gguf_loader import bundled_gguf_path
from serving.engine.tokenizer import tokenizer_from_gguf
from serving.engine_api import GREEDY, SamplingParams
from serving.server.settings import ServingSettings
from tests.model.model_helpers import generate
from tests.model.tokenizer_cases import gguf_tokenizer

IM_END = "<|im_end|>"  # SmolLM2's ChatML end of turn, a control token

TINY = dict(model_name="tiny", max_prefill_predict_length=32, max_target_length=48, per_device_batch_size=4)
PROMPTS = [[5, 6, 7], list(range(10, 30)), [100] * 17, [1, 2]]
WORDS = 256 // 32


def mask_of(allowed: set[int] | None) -> np.ndarray:
    """One packed row: the given ids, or every id (None)."""
    if allowed is None:
        return np.full(WORDS, -1, np.int32)
    bits = np.zeros(WORDS * 32, np.uint8)
    bits[list(allowed)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


@pytest.fixture(scope="module")
def tiny(one_device):
    engines = build_engines(ServingSettings(**TINY).engine_settings(), devices=one_device)
    return engines, engines.generate_engine.load_params()


def test_bitmask_unpacks_bit_j_of_word_w_to_token_32w_plus_j():
    row = mask_of({0, 31, 33, 255})
    assert np.nonzero(np.asarray(allowed_tokens(jnp.asarray(row[None]), 256))[0])[0].tolist() == [0, 31, 33, 255]
    wider = np.asarray(allowed_tokens(jnp.asarray(row[None]), 300))[0]  # past the mask: not allowed
    assert wider.shape == (300,) and not wider[256:].any()
    logits = np.asarray(apply_token_bitmask(jnp.zeros((1, 256)), jnp.asarray(row[None])))[0]
    assert np.isfinite(logits).sum() == 4 and np.isfinite(logits[[0, 31, 33, 255]]).all()


def masked_generate(engines, params, allowed: list[set[int] | None], n_tokens: int, sampling: SamplingParams):
    """Like model_helpers.generate, with slot i restricted to allowed[i] on every token."""
    engine = engines.generate_engine
    rows = np.stack([mask_of(a) for a in allowed])
    state = engine.init_decode_state()
    outputs = []
    for slot, tokens in enumerate(PROMPTS):
        row = rows[slot : slot + 1]
        prefix, first = engine.prefill(params=params, tokens=tokens, sampling=sampling, token_mask=row)
        state = engine.insert(prefix, state, slot=slot)
        outputs.append([int(first.to_host()[0])])
    for _ in range(n_tokens - 1):
        state, step = engine.generate(params=params, decode_state=state, token_mask=rows)
        for slot, token in enumerate(step.to_host()):
            outputs[slot].append(int(token))
    return outputs


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.5, seed=3)], ids=["greedy", "sampled"])
def test_masked_slots_draw_only_allowed_tokens_and_free_rows_are_unchanged(tiny, sampling):
    engines, params = tiny
    plain = generate(engines, PROMPTS, 8, sampling)
    allowed = [{7}, {100, 200, 201}, None, None]
    masked = masked_generate(engines, params, allowed, 8, sampling)
    assert masked[0] == [7] * 8
    assert set(masked[1]) <= {100, 200, 201}
    assert masked[2:] == plain[2:]  # all-ones rows: token for token what no mask gives


def test_an_all_ones_mask_everywhere_is_the_unmasked_run(tiny):
    engines, params = tiny
    assert masked_generate(engines, params, [None] * 4, 8, GREEDY) == generate(engines, PROMPTS, 8)


def test_smollm_token_bytes_spell_the_text_and_mark_the_control_tokens():
    """What the grammar engine reads of the tokenizer: each id's bytes (byte-level BPE undone)."""
    reader = gguf.GGUFReader(str(bundled_gguf_path()))
    tokenizer = tokenizer_from_gguf(reader)
    spelled = tokenizer.token_bytes()
    assert len(spelled) == tokenizer.vocab_size
    text = 'Héllo wörld ✓ 123\n\t{"a": [1, 2]}'
    assert b"".join(spelled[i] for i in tokenizer.encode(text)) == text.encode()
    im_end = tokenizer.encode(IM_END)
    assert len(im_end) == 1 and im_end[0] in tokenizer.special_ids and spelled[im_end[0]] == IM_END.encode()
    assert tokenizer.eos_ids <= tokenizer.special_ids


@pytest.mark.parametrize("vocab", ["llama-spm", "llama-bpe", "qwen2"])
def test_token_bytes_spell_the_text_for_sentencepiece_and_byte_level_vocabularies(vocab):
    """SentencePiece pieces (▁ for a space, <0xNN> byte fallback) and GPT-2 byte characters alike."""
    tokenizer = gguf_tokenizer(vocab)
    spelled = tokenizer.token_bytes()
    text = 'Héllo wörld ✓ 123\n\t{"a": [1, 2]} 🦙'
    joined = b"".join(spelled[i] for i in tokenizer.encode(text))
    assert joined in (text.encode(), b" " + text.encode())  # SentencePiece writes a leading ▁
