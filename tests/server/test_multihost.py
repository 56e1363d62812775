"""Multi-host control channel (serving/server/multihost.py) over real sockets, with echo engines.

A leader orchestrator drives a LeaderEngine; a worker thread replays the broadcast ops on its own
engine. Both engines record their calls, so the worker must have made exactly the leader's calls,
in the same order. The real two-process JAX run is in tests/server/test_multihost_e2e.py.
"""

from __future__ import annotations

import socket
import threading

import pytest

from serving.engine_api import SamplingParams
from serving.server.multihost import (
    Broadcaster,
    ControlServer,
    ProcessGroup,
    connect_to_leader,
    group_from_env,
    run_worker,
    wrap_engines,
)
from serving.server.orchestrator import Orchestrator
from serving.server.requests import GenerateRequest
from tests.server.fake_engine import ByteTokenizer, EchoEngine, echo_tokens
from tests.server.server_process import consecutive_free_ports, wait_until

TIMEOUT_S = 20


def test_group_from_lws_environment():
    env = {"LWS_LEADER_ADDRESS": "jetstream-0.jetstream", "LWS_GROUP_SIZE": "4", "LWS_WORKER_INDEX": "2"}
    group = group_from_env(env)
    assert group == ProcessGroup("jetstream-0.jetstream", num_processes=4, process_id=2, coordinator_port=8476)
    assert not group.is_leader and group.control_port == 8477
    assert group_from_env({**env, "JAX_COORDINATOR_PORT": "1234"}).coordinator_address == "jetstream-0.jetstream:1234"


def test_single_pod_or_no_lws_is_not_a_group():
    assert group_from_env({}) is None
    assert group_from_env({"LWS_GROUP_SIZE": "1", "LWS_LEADER_ADDRESS": "x", "LWS_WORKER_INDEX": "0"}) is None


def test_incomplete_lws_environment_names_the_missing_variable():
    with pytest.raises(ValueError, match="LWS_WORKER_INDEX"):
        group_from_env({"LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "x"})
    with pytest.raises(ValueError, match="process_id 3"):
        ProcessGroup("x", num_processes=2, process_id=3)


class _Group:
    """A leader ControlServer with one worker thread replaying onto its own echo engine."""

    def __init__(self, disaggregated: bool):
        self.group = ProcessGroup("127.0.0.1", num_processes=2, process_id=0, coordinator_port=consecutive_free_ports())
        self.server = ControlServer(self.group, bind_host="127.0.0.1")
        self.leader = self._engines(disaggregated)
        self.worker = self._engines(disaggregated)
        self.worker_error: list[BaseException] = []
        self.worker_ops = connect_to_leader(self.group, timeout_s=TIMEOUT_S)
        self.server.accept_workers(timeout_s=TIMEOUT_S)
        self.thread = threading.Thread(target=self._replay, daemon=True)
        self.thread.start()

    @staticmethod
    def _engines(disaggregated: bool) -> dict[str, EchoEngine]:
        generate = EchoEngine(slots=2, max_prefill_length=16, max_target_length=64, mesh="generate")
        prefill = EchoEngine(slots=2, max_prefill_length=16, mesh="prefill") if disaggregated else generate
        return {"prefill": prefill, "generate": generate}

    def _replay(self) -> None:
        try:
            run_worker(self.worker, self.worker_ops)
        except BaseException as error:
            self.worker_error.append(error)

    def orchestrator(self) -> Orchestrator:
        wrapped = wrap_engines(self.leader, Broadcaster(self.server.send))
        orch = Orchestrator(
            tokenizer=ByteTokenizer(),
            prefill_engine=wrapped["prefill"],
            generate_engine=wrapped["generate"],
            prefill_params=wrapped["prefill"].load_params(),
            generate_params=wrapped["generate"].load_params(),
        )
        orch.start(warmup=True)
        return orch

    def close(self) -> None:
        self.server.close()
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), "worker did not stop after the leader shut the group down"


@pytest.mark.parametrize("disaggregated", [False, True], ids=["interleaved", "disaggregated"])
def test_worker_replays_every_engine_call_in_order(disaggregated):
    group = _Group(disaggregated)
    orch = group.orchestrator()
    try:
        prompts = ["abc", "hello", "xy", "multi"]
        streams = [
            orch.submit(GenerateRequest(prompt=p, max_tokens=7, sampling=SamplingParams(temperature=1.0, seed=i)))
            for i, p in enumerate(prompts)
        ]
        texts = [stream.collect(timeout_s=TIMEOUT_S).text for stream in streams]
    finally:
        orch.stop()
        group.close()
    tokenizer = ByteTokenizer()
    assert texts == [tokenizer.decode(echo_tokens(tokenizer.encode(p), 7, i)) for i, p in enumerate(prompts)]
    for role in ("prefill", "generate"):
        assert group.worker[role].calls == group.leader[role].calls
        assert group.leader[role].calls, f"{role} engine was never called"
    assert group.worker_error == []  # a clean shutdown op, not a lost leader


def test_worker_whose_leader_vanishes_raises():
    ops = iter(['{"op": "init_decode_state", "role": "generate", "args": {}, "out": 1, "consumes": [], "free": []}\n'])
    with pytest.raises(ConnectionError, match="leader closed"):
        run_worker({"generate": EchoEngine()}, ops)


def test_lost_worker_is_reported_and_fails_the_next_call():
    group = ProcessGroup("127.0.0.1", num_processes=2, process_id=0, coordinator_port=consecutive_free_ports())
    server = ControlServer(group, bind_host="127.0.0.1")
    worker = connect_to_leader(group, timeout_s=TIMEOUT_S)
    server.accept_workers(timeout_s=TIMEOUT_S)
    assert server.problems == []
    worker.buffer.raw._sock.shutdown(socket.SHUT_RDWR)  # the worker process dies
    wait_until(lambda: server.problems, TIMEOUT_S, what="lost worker noticed")
    assert "disconnected" in server.problems[0]
    with pytest.raises(RuntimeError, match="multi-host group broken"):
        server.send({"op": "generate"})
    server.close()
