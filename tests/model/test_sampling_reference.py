"""Penalties and log probabilities on SmolLM2-135M-Instruct against Hugging Face transformers
reading the same GGUF (see test_reference.py): transformers' own RepetitionPenaltyLogitsProcessor,
the OpenAI penalties' definition over transformers' logits, and log_softmax of its logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import openai
import pytest
import torch

from serving.engine_api import GREEDY, SamplingParams
from serving.server.http_api import HttpServer, create_app
from serving.server.orchestrator import Orchestrator
from tests.model.model_helpers import PROMPTS, generate, generate_with_logprobs, log_softmax, reference_greedy

pytestmark = pytest.mark.slow

N_TOKENS = 8
LOGPROB_ATOL = 1e-3
NEUTRAL = SamplingParams(presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=((0, 0.0),))
PENALISED = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, logit_bias=((28, 2.0),))


@pytest.fixture(scope="module")
def setup(smollm_raw, smollm_engines, one_device):
    tokenizer = smollm_raw[2]
    engines = smollm_engines(one_device, max_prefill_predict_length=32, max_target_length=64, per_device_batch_size=4)
    return engines, [tokenizer.encode(p) for p in PROMPTS]


def hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    """transformers' logits [T, V] at every position of `ids` (no cache)."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def test_repetition_penalty_matches_transformers(setup, hf):  # noqa: F811
    import transformers

    engines, prompts = setup
    _, hf_model = hf
    penalty = 1.3
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty)
    prompts = prompts[:2]  # transformers re-runs the whole sequence per token
    ours = generate(engines, prompts, N_TOKENS, SamplingParams(repetition_penalty=penalty))
    for ids, our_tokens in zip(prompts, ours, strict=False):
        seq = list(ids)
        for _ in range(N_TOKENS):
            scores = processor(torch.tensor([seq]), torch.tensor(hf_logits(hf_model, seq)[-1:]))
            seq.append(int(scores.argmax()))
        assert our_tokens == seq[len(ids) :]
    assert ours != generate(engines, prompts, N_TOKENS)


def test_openai_penalties_and_bias_over_transformers_logits(setup, hf):  # noqa: F811
    engines, prompts = setup
    _, hf_model = hf
    prompts = prompts[:2]  # transformers re-runs the whole sequence per token
    ours = generate(engines, prompts, N_TOKENS, PENALISED)
    assert ours != generate(engines, prompts, N_TOKENS)
    for ids, our_tokens in zip(prompts, ours, strict=False):
        assert our_tokens == reference_greedy(lambda seq: hf_logits(hf_model, seq)[-1], PENALISED, ids, N_TOKENS)


def test_neutral_values_leave_greedy_output_unchanged(setup):
    engines, prompts = setup
    plain = generate(engines, prompts, N_TOKENS)
    assert generate(engines, prompts, N_TOKENS, NEUTRAL) == plain
    mixed = generate(engines, prompts, N_TOKENS, [NEUTRAL, PENALISED, GREEDY, dataclasses.replace(NEUTRAL, logprobs=3)])
    assert [mixed[i] for i in (0, 2, 3)] == [plain[i] for i in (0, 2, 3)]


def test_logprobs_match_transformers(setup, hf):  # noqa: F811
    """Of the raw model distribution, also for a penalised request."""
    engines, prompts = setup
    _, hf_model = hf
    requests = [SamplingParams(logprobs=5), dataclasses.replace(PENALISED, logprobs=20)] * 2
    outputs, logprobs = generate_with_logprobs(engines, prompts, N_TOKENS, requests)
    worst = 0.0
    for ids, out, entries in zip(prompts, outputs, logprobs, strict=False):
        expected = log_softmax(hf_logits(hf_model, ids + out)[len(ids) - 1 : -1])  # [N_TOKENS, V]
        for row, token, (logprob, top_ids, top_logprobs) in zip(expected, out, entries, strict=False):
            worst = max(worst, abs(logprob - row[token]), np.abs(np.asarray(top_logprobs) - row[top_ids]).max())
            assert top_ids[0] == int(row.argmax())
    print(f"max |logprob diff| vs transformers: {worst:.2e}")
    assert worst < LOGPROB_ATOL


def test_prompt_logprobs_match_transformers(setup, hf):  # noqa: F811
    engines, prompts = setup
    _, hf_model = hf
    engine = engines.prefill_engine
    params = engine.load_params()
    for ids in prompts:
        _, step = engine.prefill(params=params, tokens=ids, sampling=SamplingParams(logprobs=1, prompt_logprobs=True))
        got = step.prompt_logprobs_to_host()
        expected = log_softmax(hf_logits(hf_model, ids)[:-1])
        np.testing.assert_allclose(got.logprob, expected[np.arange(len(ids) - 1), ids[1:]], atol=LOGPROB_ATOL)
        np.testing.assert_allclose(got.top_logprobs[:, 0], expected.max(axis=-1), atol=LOGPROB_ATOL)


def test_lm_eval_loglikelihood_request_over_http_matches_transformers(setup, smollm_raw, hf):  # noqa: F811
    """What lm-evaluation-harness's local-completions sends for a log-likelihood task (echo, no new
    tokens, logprobs 1), through the OpenAI endpoint of a server on the SmolLM2 engines."""
    engines, _ = setup
    _, hf_model = hf
    tokenizer = smollm_raw[2]
    orchestrator = Orchestrator(
        tokenizer=tokenizer,
        prefill_engine=engines.prefill_engine,
        generate_engine=engines.generate_engine,
        prefill_params=engines.prefill_engine.load_params(),
        generate_params=engines.generate_engine.load_params(),
    )
    orchestrator.start(warmup=False)
    http = HttpServer(create_app(orchestrator, model_name="smollm2"), "127.0.0.1", 0).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0)
        text = "The capital of France is Paris"
        choice = client.completions.create(model="smollm2", prompt=text, max_tokens=0, echo=True, logprobs=1).choices[0]
    finally:
        http.stop()
        orchestrator.stop()
    ids = tokenizer.encode(text)
    expected = log_softmax(hf_logits(hf_model, ids)[:-1])
    assert choice.text == text
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(
        choice.logprobs.token_logprobs[1:], expected[np.arange(len(ids) - 1), ids[1:]], atol=LOGPROB_ATOL
    )
    greedy = [int(np.argmax(row)) for row in expected]  # lm-eval's is_greedy reads top_logprobs
    assert [list(top) for top in choice.logprobs.top_logprobs[1:]] == [[tokenizer.decode([t])] for t in greedy]
