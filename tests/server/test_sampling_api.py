"""Log probabilities, echo, penalties and logit_bias through the OpenAI endpoints, over the echo
engine on a real loopback server (see conftest.py), with the official `openai` client.

The echo model repeats its prompt and gives token t the log probability -t/256, with t, t+1,
t+2, ... as the most likely tokens at its position (see fake_engine.py), so every expected value
here is computed by hand from the prompt's bytes.
"""

from __future__ import annotations

import json

import openai
import pytest

from serving.engine_api import SamplingParams
from serving.server import multihost
from serving.server.requests import GenerateRequest, RequestError
from tests.server.fake_engine import echo_tokens


@pytest.fixture(scope="module")
def client(fake_server):
    return openai.OpenAI(base_url=fake_server.http_url + "/v1", api_key="unused", timeout=30.0, max_retries=0)


def lp(token: int) -> float:
    """The echo model's log probability of token `token`."""
    return -token / 256


def top(token: int, n: int) -> dict[str, float]:
    return {chr(token + i): lp(token) - i for i in range(n)}


def test_completion_logprobs(client):
    choice = client.completions.create(model="echo", prompt="abc", max_tokens=4, logprobs=2).choices[0]
    assert choice.text == "abca"
    expected = [ord(c) for c in "abca"]
    assert choice.logprobs.tokens == list("abca")
    assert choice.logprobs.token_logprobs == [lp(t) for t in expected]
    assert choice.logprobs.top_logprobs == [top(t, 2) for t in expected]
    assert choice.logprobs.text_offset == [0, 1, 2, 3]


def test_completion_without_logprobs_has_none(client):
    assert client.completions.create(model="echo", prompt="abc", max_tokens=2).choices[0].logprobs is None


def test_echo_with_max_tokens_0_scores_the_prompt(client):
    """What lm-evaluation-harness's local-completions sends for a log-likelihood request."""
    response = client.completions.create(model="echo", prompt="hello", max_tokens=0, echo=True, logprobs=1)
    choice = response.choices[0]
    assert choice.text == "hello" and choice.finish_reason == "length"
    assert choice.logprobs.tokens == list("hello")
    assert choice.logprobs.token_logprobs == [None] + [lp(ord(c)) for c in "ello"]
    assert choice.logprobs.top_logprobs == [None] + [top(ord(c), 1) for c in "ello"]
    assert choice.logprobs.text_offset == [0, 1, 2, 3, 4]
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 0


def test_echo_then_completion_with_token_id_prompt(client):
    choice = client.completions.create(model="echo", prompt=[120, 121], max_tokens=3, echo=True, logprobs=0).choices[0]
    assert choice.text == "xy" + "xyx"
    assert choice.logprobs.token_logprobs == [None, lp(121)] + [lp(t) for t in (120, 121, 120)]
    assert choice.logprobs.top_logprobs[1:] == [{}] * 4
    assert choice.logprobs.text_offset == [0, 1, 2, 3, 4]


def test_echo_without_logprobs_returns_the_prompt_text(client):
    choice = client.completions.create(model="echo", prompt="ab", max_tokens=3, echo=True).choices[0]
    assert choice.text == "ab" + "aba" and choice.logprobs is None


def test_streamed_completion_logprobs_add_up_to_the_whole(client):
    chunks = list(
        client.completions.create(model="echo", prompt="pq", max_tokens=5, echo=True, logprobs=3, stream=True)
    )
    text = "".join(c.choices[0].text for c in chunks)
    with_logprobs = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    tokens = [t for lp_ in with_logprobs for t in lp_.tokens]
    offsets = [o for lp_ in with_logprobs for o in lp_.text_offset]
    assert text == "pq" + "pqpqp"
    assert tokens == list(text) and offsets == list(range(len(text)))
    assert chunks[0].choices[0].text == "pqp"  # the echoed prompt comes with the first piece
    assert with_logprobs[0].token_logprobs == [None, lp(ord("q")), lp(ord("p"))]


def test_chat_logprobs(client, fake_server):
    messages = [{"role": "user", "content": "hi"}]
    response = client.chat.completions.create(
        model="echo", messages=messages, max_tokens=3, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    generated = response.choices[0].message.content
    assert [c.token for c in content] == list(generated)
    for entry, char in zip(content, generated, strict=False):
        assert entry.logprob == lp(ord(char)) and entry.bytes == list(char.encode())
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == list(top(ord(char), 3).items())
    plain = client.chat.completions.create(model="echo", messages=messages, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_streamed_chat_logprobs(client):
    messages = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(
        model="echo", messages=messages, max_tokens=4, logprobs=True, top_logprobs=0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == list(text) and len(text) == 4
    assert all(e.top_logprobs == [] for e in entries)


def test_penalties_and_logit_bias_reach_the_engine(client, fake_server, monkeypatch):
    """The echo model ignores them; what the engine is asked to do is checked here (the device
    arithmetic is tested against its definition in tests/model/test_sampling.py)."""
    seen: list[SamplingParams] = []
    engine = fake_server.engine
    prefill = engine.prefill
    monkeypatch.setattr(engine, "prefill", lambda **kw: seen.append(kw["sampling"]) or prefill(**kw))
    response = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "a"}],
        max_tokens=2,
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logit_bias={"65": 3, "7": -100},
        extra_body={"repetition_penalty": 1.2},
    )
    assert response.choices[0].message.content
    (sampling,) = seen
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -1.0, 1.2)
    assert sampling.logit_bias == ((65, 3.0), (7, -100.0))


def test_max_tokens_0_at_the_orchestrator_needs_prompt_logprobs(fake_server):
    orch = fake_server.orchestrator
    with pytest.raises(RequestError, match="between 1 and"):
        orch.submit(GenerateRequest("ab", 0))
    done = orch.submit(GenerateRequest("ab", 0, SamplingParams(logprobs=0, prompt_logprobs=True))).collect(10)
    assert done.token_ids == () and done.finish.reason == "length"
    assert [(e.token, e.logprob) for e in done.prompt_logprobs] == [(97, None), (98, lp(98))]


def test_orchestrator_deltas_carry_one_logprob_per_token(fake_server):
    done = fake_server.orchestrator.submit(GenerateRequest("xyz", 4, SamplingParams(logprobs=1))).collect(10)
    expected = echo_tokens([ord(c) for c in "xyz"], 4)
    assert [e.token for e in done.logprobs] == list(done.token_ids) == expected
    assert [e.top for e in done.logprobs] == [((t, lp(t)),) for t in expected]
    assert done.prompt_logprobs is None


def test_sampling_params_cross_the_multihost_wire():
    """The leader sends SamplingParams to its workers as JSON: logit_bias comes back as a tuple."""
    params = SamplingParams(presence_penalty=0.5, logit_bias=((3, -1.5),), logprobs=2, prompt_logprobs=True)
    assert multihost._from_wire("sampling", json.loads(json.dumps(multihost._to_wire(params))), {}) == params
