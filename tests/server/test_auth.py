"""The API key (HTTP, the OpenAI client, gRPC) and CORS, over the echo server with a key
(`keyed_server` in conftest.py). The start-up log's part: test_cli.py."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest

from serving.server import proto
from serving.server.auth import ApiKey, api_key_from
from tests.server.server_process import ALLOWED_ORIGIN, API_KEY

pb2, pb2_grpc = proto.load()
TIMEOUT = httpx.Timeout(20.0)
BEARER = {"Authorization": f"Bearer {API_KEY}"}
COMPLETION = {"prompt": "abc", "max_tokens": 3}


def post(server, path: str, body: dict, headers=None) -> httpx.Response:
    return httpx.post(server.http_url + path, json=body, headers=headers, timeout=TIMEOUT)


# -- HTTP ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers,says",
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
        ({"Authorization": API_KEY}, "missing API key"),  # no scheme
        ({"Authorization": f"Basic {API_KEY}"}, "missing API key"),
    ],
)
def test_every_route_needs_the_key(keyed_server, headers, says):
    for method, path, body in [
        ("POST", "/v1/completions", COMPLETION),
        ("POST", "/generate", COMPLETION),
        ("POST", "/v1/responses", {"input": "hi"}),
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/echo", None),
        ("GET", "/no/such/route", None),
    ]:
        r = httpx.request(method, keyed_server.http_url + path, json=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert says in error["message"] and "wrong-key" not in error["message"]
        assert r.headers["www-authenticate"] == "Bearer"


def test_the_key_lets_requests_through_and_probes_stay_open(keyed_server):
    assert post(keyed_server, "/generate", COMPLETION, BEARER).json() == {"response": "abc"}
    assert post(keyed_server, "/v1/completions", COMPLETION, BEARER).json()["choices"][0]["text"] == "abc"
    assert httpx.get(keyed_server.http_url + "/healthcheck", timeout=TIMEOUT).status_code == 200
    assert "jetstream_" in httpx.get(keyed_server.http_url + "/metrics", timeout=TIMEOUT).text


def test_the_openai_client_gets_401_without_the_key(keyed_server):
    base_url = keyed_server.http_url + "/v1"
    with openai.OpenAI(base_url=base_url, api_key="not-the-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert info.value.body["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as client:
        assert client.completions.create(model="echo", prompt="abc", max_tokens=2).choices[0].text == "ab"
        assert client.responses.create(model="echo", input="hi", max_output_tokens=3).output_text == "[us"


# -- CORS ----------------------------------------------------------------------------------------
def preflight(server, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    return httpx.options(server.http_url + "/v1/chat/completions", headers=headers, timeout=TIMEOUT)


def test_preflight_is_answered_without_the_key(keyed_server):
    r = preflight(keyed_server, ALLOWED_ORIGIN)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed_headers = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "x-stainless-os" in allowed_headers
    assert preflight(keyed_server, "https://evil.example.com").status_code == 400


def test_browser_requests_get_cors_headers_on_success_and_on_401(keyed_server):
    origin = {"Origin": ALLOWED_ORIGIN}
    r = post(keyed_server, "/v1/completions", COMPLETION, {**BEARER, **origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = post(keyed_server, "/v1/completions", COMPLETION, origin)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = post(keyed_server, "/v1/completions", COMPLETION, {**BEARER, "Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in r.headers


def test_without_allowed_origins_there_is_no_cors(fake_server):
    r = preflight(fake_server, ALLOWED_ORIGIN)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    assert r.json()["error"]["code"] == "method_not_allowed"


# -- gRPC ----------------------------------------------------------------------------------------
def decode_request(text: str, max_tokens: int):
    return pb2.DecodeRequest(text_content=pb2.DecodeRequest.TextContent(text=text), max_tokens=max_tokens)


def test_grpc_needs_the_key_except_for_health(keyed_server):
    with grpc.insecure_channel(keyed_server.grpc_target) as channel:
        stub = pb2_grpc.OrchestratorStub(channel)
        for metadata in [(), (("authorization", "Bearer wrong-key"),)]:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Decode(decode_request("abc", 2), metadata=metadata, timeout=20))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "wrong-key" not in info.value.details()
        replies = stub.Decode(decode_request("abc", 2), metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=20)
        assert "".join(r.stream_content.samples[0].text for r in replies) == "ab"
        assert stub.HealthCheck(pb2.HealthCheckRequest(), timeout=20).is_live


# -- the key itself ------------------------------------------------------------------------------
def test_the_key_comes_from_the_flag_or_the_variable_it_names():
    key = ApiKey("k1")
    assert api_key_from(key, None) is key and api_key_from(None, None) is None
    from_env = api_key_from(None, "SERVING_TEST_KEY", {"SERVING_TEST_KEY": "k2"})
    assert from_env.refusal("Bearer k2") is None and from_env.refusal("Bearer k1") == "invalid API key"
    with pytest.raises(ValueError, match="SERVING_TEST_KEY: the environment variable is not set"):
        api_key_from(None, "SERVING_TEST_KEY", {})
    with pytest.raises(ValueError, match="give one of them"):
        api_key_from(key, "SERVING_TEST_KEY", {"SERVING_TEST_KEY": "k2"})
    assert "k1" not in repr(key)
