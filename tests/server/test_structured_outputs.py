"""Structured outputs over the echo engine: response_format parsing, exact masks, the orchestrator's
grammar bookkeeping and the HTTP 400s. Under a mask the echo engine emits the echoed token if it is
allowed, else the lowest allowed id, so every output here is computable by hand."""

from __future__ import annotations

import json

import httpx
import jsonschema
import numpy as np
import pytest

from serving.engine_api import bitmask_words
from serving.server.requests import GenerateRequest, RequestError
from serving.server.structured import GrammarCompiler, parse_response_format
from tests.server.fake_engine import EOS, ByteTokenizer, EchoEngine, allowed_ids, echo_orchestrator, echo_tokens

TIMEOUT = httpx.Timeout(30.0)
YES_NO = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"enum": ["yes", "no"]}}}


def test_text_is_unconstrained_and_both_json_schema_shapes_give_one_grammar():
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    chat = parse_response_format({**YES_NO, "json_schema": {**YES_NO["json_schema"], "strict": True}})
    flat = parse_response_format({"type": "json_schema", "name": "answer", "schema": {"enum": ["yes", "no"]},
                                  "strict": True})  # fmt: skip
    assert chat == flat and chat.type == "json_schema" and chat.name == "answer" and chat.strict
    assert parse_response_format({"type": "json_object"}).schema == {"type": "object"}


@pytest.mark.parametrize(
    "fmt, says",
    [
        ("json", "must be an object"),
        ({"type": "yaml"}, "type must be 'text', 'json_object' or 'json_schema'"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema must be a JSON Schema object"),
        ({"type": "json_schema", "name": 3, "schema": {}}, "name must be a string"),
        ({"type": "json_schema", "schema": {}, "strict": "yes"}, "strict must be a boolean"),
        (
            {"type": "json_schema", "schema": {"type": "object", "not": {"type": "string"}}},
            'Unimplemented keys: ["not"]',
        ),
        ({"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}}, '["uniqueItems"]'),
        ({"type": "json_schema", "schema": {"$ref": "#/$defs/missing"}}, "/$defs/missing"),
        ({"type": "json_schema", "schema": {"type": "frog"}}, "frog"),
    ],
)
def test_bad_or_unsupported_formats_name_the_field_and_the_feature(fmt, says):
    with pytest.raises(RequestError) as err:
        parse_response_format(fmt)
    assert err.value.field == "response_format" and says in err.value.message, err.value.message


def test_matcher_masks_are_exact_and_allow_eos_only_where_the_grammar_ends():
    compiler = GrammarCompiler(ByteTokenizer())
    matcher = compiler.matcher(parse_response_format(YES_NO))
    row = np.zeros(bitmask_words(257), np.int32)
    seen = []
    for token in b'"no"':
        matcher.fill(row)
        seen.append(list(allowed_ids(row)))
        matcher.advance(token)
    matcher.fill(row)
    seen.append(list(allowed_ids(row)))
    assert seen == [[ord('"')], [ord("n"), ord("y")], [ord("o")], [ord('"')], [EOS]]
    assert matcher.error == ""


def test_a_token_outside_the_grammar_leaves_only_eos():
    matcher = GrammarCompiler(ByteTokenizer()).matcher(parse_response_format(YES_NO))
    matcher.advance(ord("x"))  # never sampled under the mask; an engine bug must still end the text
    row = np.zeros(bitmask_words(257), np.int32)
    matcher.fill(row)
    assert matcher.error and list(allowed_ids(row)) == [EOS]


def run(orch, prompt: str, max_tokens: int, fmt=None, **kw):
    request = GenerateRequest(prompt, max_tokens, response_format=parse_response_format(fmt), **kw)
    return orch.submit(request).collect(timeout_s=10)


def test_grammar_steers_the_echo_and_ends_with_stop():
    """ "abc" echoes a, b, c, ...: '"' is forced, then b -> n (lowest of n/y), c -> o, '"', then EOS."""
    orch = echo_orchestrator(EchoEngine(slots=2, max_prefill_length=16, max_target_length=32))
    try:
        steered = run(orch, "abc", 20, YES_NO)
        assert steered.text == '"no"' and steered.finish.reason == "stop"
        followed = run(orch, '"yes"', 20, YES_NO)  # the echo is allowed all the way; then only EOS
        assert followed.text == '"yes"' and followed.finish.reason == "stop"
        assert followed.finish.completion_tokens == 5
    finally:
        orch.stop()


def test_unconstrained_slots_get_no_mask_and_all_ones_beside_a_constrained_one():
    engine = EchoEngine(slots=2, max_prefill_length=16, max_target_length=32, step_delay_s=0.002)
    orch = echo_orchestrator(engine)
    try:
        plain = run(orch, "xyz", 6)
        assert engine.masks and all(mask is None for mask in engine.masks), "a plain request paid for a mask"
        engine.masks.clear()
        free = orch.submit(GenerateRequest("pqrs", 12))
        steered = run(orch, "abc", 20, YES_NO)
        free_text = free.collect(timeout_s=10).text
    finally:
        orch.stop()
    assert plain.text == "xyzxyz" and steered.text == '"no"'
    assert free_text == bytes(echo_tokens(b"pqrs", 12)).decode()  # unchanged token for token
    masked = [mask for mask in engine.masks if mask is not None and len(mask) == 2]
    assert masked, "the constrained request's decode steps carried no mask"
    constrained_rows = []
    for mask in masked:
        free_rows = [row for row in mask if (row == -1).all()]  # the free slot's row allows everything
        assert len(free_rows) == 1
        constrained_rows += [sorted(allowed_ids(row)) for row in mask if not (row == -1).all()]
    assert [ord("n"), ord("y")] in constrained_rows  # exactly what can follow '"' in "yes" / "no"


def test_ignore_eos_with_a_format_is_refused():
    orch = echo_orchestrator()
    try:
        with pytest.raises(RequestError) as err:
            run(orch, "abc", 4, YES_NO, ignore_eos=True)
        assert err.value.field == "ignore_eos"
    finally:
        orch.stop()


SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 3, "maximum": 9}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-c]{2}$"}}, "required": ["id"],
     "additionalProperties": False},
    {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
]  # fmt: skip


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("schema", SCHEMAS)
def test_http_outputs_validate_against_their_schema(fake_server, path, schema):
    base = {"prompt": "abc"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "abc"}]}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    body = {**base, "max_tokens": 40, "response_format": fmt}
    r = httpx.post(fake_server.http_url + path, json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
    assert choice["finish_reason"] == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_http_json_object_streams_an_object(fake_server):
    body = {"prompt": '{"k": [1]}', "max_tokens": 40, "stream": True, "response_format": {"type": "json_object"}}
    with httpx.stream("POST", fake_server.http_url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert json.loads(text) == {"k": [1]}  # the echo, allowed throughout, then only EOS
