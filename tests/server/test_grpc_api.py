"""gRPC front end (JetStream's Orchestrator service) against the echo engine."""

from __future__ import annotations

import grpc
import pytest

from serving.server import proto
from tests.server.server_process import wait_until

pb2, pb2_grpc = proto.load()
TIMEOUT_S = 20


@pytest.fixture(scope="module")
def stub(fake_server):
    with grpc.insecure_channel(fake_server.grpc_target) as channel:
        yield pb2_grpc.OrchestratorStub(channel)


def text_request(text: str, max_tokens: int, **kw):
    return pb2.DecodeRequest(text_content=pb2.DecodeRequest.TextContent(text=text), max_tokens=max_tokens, **kw)


def decode(stub, request):
    responses = list(stub.Decode(request, timeout=TIMEOUT_S))
    samples = [r.stream_content.samples[0] for r in responses]
    return "".join(s.text for s in samples), [t for s in samples for t in s.token_ids]


def test_decode_text_streams_one_token_per_response(stub):
    text, ids = decode(stub, text_request("abc", 5))
    assert text == "abcab" and ids == list(b"abcab")


def test_decode_tokens_and_legacy_fields(stub):
    request = pb2.DecodeRequest(
        token_content=pb2.DecodeRequest.TokenContent(token_ids=[104, 105, 256]),
        max_tokens=8,
        session_cache="ignored",
        priority=7,
        metadata=pb2.DecodeRequest.Metadata(start_time=1.5),
        num_samples=1,
    )
    assert decode(stub, request) == ("hi", [104, 105])


def test_multibyte_text_arrives_whole(stub):
    responses = list(stub.Decode(text_request("€", 3), timeout=TIMEOUT_S))
    assert [r.stream_content.samples[0].text for r in responses] == ["", "", "€"]


def test_health_check(stub):
    assert stub.HealthCheck(pb2.HealthCheckRequest(), timeout=TIMEOUT_S).is_live


@pytest.mark.parametrize(
    "request_,field",
    [
        (text_request("", 4), "text_content.text"),
        (text_request("x" * 33, 4), "text_content.text"),
        (text_request("a", 0), "max_tokens"),
        (text_request("a", -5), "max_tokens"),
        (
            pb2.DecodeRequest(token_content=pb2.DecodeRequest.TokenContent(token_ids=[5, 9999]), max_tokens=2),
            "token_content.token_ids",
        ),
        (pb2.DecodeRequest(max_tokens=2), "text_content"),
        (text_request("a", 2, num_samples=3), "num_samples"),
    ],
)
def test_invalid_argument_names_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Decode(request_, timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_cancel_frees_slot_and_overload_is_resource_exhausted(slow_server):
    orch = slow_server.orchestrator
    with grpc.insecure_channel(slow_server.grpc_target) as channel:
        stub = pb2_grpc.OrchestratorStub(channel)
        busy = stub.Decode(text_request("long", orch.max_tokens_limit), timeout=TIMEOUT_S)
        assert next(busy).stream_content.samples[0].text == "l"
        # the first token streams before the request takes its slot: wait until it holds it
        wait_until(lambda: orch.slots_used == 1 and orch._waiting == 0)
        queued = stub.Decode(text_request("q", 3), timeout=TIMEOUT_S)
        wait_until(lambda: orch._waiting == 1)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Decode(text_request("x", 3), timeout=TIMEOUT_S))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        busy.cancel()
        assert "".join(r.stream_content.samples[0].text for r in queued) == "qqq"
        # well before the 20 s the request would run
        wait_until(lambda: orch.slots_used == 0, what="slot freed by the cancelled request")
