"""End to end with the official `openai` client: `python -m serving` with the bundled
SmolLM2-135M-Instruct as a subprocess, a key from the environment variable --api-key-env names,
and a model_name that only names the model (it once crashed start-up by looking like a preset)."""

from __future__ import annotations

import openai
import pytest

from tests.server import server_process
from tests.server.server_process import API_KEY, HOST, free_port

pytestmark = pytest.mark.slow

MODEL_NAME = "tinyllama-2"
KEY_VARIABLE = "SERVING_E2E_API_KEY"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client():
    http_port = free_port()
    args = [
        "--host", HOST, "--http-port", str(http_port), "--grpc-port", "0", "--slots", "2",
        "--max-prefill-length", "64", "--max-target-length", "128", "--api-key-env", KEY_VARIABLE,
        f"model_name={MODEL_NAME}",
    ]  # fmt: skip
    env = server_process.server_env(devices=1, **{KEY_VARIABLE: API_KEY})
    with server_process.running(args, env, http_port, "openai-e2e-server.log"):
        base_url = f"http://{HOST}:{http_port}/v1"
        with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120) as c:
            yield c


def test_the_model_name_is_informational(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_two_greedy_choices_agree_and_answer(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=FRANCE, n=2, max_tokens=16)
    first, second = (choice.message.content for choice in r.choices)
    assert "Paris" in first and first == second
    single = client.chat.completions.create(model=MODEL_NAME, messages=FRANCE, max_tokens=16)
    assert single.choices[0].message.content == first
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert r.usage.completion_tokens == 2 * single.usage.completion_tokens


def test_responses_api_answers_streamed_and_not(client):
    whole = client.responses.create(model=MODEL_NAME, input=FRANCE, max_output_tokens=16)
    assert "Paris" in whole.output_text
    with client.responses.create(model=MODEL_NAME, input=FRANCE, max_output_tokens=16, stream=True) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text


def test_without_the_key_401(client):
    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
