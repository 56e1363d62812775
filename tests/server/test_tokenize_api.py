"""/tokenize and /detokenize (vLLM's shapes) over the echo server: one token per byte, so the
expected ids are the prompt's bytes."""

from __future__ import annotations

import httpx
import pytest

from tests.server.fake_engine import ByteTokenizer

TIMEOUT = httpx.Timeout(20.0)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.http_url + path, json=body, timeout=TIMEOUT)


def test_tokenize_a_prompt(fake_server):
    body = post(fake_server, "/tokenize", {"model": "echo", "prompt": "héllo", "add_special_tokens": True}).json()
    assert body == {"tokens": list("héllo".encode()), "count": 6, "max_model_len": 95, "token_strs": None}


def test_tokenize_messages_applies_the_chat_template(fake_server):
    messages = [{"role": "user", "content": "hi"}]
    body = post(fake_server, "/tokenize", {"messages": messages}).json()
    assert body["tokens"] == list(ByteTokenizer().apply_chat_template(messages).encode())


def test_the_count_is_what_a_completion_prefills(fake_server):
    count = post(fake_server, "/tokenize", {"prompt": "count me"}).json()["count"]
    r = post(fake_server, "/v1/completions", {"prompt": "count me", "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == count


def test_detokenize_round_trips(fake_server):
    tokens = post(fake_server, "/tokenize", {"prompt": "é€ ok"}).json()["tokens"]
    assert post(fake_server, "/detokenize", {"tokens": tokens}).json() == {"prompt": "é€ ok"}


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": False},
         "add_generation_prompt"),
        ("/detokenize", {"tokens": [65, 999]}, "tokens"),
        ("/detokenize", {"tokens": "AB"}, "tokens"),
    ],
)  # fmt: skip
def test_bad_bodies_name_the_field(fake_server, path, body, param):
    r = post(fake_server, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
