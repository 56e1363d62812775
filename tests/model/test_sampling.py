"""Logit bias, penalties and log probabilities on the tiny random-weight model, against a numpy
reference of their definitions applied to logits from a cacheless prefill over the whole sequence."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.engine import model
from serving.engine.jax_engine import build_engines
from serving.engine_api import GREEDY, MAX_TOP_LOGPROBS, SamplingParams
from serving.server.settings import ServingSettings
from tests.model.model_helpers import generate, generate_with_logprobs, log_softmax, reference_greedy

TINY = {"model_name": "tiny", "max_prefill_predict_length": 32, "max_target_length": 48, "per_device_batch_size": 4}
PROMPTS = [[5, 6, 7, 5, 6], list(range(10, 30)), [100] * 17]
N_TOKENS = 10
PENALISED = SamplingParams(
    presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.8, logit_bias=((3, 2.5), (40, -1.0))
)
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def tiny(one_device):
    engines = build_engines(ServingSettings(**TINY).engine_settings(), devices=one_device)
    return engines, engines.generate_engine.load_params()


@pytest.fixture(scope="module")
def reference_logits(tiny):
    """logits(sequence) -> f32 [V]: the next-token logits after the whole sequence, no KV cache."""
    engines, params = tiny
    prefill = jax.jit(model.prefill, static_argnums=0)

    def logits(seq: list[int]) -> np.ndarray:
        padded = jnp.zeros((1, 64), jnp.int32).at[0, : len(seq)].set(jnp.array(seq))
        return np.asarray(prefill(engines.model_config, params, padded, len(seq))[0][0])

    return logits


def test_penalties_and_bias_follow_their_definitions(tiny, reference_logits):
    engines, _ = tiny
    ours = generate(engines, PROMPTS, N_TOKENS, PENALISED)
    plain = generate(engines, PROMPTS, N_TOKENS)
    for prompt, out in zip(PROMPTS, ours, strict=False):
        assert out == reference_greedy(reference_logits, PENALISED, prompt, N_TOKENS)
    assert ours != plain  # the penalties changed what the model says


@pytest.mark.parametrize(
    "one_penalty",
    [
        {"presence_penalty": -2.0},
        {"frequency_penalty": 2.0},
        {"repetition_penalty": 0.5},
        {"repetition_penalty": 3.0},
    ],
)
def test_each_penalty_alone_follows_its_definition(tiny, reference_logits, one_penalty):
    engines, _ = tiny
    s = SamplingParams(**one_penalty)
    for prompt, out in zip(PROMPTS, generate(engines, PROMPTS, N_TOKENS, s), strict=False):
        assert out == reference_greedy(reference_logits, s, prompt, N_TOKENS)


def test_logit_bias_forces_and_bans_tokens(tiny):
    engines, _ = tiny
    forced = generate(engines, PROMPTS, 6, SamplingParams(logit_bias=((77, 100.0),)))
    assert forced == [[77] * 6] * len(PROMPTS)
    plain = generate(engines, PROMPTS[:1], 6)[0]
    banned = generate(engines, PROMPTS[:1], 6, SamplingParams(logit_bias=tuple((t, -100.0) for t in set(plain))))[0]
    assert not set(banned) & set(plain)


def test_logit_bias_id_beyond_the_vocabulary_is_refused(tiny):
    engines, params = tiny
    with pytest.raises(ValueError, match="logit_bias"):
        engines.prefill_engine.prefill(params=params, tokens=[1, 2], sampling=SamplingParams(logit_bias=((256, 1.0),)))


def test_neutral_values_leave_greedy_output_unchanged_beside_penalised_slots(tiny):
    """Neutral penalties and zero biases are exact identities, also while the rows beside them take
    the adjusting branch."""
    engines, _ = tiny
    neutral = SamplingParams(
        presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=((3, 0.0), (9, 0.0))
    )
    plain = generate(engines, PROMPTS, N_TOKENS)
    assert generate(engines, PROMPTS, N_TOKENS, neutral) == plain
    mixed = generate(engines, PROMPTS, N_TOKENS, [GREEDY, PENALISED, neutral])
    assert mixed[0] == plain[0] and mixed[2] == plain[2]
    assert mixed[1] != plain[1]


def test_penalties_apply_to_sampled_requests_too(tiny):
    """A seeded sampled request with a strong bias still draws only the favoured token."""
    engines, _ = tiny
    s = SamplingParams(temperature=1.0, seed=3, logit_bias=((12, 100.0),))
    assert generate(engines, PROMPTS[:2], 5, s) == [[12] * 5] * 2


def test_logprobs_are_the_log_softmax_of_the_model_logits(tiny, reference_logits):
    """Of the model's own distribution: a penalised request's log probabilities are those of the
    raw logits, as vLLM returns them; slots without logprobs beside it change nothing."""
    engines, _ = tiny
    requests = [SamplingParams(logprobs=5), GREEDY, dataclasses.replace(PENALISED, logprobs=MAX_TOP_LOGPROBS)]
    outputs, logprobs = generate_with_logprobs(engines, PROMPTS, N_TOKENS, requests)
    assert logprobs[1] == [] and outputs[1] == generate(engines, PROMPTS[1:2], N_TOKENS)[0]
    for slot in (0, 2):
        prompt, out = PROMPTS[slot], outputs[slot]
        assert len(logprobs[slot]) == N_TOKENS
        for i, (logprob, top_ids, top_logprobs) in enumerate(logprobs[slot]):
            expected = log_softmax(reference_logits(prompt + out[:i]))
            assert abs(logprob - expected[out[i]]) < LOGPROB_ATOL
            order = np.argsort(-expected)[:MAX_TOP_LOGPROBS]
            assert top_ids[:3] == order[:3].tolist()
            np.testing.assert_allclose(top_logprobs, expected[top_ids], atol=LOGPROB_ATOL)
            assert top_logprobs == sorted(top_logprobs, reverse=True)


def test_prompt_logprobs_of_every_prompt_token(tiny, reference_logits):
    engines, params = tiny
    prompt = PROMPTS[1]
    sampling = SamplingParams(logprobs=2, prompt_logprobs=True)
    _, step = engines.prefill_engine.prefill(params=params, tokens=prompt, sampling=sampling)
    got = step.prompt_logprobs_to_host()
    assert got.logprob.shape == (len(prompt) - 1,)
    for i in range(1, len(prompt)):
        expected = log_softmax(reference_logits(prompt[:i]))
        assert abs(got.logprob[i - 1] - expected[prompt[i]]) < LOGPROB_ATOL
        best = np.sort(expected)[::-1][:MAX_TOP_LOGPROBS]
        np.testing.assert_allclose(got.top_logprobs[i - 1], best, atol=LOGPROB_ATOL)
    _, plain = engines.prefill_engine.prefill(params=params, tokens=prompt, sampling=SamplingParams(logprobs=2))
    assert plain.prompt_logprobs_to_host() is None
    assert int(plain.to_host()[0]) == int(step.to_host()[0])


def test_sampling_params_validation_names_the_field():
    for bad, field in [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": ((5, 101.0),)}, r"logit_bias\[5\]"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"logit_bias": ((5, 1.0), (5, 2.0))}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": True}, "prompt_logprobs"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    # a JSON round trip between hosts gives lists of lists
    assert SamplingParams(logit_bias=[[5, 1]]).logit_bias == ((5, 1.0),)
