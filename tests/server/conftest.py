"""Fixtures: in-process HTTP + gRPC servers over the echo engine, on free loopback ports.

Test modules import helpers from tests.server.server_process / tests.server.fake_engine, never
from a conftest: pytest loads conftests itself, and a helper has one home that any test can import.
"""

from __future__ import annotations

import dataclasses

import pytest

from serving.server.auth import ApiKey
from serving.server.grpc_api import start_grpc_server
from serving.server.http_api import HttpServer, create_app
from serving.server.orchestrator import Orchestrator
from tests.server.fake_engine import EchoEngine, echo_orchestrator
from tests.server.server_process import ALLOWED_ORIGIN, API_KEY, HOST


@dataclasses.dataclass
class FakeServer:
    orchestrator: Orchestrator
    engine: EchoEngine
    http_url: str
    grpc_target: str


def _serve(engine: EchoEngine, max_queued_requests: int, api_key: ApiKey | None = None, allowed_origins=()):
    orch = echo_orchestrator(engine, max_queued_requests=max_queued_requests)
    app = create_app(orch, model_name="echo", api_key=api_key, allowed_origins=allowed_origins)
    http = HttpServer(app, HOST, 0).start()  # port 0: no race for a port
    grpc_server, grpc_port = start_grpc_server(orch, HOST, 0, api_key=api_key)
    server = FakeServer(orch, engine, f"http://{HOST}:{http.port}", f"{HOST}:{grpc_port}")
    return server, lambda: (http.stop(), grpc_server.stop(grace=1).wait(), orch.stop())


@pytest.fixture(scope="module")
def fake_server():
    """Fast echo server: 4 slots, prompts up to 32 tokens, 96-token cache."""
    server, stop = _serve(EchoEngine(slots=4, max_prefill_length=32, max_target_length=96), 16)
    yield server
    stop()


@pytest.fixture(scope="module")
def slow_server():
    """One slot, one queued request, 20 ms per decode step: for overload and cancellation.

    A request for the most tokens allowed (orchestrator.max_tokens_limit) holds the slot for 20 s,
    far longer than any test needs it even on a loaded CI machine: only a cancellation frees it early.
    """
    engine = EchoEngine(slots=1, max_prefill_length=16, max_target_length=1024, step_delay_s=0.02)
    server, stop = _serve(engine, 1)
    yield server
    stop()


@pytest.fixture(scope="module")
def keyed_server():
    """The fast echo server with an API key (API_KEY) and CORS for ALLOWED_ORIGIN."""
    engine = EchoEngine(slots=4, max_prefill_length=32, max_target_length=96)
    server, stop = _serve(engine, 16, api_key=ApiKey(API_KEY), allowed_origins=(ALLOWED_ORIGIN,))
    yield server
    stop()
