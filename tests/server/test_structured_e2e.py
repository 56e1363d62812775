"""Structured outputs end to end: `python -m serving` with the bundled SmolLM2-135M-Instruct, asked
for JSON through response_format on /v1/chat/completions and /v1/completions. Every output must
parse and validate (jsonschema) against its schema, greedy and sampled, while plain requests
running beside constrained ones come out token for token as they do alone.

One server for the module (1 CPU device, 4 slots, 256-token cache)."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import jsonschema
import pytest

from tests.server import server_process
from tests.server.server_process import HOST, free_port

pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(120.0)
SLOTS = 4
MAX_TOKENS = 200

# One schema per feature the grammar engine supports; strings and arrays bounded so that even a
# rambling small model ends inside the token budget, whatever it samples: a character is at most 4
# byte-level tokens, so three names take at most 3 x (4 x 12 + 2) tokens and the JSON around them.
NAME = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "object_required_enum": (
        "Describe a user of a website: name, age and role.",
        {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                          "role": {"enum": ["admin", "user", "guest"]}},
         "required": ["name", "age", "role"], "additionalProperties": False},
    ),
    "array_of_strings": (
        "List three fruits.",
        {"type": "array", "items": NAME, "minItems": 3, "maxItems": 3},
    ),
    "nested_numbers": (
        "Give a product with a price and its dimensions in centimetres.",
        {"type": "object", "properties": {
            "product": NAME, "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "size": {"type": "object", "properties": {"width": {"type": "integer", "maximum": 999},
                                                      "height": {"type": "integer", "maximum": 999}},
                     "required": ["width", "height"], "additionalProperties": False}},
         "required": ["product", "price", "size"], "additionalProperties": False},
    ),
    "pattern_and_anyof": (
        "Give a flight code like ABC-123 and the gate, or null if unknown.",
        {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                          "gate": {"anyOf": [{"type": "integer", "maximum": 99}, {"type": "null"}]}},
         "required": ["code", "gate"], "additionalProperties": False},
    ),
}  # fmt: skip
PLAIN = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24}


@pytest.fixture(scope="module")
def server():
    http_port, grpc_port = free_port(), free_port()
    args = [
        "--host", HOST, "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--max-prefill-length", "128", "--max-target-length", "320", "--slots", str(SLOTS),
    ]  # fmt: skip
    env = server_process.server_env(devices=1)
    with server_process.running(args, env, http_port, "structured-e2e-server.log"):
        yield f"http://{HOST}:{http_port}"


def chat(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def constrained(question: str, schema: dict, sampling: dict) -> dict:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": question + " Answer in JSON."}]
    return {"messages": messages, "max_tokens": MAX_TOKENS, "response_format": fmt, **sampling}


def assert_valid(response: dict, schema: dict) -> None:
    choice = response["choices"][0]
    text = choice["message"]["content"]
    assert choice["finish_reason"] == "stop", text  # the grammar ended the text, not the budget
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.9, "seed": 11}, {"temperature": 1.2, "top_p": 0.95, "seed": 5}],
    ids=["greedy", "sampled", "sampled-top-p"],
)
def test_every_schema_validates_beside_an_unchanged_plain_request(server, sampling):
    alone = chat(server, PLAIN)
    bodies = [constrained(q, schema, sampling) for q, schema in SCHEMAS.values()]
    with concurrent.futures.ThreadPoolExecutor(len(bodies) + 1) as pool:
        plain = pool.submit(chat, server, PLAIN)
        results = list(pool.map(lambda body: chat(server, body), bodies))
    for (_, schema), response in zip(SCHEMAS.values(), results, strict=False):
        assert_valid(response, schema)
    assert plain.result()["choices"] == alone["choices"]  # token for token, beside constrained slots


def test_json_object_on_completions_streamed(server):
    prompt = "<|im_start|>user\nDescribe a cat in JSON: its name and colour.<|im_end|>\n<|im_start|>assistant\n"
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True, "response_format": {"type": "json_object"}}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop", text
    assert isinstance(json.loads(text), dict)


def test_unsupported_schema_is_a_400_naming_it(server):
    body = constrained("Anything.", {"type": "object", "not": {"required": ["a"]}}, {})
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "response_format" and '"not"' in error["message"], error
