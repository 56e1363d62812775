"""HTTP front end against the echo engine over a real loopback server (see conftest.py)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from serving.server.http_api import create_app
from tests.server.fake_engine import ByteTokenizer, echo_orchestrator
from tests.server.server_process import wait_until

TIMEOUT = httpx.Timeout(20.0)


def post(server, path: str, body, **kw) -> httpx.Response:
    kw.setdefault("json" if not isinstance(body, (str, bytes)) else "content", body)
    return httpx.post(server.http_url + path, timeout=TIMEOUT, **kw)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_generate(fake_server):
    r = post(fake_server, "/generate", {"prompt": "abc", "max_tokens": 5})
    assert r.status_code == 200 and r.json() == {"response": "abcab"}


def test_generate_accepts_legacy_fields_and_sampling(fake_server):
    body = {"prompt": "abc", "max_tokens": 4, "session_cache": "", "priority": 0}
    assert post(fake_server, "/generate", body).json() == {"response": "abca"}
    body = {"prompt": "abc", "max_tokens": 4, "temperature": 0.5, "seed": 1, "top_k": 5, "top_p": 0.9}
    assert post(fake_server, "/generate", body).json() == {"response": "bcdb"}


def test_generate_stream_sends_json_lines_of_whole_characters(fake_server):
    body = {"prompt": "é€x", "max_tokens": 12, "stream": True}
    with httpx.stream("POST", fake_server.http_url + "/generate", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        pieces = [json.loads(line)["response"] for line in r.iter_lines() if line]
    assert "".join(pieces) == "é€xé€x"
    assert len(pieces) == 6 and not any("\ufffd" in p for p in pieces)


def test_healthcheck(fake_server):
    r = httpx.get(fake_server.http_url + "/healthcheck", timeout=TIMEOUT)
    assert r.status_code == 200 and r.json() == {"response": {"is_live": True}}


def test_healthcheck_is_500_until_warm():
    orch = echo_orchestrator(start=False)
    client = TestClient(create_app(orch, model_name="echo"))
    r = client.get("/healthcheck")
    assert r.status_code == 500 and r.json() == {"response": {"is_live": False}}
    r = client.post("/generate", json={"prompt": "a", "max_tokens": 1})
    assert r.status_code == 503
    orch.start(warmup=True)
    try:
        assert client.get("/healthcheck").json() == {"response": {"is_live": True}}
    finally:
        orch.stop()


@pytest.mark.parametrize(
    "body,param",
    [
        ("{not json", "body"),
        ("[1, 2]", "body"),
        ("", "body"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": 5, "max_tokens": 4}, "prompt"),
        ({"prompt": ["a"], "max_tokens": 4}, "prompt"),
        ({"prompt": "", "max_tokens": 4}, "prompt"),
        ({"prompt": "x" * 33, "max_tokens": 4}, "prompt"),
        ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "4"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 10**12}, "max_tokens"),
        ({"prompt": "a"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 2, "stream": "yes"}, "stream"),
        ({"prompt": "a", "max_tokens": 2, "temperature": -1}, "temperature"),
        ({"prompt": "a", "max_tokens": 2, "frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_generate_inputs_are_4xx_naming_the_field(fake_server, body, param):
    headers = {"content-type": "application/json"}
    r = post(fake_server, "/generate", body, headers=headers)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert post(fake_server, "/generate", {"prompt": "ok", "max_tokens": 2}).json() == {"response": "ok"}


def test_openai_completion(fake_server):
    r = post(fake_server, "/v1/completions", {"model": "echo", "prompt": "xyz", "max_tokens": 4})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "xyzx" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    r = post(fake_server, "/v1/completions", {"prompt": [104, 105, 256], "max_tokens": 9})
    assert r.json()["choices"][0]["text"] == "hi" and r.json()["choices"][0]["finish_reason"] == "stop"


def test_openai_completion_stream(fake_server):
    body = {"prompt": "ab", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", fake_server.http_url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "ababa"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # without stream_options.include_usage the counts ride on the finish chunk (as llama.cpp's server)
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 5,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert not any("usage" in c for c in chunks[:-1])


def test_openai_chat_applies_template(fake_server):
    template = ByteTokenizer().apply_chat_template([{"role": "user", "content": "hi"}])
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    r = post(fake_server, "/v1/chat/completions", body).json()
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": template[:6]}
    assert r["usage"]["prompt_tokens"] == len(template.encode())


def test_openai_chat_stream_with_usage(fake_server):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", fake_server.http_url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "[us"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    # as OpenAI: one more chunk before [DONE], empty choices, the whole request's usage
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    assert usage["usage"]["completion_tokens"] == 3
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 3


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "a", "n": 5}, "n"),  # more choices than the 4 slots
        ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": "a", "max_tokens": -2}, "max_tokens"),
        ("/v1/completions", {"max_tokens": 2}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
    ],
)
def test_bad_openai_inputs(fake_server, path, body, param):
    r = post(fake_server, path, body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param


def test_models_and_metrics(fake_server):
    models = httpx.get(fake_server.http_url + "/v1/models", timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == ["echo"]
    post(fake_server, "/generate", {"prompt": "m", "max_tokens": 2})
    text = httpx.get(fake_server.http_url + "/metrics", timeout=TIMEOUT).text
    for name in (
        "jetstream_slots_used_percentage",
        "jetstream_prefill_backlog_size",
        "jetstream_time_to_first_token_bucket",
        "jetstream_time_per_output_token_bucket",
    ):
        assert name in text
    success = [line for line in text.splitlines() if line.startswith("jetstream_request_success_count_total")]
    assert success and float(success[0].split()[-1]) >= 1


def test_disconnect_cancels_and_overload_is_503_with_retry_after(slow_server):
    url, orch = slow_server.http_url, slow_server.orchestrator
    body = {"prompt": "long", "max_tokens": orch.max_tokens_limit, "stream": True}
    with httpx.stream("POST", url + "/generate", json=body, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines)) == {"response": "l"}
        # the first token streams before the request takes its slot: wait until it holds it
        wait_until(lambda: orch.slots_used == 1 and orch._waiting == 0)
        queued: dict = {}
        waiter = threading.Thread(
            target=lambda: queued.update(r=post(slow_server, "/generate", {"prompt": "q", "max_tokens": 3}))
        )
        waiter.start()
        wait_until(lambda: orch._waiting == 1)
        rejected = post(slow_server, "/generate", {"prompt": "x", "max_tokens": 3})
        assert rejected.status_code == 503
        assert int(rejected.headers["retry-after"]) >= 1
    # the stream was closed after one line: the server must cancel it and free the slot
    waiter.join(timeout=10)
    assert queued["r"].json() == {"response": "qqq"}  # nothing lost, and the slot came back early
    wait_until(lambda: orch.slots_used == 0, timeout_s=3)


def test_non_streaming_disconnect_cancels(slow_server):
    orch = slow_server.orchestrator
    with pytest.raises(httpx.ReadTimeout):
        body = {"prompt": "z", "max_tokens": orch.max_tokens_limit}
        httpx.post(slow_server.http_url + "/generate", json=body, timeout=0.5)
    # the request would decode for 20 s; cancelled, it frees its slot well before that
    wait_until(lambda: orch.slots_used == 0, timeout_s=10)
    assert post(slow_server, "/generate", {"prompt": "ok", "max_tokens": 2}).json() == {"response": "ok"}
