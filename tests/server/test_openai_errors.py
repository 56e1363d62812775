"""Every error in OpenAI's shape, FastAPI's own answers included (an unknown route, a method a
route does not take, an invalid body), over the echo server (see conftest.py)."""

from __future__ import annotations

import httpx
import pytest

TIMEOUT = httpx.Timeout(20.0)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    "method,path,status,code,says",
    [
        ("GET", "/v1/no-such-route", 404, "unknown_url", "no route GET /v1/no-such-route"),
        ("POST", "/v1/embeddings", 404, "unknown_url", "no route POST /v1/embeddings"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed", "allowed: POST"),
        ("DELETE", "/v1/models", 405, "method_not_allowed", "allowed: GET"),
    ],
)
def test_routing_errors(fake_server, method, path, status, code, says):
    r = httpx.request(method, fake_server.http_url + path, timeout=TIMEOUT)
    assert r.status_code == status
    error = error_of(r)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, code)
    assert says in error["message"]


@pytest.mark.parametrize(
    "path,body,param,code",
    [
        ("/v1/completions", {"max_tokens": 2}, "prompt", "missing_required_parameter"),
        ("/v1/completions", {"prompt": "a", "max_tokens": "2"}, "max_tokens", "invalid_type"),
        ("/v1/completions", {"prompt": "a", "temperature": -1}, "temperature", "invalid_value"),
        ("/generate", {"prompt": "a", "max_tokens": 2, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ("/v1/chat/completions", "{not json", "body", "invalid_json"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ],
)
def test_validation_errors_name_the_field_and_the_kind_of_problem(fake_server, path, body, param, code):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(fake_server.http_url + path, timeout=TIMEOUT, **kw)
    assert r.status_code == 400
    error = error_of(r)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_a_refused_field_has_the_shape_too(fake_server):
    body = {"prompt": "a", "max_tokens": 2, "suffix": "z"}
    error = error_of(httpx.post(fake_server.http_url + "/v1/completions", json=body, timeout=TIMEOUT))
    assert error["param"] == "suffix" and error["type"] == "invalid_request_error"
