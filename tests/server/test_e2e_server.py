"""End to end: `python -m serving` with the bundled SmolLM2-135M-Instruct, as a subprocess on free
loopback ports, exercised over HTTP (JetStream + OpenAI) and gRPC.

One server for the module (1 CPU device for deterministic numerics, 4 slots, prompts up to 128
tokens, 256-token cache, at most 4 requests waiting). Outputs are greedy, so a prompt always gives
the same text, alone or among concurrent requests.
"""

from __future__ import annotations

import concurrent.futures
import json

import grpc
import httpx
import pytest

from serving.server import proto
from tests.server import server_process
from tests.server.server_process import HOST, free_port, scrape_sample, wait_until

PREFIX_CACHE_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")

pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(60.0)
SLOTS, MAX_QUEUED = 4, 4
pb2, pb2_grpc = proto.load()


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


FRANCE = chat_prompt("What is the capital of France?")
PROMPTS = [
    chat_prompt("Name a primary color."),
    chat_prompt("What is 2 + 2?"),
    "The three laws of motion are",
    chat_prompt("Say hello in Spanish."),
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def server():
    http_port, grpc_port = free_port(), free_port()
    args = [
        "--host", HOST, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--max-prefill-length", "128", "--max-target-length", "256",
        "--slots", str(SLOTS), "--max-queued-requests", str(MAX_QUEUED),
    ]  # fmt: skip
    with server_process.running(args, server_process.server_env(devices=1), http_port, "e2e-server.log") as proc:
        yield {"url": f"http://{HOST}:{http_port}", "grpc": f"{HOST}:{grpc_port}", "proc": proc}


def generate(server, prompt: str, max_tokens: int, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, **extra}
    return httpx.post(server["url"] + "/generate", json=body, timeout=TIMEOUT)


def metric(server, name: str) -> float:
    return scrape_sample(server["url"], name)


def wait_idle(server, timeout_s: float = 20) -> None:
    wait_until(
        lambda: metric(server, "jetstream_slots_used_percentage") == 0.0, timeout_s, "all slots freed", every_s=0.1
    )


@pytest.fixture(scope="module")
def sequential(server):
    """Greedy results one request at a time: the reference for the concurrent runs."""
    return {p: generate(server, p, 12).json()["response"] for p in PROMPTS}


def test_generate_is_coherent_and_deterministic(server):
    first = generate(server, FRANCE, 24)
    assert first.status_code == 200
    assert "Paris" in first.json()["response"]
    assert generate(server, FRANCE, 24).json() == first.json()


def test_stream_equals_whole_response(server):
    whole = generate(server, PROMPTS[2], 16).json()["response"]
    body = {"prompt": PROMPTS[2], "max_tokens": 16, "stream": True}
    with httpx.stream("POST", server["url"] + "/generate", json=body, timeout=TIMEOUT) as r:
        pieces = [json.loads(line)["response"] for line in r.iter_lines() if line]
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_openai_endpoints(server):
    url = server["url"]
    models = httpx.get(url + "/v1/models", timeout=TIMEOUT).json()
    assert models["data"][0]["id"]
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24}
    r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=TIMEOUT).json()
    assert "Paris" in r["choices"][0]["message"]["content"]
    assert r["choices"][0]["finish_reason"] == "stop"  # ends at <|im_end|>
    usage = r["usage"]
    assert usage["prompt_tokens"] > 5 and 0 < usage["completion_tokens"] < 24
    counted = [scrape_sample(url, name) for name in PREFIX_CACHE_COUNTERS]
    with httpx.stream("POST", url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=TIMEOUT) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == r["choices"][0]["message"]["content"]
    streamed = chunks[-1]["usage"]
    assert {**streamed, "prompt_tokens_details": None} == {**usage, "prompt_tokens_details": None}
    # the same prompt again: the prefix cache holds all its full 16-token blocks but the last token's
    cached = (usage["prompt_tokens"] - 1) // 16 * 16
    assert streamed["prompt_tokens_details"] == {"cached_tokens": cached}
    # and /metrics counted it, in tokens, under vLLM's names: queries the prompt, hits the cached part
    queried, hit = (
        scrape_sample(url, name) - before for name, before in zip(PREFIX_CACHE_COUNTERS, counted, strict=True)
    )
    assert (queried, hit) == (usage["prompt_tokens"], cached)
    content = r["choices"][0]["message"]["content"]
    stopped = httpx.post(url + "/v1/chat/completions", json={**chat, "stop": ["Paris"]}, timeout=TIMEOUT).json()
    assert stopped["choices"][0] == {**r["choices"][0], "message": {
        "role": "assistant", "content": content[: content.index("Paris")]}}  # fmt: skip
    through = httpx.post(url + "/v1/chat/completions", json={**chat, "ignore_eos": True}, timeout=TIMEOUT).json()
    assert through["choices"][0]["finish_reason"] == "length" and through["usage"]["completion_tokens"] == 24
    completion = {"prompt": PROMPTS[2], "max_tokens": 16}
    c = httpx.post(url + "/v1/completions", json=completion, timeout=TIMEOUT).json()
    assert c["choices"][0]["text"] == generate(server, PROMPTS[2], 16).json()["response"]
    assert c["usage"]["completion_tokens"] == 16


def test_grpc_decode_and_health(server):
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = pb2_grpc.OrchestratorStub(channel)
        assert stub.HealthCheck(pb2.HealthCheckRequest(), timeout=30).is_live
        request = pb2.DecodeRequest(
            text_content=pb2.DecodeRequest.TextContent(text=PROMPTS[2]), max_tokens=16, priority=0
        )
        samples = [r.stream_content.samples[0] for r in stub.Decode(request, timeout=60)]
        ids = [t for s in samples for t in s.token_ids]
        assert "".join(s.text for s in samples) == generate(server, PROMPTS[2], 16).json()["response"]
        assert len(ids) == 16
        by_ids = pb2.DecodeRequest(token_content=pb2.DecodeRequest.TokenContent(token_ids=ids[:8]), max_tokens=4)
        assert len([r for r in stub.Decode(by_ids, timeout=60)]) == 4
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Decode(pb2.DecodeRequest(text_content=request.text_content, max_tokens=-1), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_equal_sequential_greedy(server, sequential):
    # A request counts against MAX_QUEUED until it holds a slot, and all arrive before the first
    # is inserted: this many at once are always admitted, so none may be turned away.
    concurrent_prompts = PROMPTS[:MAX_QUEUED]
    assert len(concurrent_prompts) == SLOTS  # every slot busy at once
    wait_idle(server)
    with concurrent.futures.ThreadPoolExecutor(len(concurrent_prompts)) as pool:
        got = list(pool.map(lambda p: generate(server, p, 12), concurrent_prompts))
    assert [r.status_code for r in got] == [200] * len(concurrent_prompts)
    assert [r.json()["response"] for r in got] == [sequential[p] for p in concurrent_prompts]


def test_cancelled_stream_frees_its_slot(server):
    completed = metric(server, "jetstream_request_success_count_total")
    body = {"prompt": PROMPTS[2], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server["url"] + "/generate", json=body, timeout=TIMEOUT) as r:
        next(r.iter_lines())
    wait_idle(server)
    # freed by the cancellation, not by running all 200 tokens to a successful end
    assert metric(server, "jetstream_request_success_count_total") == completed


def test_overload_rejects_with_retry_after_and_loses_nothing(server, sequential):
    prompt = PROMPTS[1]
    n = SLOTS + MAX_QUEUED + 6
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        got = list(pool.map(lambda _: generate(server, prompt, 12), range(n)))
    codes = [r.status_code for r in got]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in got if r.status_code == 503)
    assert all(r.json()["response"] == sequential[prompt] for r in got if r.status_code == 200)
    wait_idle(server)


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{oops", "body"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "", "max_tokens": 4}, "prompt"),
        ({"prompt": 42, "max_tokens": 4}, "prompt"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": "word " * 300, "max_tokens": 4}, "prompt"),
    ],
)
def test_bad_inputs_are_clear_4xx(server, body, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server["url"] + "/generate", timeout=TIMEOUT, **kw)
    assert 400 <= r.status_code < 500
    assert r.json()["error"]["param"] == param
    assert generate(server, FRANCE, 2).status_code == 200
