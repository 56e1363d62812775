"""The OpenAI endpoints take what common clients send, over the echo engine on a
real loopback server (see conftest.py): the echo model repeats its prompt, so every expected text
below is computed by hand."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from serving.server.http_api import MAX_STOP_STRINGS, CompletionBody
from serving.server.requests import StopStrings
from tests.server.fake_engine import EOS, ByteTokenizer
from tests.server.server_process import scrape_sample, wait_until

TIMEOUT = httpx.Timeout(20.0)


def complete(server, **body) -> dict:
    r = httpx.post(server.http_url + "/v1/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def stream_pieces(server, path: str, **body) -> tuple[list[str], list[dict]]:
    """The text pieces of a streamed response, and its chunks."""
    chunks = []
    with httpx.stream("POST", server.http_url + path, json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    pieces = [c.get("text", c.get("delta", {}).get("content", "")) for c in choices]
    return [p for p in pieces if p], chunks


# -- stop strings --------------------------------------------------------------------------------
def test_stop_string_ends_the_text_before_it():
    stops = StopStrings(["###", "END"])
    assert stops.feed("Hello #") == ("Hello ", False)  # "#" could begin "###": held back
    assert stops.feed("#") == ("", False)
    assert stops.feed("x E") == ("##x ", False)  # "##x" cannot: released
    assert stops.feed("N") == ("", False)
    assert stops.feed("D more") == ("", True)
    assert StopStrings(["b", "abc"]).feed("xabc") == ("x", True)  # the earliest match wins
    assert StopStrings(["ab"]).flush() == ""


def test_held_back_text_is_released_when_generation_ends_otherwise():
    stops = StopStrings(["STOP"])
    assert stops.feed("abST") == ("ab", False)
    assert stops.flush() == "ST"


def test_completion_stops_at_a_stop_string(fake_server):
    body = complete(fake_server, prompt="abc", max_tokens=20, stop="ca")
    choice = body["choices"][0]
    assert choice["text"] == "ab" and choice["finish_reason"] == "stop"
    # the tokens behind the text up to the end of the stop string: a, b, c, a
    assert body["usage"]["completion_tokens"] == 4
    assert complete(fake_server, prompt="abc", max_tokens=20, stop=["zz", "bc"])["choices"][0]["text"] == "a"


def test_a_stop_string_that_never_completes_is_text(fake_server):
    choice = complete(fake_server, prompt="abSTc", max_tokens=5, stop=["STOP"])["choices"][0]
    assert choice["text"] == "abSTc" and choice["finish_reason"] == "length"


def test_streaming_never_leaks_part_of_a_stop_string(fake_server):
    pieces, chunks = stream_pieces(fake_server, "/v1/completions", prompt="abSTOPc", max_tokens=30, stop="STOP")
    assert "".join(pieces) == "ab"
    assert not any("S" in p for p in pieces)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    pieces, _ = stream_pieces(fake_server, "/v1/completions", prompt="abSTc", max_tokens=5, stop="STOP")
    assert "".join(pieces) == "abSTc"  # "ST" was held back, then released with "c"


def test_chat_stop_string(fake_server):
    # the echo model repeats the chat template: "[user]hi\n[assistant][user]hi..."
    messages = [{"role": "user", "content": "hi"}]
    pieces, chunks = stream_pieces(fake_server, "/v1/chat/completions", messages=messages, stop=["\n"])
    assert "".join(pieces) == "[user]hi"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def success_count(server) -> float:
    return scrape_sample(server.http_url, "jetstream_request_success_count_total")


def test_stop_string_completes_the_request_and_frees_its_slot(slow_server):
    """One slot, 20 ms per step: the request asks for the most tokens (20 s); its stop string
    ends it after a few steps, it counts as a success, and the slot is free well before."""
    orch = slow_server.orchestrator
    succeeded = success_count(slow_server)
    body = {"prompt": "abcd", "max_tokens": orch.context_length - len("abcd"), "stop": "da"}
    r = httpx.post(slow_server.http_url + "/v1/completions", json=body, timeout=5)
    assert r.json()["choices"][0]["text"] == "abc"
    wait_until(lambda: orch.slots_used == 0, timeout_s=3, what="slot freed")
    wait_until(lambda: success_count(slow_server) == succeeded + 1, timeout_s=3, what="success counted")
    assert complete(slow_server, prompt="ok", max_tokens=2)["choices"][0]["text"] == "ok"


# -- the other parameters ------------------------------------------------------------------------
def test_ignore_eos_generates_through_end_of_sequence(fake_server):
    prompt = [104, 105, EOS]  # "hi<eos>": the echo model says "hi" then ends
    assert complete(fake_server, prompt=prompt, max_tokens=9)["choices"][0]["finish_reason"] == "stop"
    body = complete(fake_server, prompt=prompt, max_tokens=9, ignore_eos=True)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 9


def test_seed_and_sampling(fake_server):
    # with sampling, the echo model shifts every byte by the seed
    assert complete(fake_server, prompt="abc", max_tokens=4, temperature=0.5, seed=1)["choices"][0]["text"] == "bcdb"
    assert complete(fake_server, prompt="abc", max_tokens=4, temperature=1, seed=2)["choices"][0]["text"] == "cdec"
    # any integer: reduced modulo 2**31 (the echo model shifts by the seed mod 256)
    assert (
        complete(fake_server, prompt="abc", max_tokens=2, temperature=1, seed=2**40 + 1)["choices"][0]["text"] == "bc"
    )
    assert complete(fake_server, prompt="abc", max_tokens=2, temperature=1, seed=-1)["choices"][0]["text"] == "`a"


def test_unseeded_requests_draw_their_own_random_seeds():
    seeds = {CompletionBody(prompt="a", temperature=1.0).sampling().seed for _ in range(8)}
    assert len(seeds) == 8  # 8 independent 31-bit draws: a collision is a 2**-26 event


def test_top_k_minus_one_means_no_filter():
    assert CompletionBody(prompt="a", top_k=-1).sampling().top_k == 0


def test_null_means_unset(fake_server):
    nulls = dict.fromkeys(
        ("max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs", "stream", "stream_options",
         "presence_penalty", "frequency_penalty", "logit_bias", "user", "echo", "suffix", "best_of")
    )  # fmt: skip
    body = complete(fake_server, prompt="ab", **nulls)
    assert body["choices"][0]["text"] == "ab" * 8  # OpenAI's default max_tokens, 16
    assert complete(fake_server, prompt="ab", max_tokens=2, n=1, presence_penalty=0, frequency_penalty=0.0)


def test_prompt_as_a_batch_of_one(fake_server):
    assert complete(fake_server, prompt=["xy"], max_tokens=3)["choices"][0]["text"] == "xyx"
    assert complete(fake_server, prompt=[[120, 121]], max_tokens=3)["choices"][0]["text"] == "xyx"


def test_chat_takes_developer_role_and_text_parts(fake_server):
    messages = [
        {"role": "developer", "content": "b"},
        {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
    ]
    body = {"messages": messages, "max_tokens": 4}
    r = httpx.post(fake_server.http_url + "/v1/chat/completions", json=body, timeout=TIMEOUT).json()
    template = ByteTokenizer().apply_chat_template(
        [{"role": "system", "content": "b"}, {"role": "user", "content": "hi"}]
    )
    assert r["usage"]["prompt_tokens"] == len(template.encode())
    assert r["choices"][0]["message"]["content"] == template[:4]


def test_unknown_fields_are_ignored_with_a_warning(fake_server, caplog):
    caplog.set_level(logging.WARNING, logger="serving.server.http_api")
    body = complete(fake_server, prompt="ab", max_tokens=2, typical_p=0.9, min_p=0.1)
    assert body["choices"][0]["text"] == "ab"
    messages = [{"role": "user", "content": "hi", "refusal": None, "weight": 1}]
    body = {"messages": messages, "max_tokens": 2, "parallel_tool_calls": False, "stream_options": None}
    r = httpx.post(fake_server.http_url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "serving.server.http_api"]
    assert any("/v1/completions" in w and "typical_p, min_p" in w for w in warnings), warnings
    assert any("parallel_tool_calls, messages.0.weight" in w for w in warnings), warnings


def test_generate_stays_strict(fake_server):
    for field, value in (("stop", "x"), ("ignore_eos", True), ("n", 1)):
        body = {"prompt": "a", "max_tokens": 2, field: value}
        r = httpx.post(fake_server.http_url + "/generate", json=body, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.parametrize(
    "path,fields,param,says",
    [
        ("/v1/completions", {"n": 5}, "n", "between 1 and 4"),  # the fake server has 4 slots
        ("/v1/completions", {"n": 0}, "n", "between 1 and 4"),
        ("/v1/completions", {"logprobs": 6}, "logprobs", "less than or equal to 5"),
        ("/v1/completions", {"logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ("/v1/chat/completions", {"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
        ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias", "[-100.0, 100.0]"),
        ("/v1/completions", {"logit_bias": {"257": -100}}, "logit_bias", "vocabulary size 257"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens", "echo and logprobs"),
        ("/v1/completions", {"max_tokens": 0, "echo": True}, "max_tokens", "echo and logprobs"),
        ("/v1/completions", {"best_of": 3}, "best_of", "best_of=1"),
        ("/v1/completions", {"suffix": "!"}, "suffix", "not supported"),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "'json_schema'"),
        ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}},
         "response_format", 'Unimplemented keys: ["not"]'),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools", "not supported"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ("/v1/completions", {"stop": ""}, "stop", "must not be empty"),
        ("/v1/completions", {"stop": ["a", ""]}, "stop", "must not be empty"),
        ("/v1/completions", {"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop", f"at most {MAX_STOP_STRINGS}"),
        ("/v1/completions", {"stop": 5}, "stop", "valid string"),
        ("/v1/completions", {"top_k": -2}, "top_k", "greater than or equal to -1"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        ("/v1/completions", {"ignore_eos": "yes"}, "ignore_eos", "valid boolean"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages.0.content.0.type", "'text'"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_clear_400(fake_server, path, fields, param, says):
    base = {"prompt": "a"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "a"}]}
    r = httpx.post(fake_server.http_url + path, json={**base, "max_tokens": 2, **fields}, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
