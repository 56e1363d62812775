"""The official `openai` client against the echo server (see conftest.py): n choices, the Responses
API streamed and not, model retrieval, context_length_exceeded. The echo model repeats its prompt
(the chat template's text here), shifting every byte by the seed when sampling, so every expected
text is computed by hand."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from serving.server.http_api import HttpServer, create_app
from serving.server.requests import GenerateRequest
from tests.server.fake_engine import ByteTokenizer, EchoEngine, echo_orchestrator
from tests.server.server_process import HOST, wait_until

TEMPLATE = ByteTokenizer().apply_chat_template


def shifted(text: str, seed: int) -> str:
    return "".join(chr((ord(c) + seed) % 256) for c in text)


@pytest.fixture(scope="module")
def client(fake_server):
    with openai.OpenAI(base_url=fake_server.http_url + "/v1", api_key="unused", max_retries=0, timeout=20) as c:
        yield c


HI = [{"role": "user", "content": "hi"}]


# -- n choices -----------------------------------------------------------------------------------
def test_greedy_n_gives_n_identical_choices_and_usage_counts_the_prompt_once(client):
    r = client.chat.completions.create(model="echo", messages=HI, n=2, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [TEMPLATE(HI)[:6]] * 2
    assert r.usage.prompt_tokens == len(TEMPLATE(HI))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == len(TEMPLATE(HI)) + 12


def test_seeded_choice_i_samples_with_seed_plus_i(client):
    r = client.chat.completions.create(model="echo", messages=HI, n=3, max_tokens=4, temperature=0.7, seed=5)
    assert [c.message.content for c in r.choices] == [shifted(TEMPLATE(HI)[:4], 5 + i) for i in range(3)]
    r = client.completions.create(model="echo", prompt="abc", n=2, max_tokens=3, temperature=1, seed=1)
    assert [(c.index, c.text) for c in r.choices] == [(0, "bcd"), (1, "cde")]


def test_streamed_choices_carry_their_index(client):
    stream = client.chat.completions.create(
        model="echo", messages=HI, n=2, max_tokens=5, temperature=1, seed=1, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: shifted(TEMPLATE(HI)[:5], 1), 1: shifted(TEMPLATE(HI)[:5], 2)}
    assert finishes == {0: "length", 1: "length"}
    assert usage.completion_tokens == 10 and usage.prompt_tokens == len(TEMPLATE(HI))


def test_best_of_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="echo", prompt="a", max_tokens=2, best_of=2)
    assert info.value.body["param"] == "best_of" and "n choices" in info.value.body["message"]


# -- the Responses API ---------------------------------------------------------------------------
def test_responses_create(client):
    r = client.responses.create(model="echo", input="hi", instructions="b", max_output_tokens=8)
    messages = [{"role": "system", "content": "b"}, *HI]
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "echo"
    assert r.output_text == TEMPLATE(messages)[:8]
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == len(TEMPLATE(messages)) and r.usage.output_tokens == 8
    assert r.usage.total_tokens == r.usage.input_tokens + 8
    assert r.store is False


def test_responses_message_list_and_a_completed_response(client):
    # "<eos>" in the text is the fake tokenizer's end of sequence: the echo model stops there
    conversation = [
        {"role": "user", "content": [{"type": "input_text", "text": "hi<eos>"}]},
    ]
    r = client.responses.create(model="echo", input=conversation)
    assert r.status == "completed" and r.output_text == "[user]hi"
    assert r.output[0].type == "message" and r.output[0].role == "assistant" and r.output[0].status == "completed"


def test_responses_stream_sends_the_documented_events_in_order(client):
    with client.responses.create(model="echo", input="hi<eos>", stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"
    ]  # fmt: skip
    assert kinds[:4] == head and kinds[-4:] == tail
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events[4:-4]) == "[user]hi" == events[-4].text
    final = events[-1].response
    assert final.output_text == "[user]hi" and final.usage.output_tokens == len("[user]hi")


@pytest.mark.parametrize(
    "fields,param,says",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "not stored"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "not supported"),
        ({"text": {"format": {"type": "xml"}}}, "text.format", "'json_schema'"),
        ({"input": "x" * 40}, "input", "maximum is 32"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
         "input.0.content.0.type", "input_text"),
    ],
)  # fmt: skip
def test_responses_refusals_say_why(client, fields, param, says):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**{"model": "echo", "input": "hi", **fields})
    assert info.value.body["param"] == param and says in info.value.body["message"], info.value.body


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def test_chat_json_schema_through_the_client_validates_in_every_choice(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="echo", messages=HI, n=2, max_tokens=30, response_format=fmt)
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_format_json_schema_validates(client, stream):
    fmt = {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}
    kwargs = {"model": "echo", "input": "hi", "max_output_tokens": 30, "text": {"format": fmt}}
    if stream:
        with client.responses.stream(**kwargs) as events:
            final = events.get_final_response()
    else:
        final = client.responses.create(**kwargs)
    assert final.status == "completed", final.output_text
    jsonschema.validate(json.loads(final.output_text), SCHEMA)


def test_responses_store_is_false_even_when_asked(client):
    assert client.responses.create(model="echo", input="hi<eos>", store=True).store is False


# -- models and context --------------------------------------------------------------------------
def test_retrieve_the_model_and_not_another(client):
    card = client.models.retrieve("echo")
    assert (card.id, card.object, card.owned_by) == ("echo", "model", "serving")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


@pytest.mark.parametrize(
    "call,param",
    [
        # the fake server: prompts up to 32 tokens, a context of 95 (prompt plus completion)
        (lambda c: c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x" * 40}]),
         "messages"),
        (lambda c: c.chat.completions.create(model="echo", messages=HI, max_tokens=80), "messages"),
        (lambda c: c.completions.create(model="echo", prompt="a" * 30, max_tokens=70), "prompt"),
        (lambda c: c.responses.create(model="echo", input="hi", max_output_tokens=80), "input"),
    ],
)  # fmt: skip
def test_over_the_context_is_context_length_exceeded(client, call, param):
    with pytest.raises(openai.BadRequestError) as info:
        call(client)
    error = info.value.body
    assert (error["code"], error["type"], error["param"]) == ("context_length_exceeded", "invalid_request_error", param)


def test_chat_without_max_tokens_fills_the_context(client):
    r = client.chat.completions.create(model="echo", messages=HI)
    assert r.usage.total_tokens == 95 and r.choices[0].finish_reason == "length"


def test_a_refused_choice_cancels_the_choices_already_taken():
    """Both slots busy and room for one waiting request: of n=2 choices the first waits and the
    second is refused (503); the first is then cancelled, not left waiting for nobody."""
    engine = EchoEngine(slots=2, max_prefill_length=16, max_target_length=1024, step_delay_s=0.02)
    orch = echo_orchestrator(engine, max_queued_requests=1)
    fillers = []
    try:
        for _ in range(2):  # one at a time: the queue holds one
            fillers.append(orch.submit(GenerateRequest("busy", orch.max_tokens_limit - 8)))
            wait_until(lambda: orch._waiting == 0, 5, what="a filler in its slot")
        body = {"prompt": "ab", "n": 2, "max_tokens": 4}
        r = TestClient(create_app(orch, model_name="echo")).post("/v1/completions", json=body)
        assert r.status_code == 503 and "retry-after" in r.headers
        wait_until(lambda: len(orch._inflight) == len(fillers), 3, what="the waiting choice cancelled")
        assert orch._waiting == 0
    finally:
        for filler in fillers:
            filler.cancel()
        orch.stop()


def test_a_client_leaving_a_stream_of_choices_cancels_them_all():
    engine = EchoEngine(slots=2, max_prefill_length=16, max_target_length=1024, step_delay_s=0.02)
    orch = echo_orchestrator(engine)
    http = HttpServer(create_app(orch, model_name="echo"), HOST, 0).start()
    try:
        body = {"prompt": "ab", "n": 2, "max_tokens": orch.context_length - 2, "stream": True}  # 20 s each
        with httpx.stream("POST", f"http://{HOST}:{http.port}/v1/completions", json=body, timeout=20) as r:
            seen = set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.update(choice["index"] for choice in json.loads(line[len("data: ") :])["choices"])
                if seen == {0, 1}:
                    break
        wait_until(lambda: not orch._inflight and orch.slots_used == 0, 5, what="both choices cancelled")
    finally:
        http.stop()
        orch.stop()
