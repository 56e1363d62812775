"""Fixtures: in-process HTTP + gRPC servers over the echo engine, on free loopback ports.

Test modules import helpers from server_process / fake_engine, never from `conftest`: with
several test folders each having a conftest, `from conftest import` resolves to whichever was
imported first.
"""

from __future__ import annotations

import dataclasses

import pytest
from fake_engine import EchoEngine, echo_orchestrator
from server_process import HOST, free_port

from serving.grpc_api import start_grpc_server
from serving.http_api import HttpServer, create_app
from serving.orchestrator import Orchestrator


@dataclasses.dataclass
class FakeServer:
    orchestrator: Orchestrator
    engine: EchoEngine
    http_url: str
    grpc_target: str


def _serve(engine: EchoEngine, max_queued_requests: int):
    orch = echo_orchestrator(engine, max_queued_requests=max_queued_requests)
    http_port, grpc_port = free_port(), free_port()
    http = HttpServer(create_app(orch, model_name="echo"), HOST, http_port).start()
    grpc_server = start_grpc_server(orch, HOST, grpc_port)
    server = FakeServer(orch, engine, f"http://{HOST}:{http_port}", f"{HOST}:{grpc_port}")
    return server, lambda: (http.stop(), grpc_server.stop(grace=1).wait(), orch.stop())


@pytest.fixture(scope="module")
def fake_server():
    """Fast echo server: 4 slots, prompts up to 32 tokens, 96-token cache."""
    server, stop = _serve(EchoEngine(slots=4, max_prefill_length=32, max_target_length=96), 16)
    yield server
    stop()


@pytest.fixture(scope="module")
def slow_server():
    """One slot, one queued request, 20 ms per decode step: for overload and cancellation."""
    engine = EchoEngine(slots=1, max_prefill_length=16, max_target_length=256, step_delay_s=0.02)
    server, stop = _serve(engine, 1)
    yield server
    stop()
