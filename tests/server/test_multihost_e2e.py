"""Multi-host end to end: one logical server over 2 processes x 4 CPU devices (gloo collectives).

Both processes get the same command line and a LeaderWorkerSet-style environment; process 0
serves HTTP, process 1 replays its engine calls. Greedy output over the 8-device mesh
(tensor 4 x autoregressive 2) must equal a single-process, single-device server's, and a worker
that dies must turn the leader's health check off.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.server import server_process
from tests.server.server_process import HOST, consecutive_free_ports, free_port

pytestmark = pytest.mark.slow

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The three laws of motion are",
    "def fibonacci(n):",
]
MAX_TOKENS = 12
# float32: the comparison is of the multi-host replay, exact in float math; int8 activations (the
# CPU default) round per token, where a last-bit difference of sharded sums can flip a near tie
COMMON = [
    "--host",
    HOST,
    "--grpc-port",
    "0",
    "--max-prefill-length",
    "32",
    "--max-target-length",
    "64",
    "--dtype",
    "float32",
]


def generate_all(url: str) -> dict[str, str]:
    out = {}
    for prompt in PROMPTS:
        response = httpx.post(url + "/generate", json={"prompt": prompt, "max_tokens": MAX_TOKENS}, timeout=120)
        assert response.status_code == 200, response.text
        out[prompt] = response.json()["response"]
    return out


def leader_fails_health(url: str, leader, timeout_s: float = 60) -> bool:
    """True once /healthcheck answers 500, or the leader exits non-zero (JAX's own heartbeat
    check may end it first); False if it keeps answering 200 (or exits 0) for timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if leader.poll() is not None:
            return leader.returncode != 0
        try:
            if httpx.get(url + "/healthcheck", timeout=5).status_code == 500:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def single_process_output() -> dict[str, str]:
    http_port = free_port()
    args = [*COMMON, "--http-port", str(http_port), "--slots", "1"]
    with server_process.running(args, server_process.server_env(devices=1), http_port, "single.log"):
        return generate_all(f"http://{HOST}:{http_port}")


def test_two_processes_serve_the_single_process_output_and_fail_health_when_a_worker_dies(
    single_process_output,
):
    http_port, coordinator_port = free_port(), consecutive_free_ports()
    args = [*COMMON, "--http-port", str(http_port),
            "ici_tensor_parallelism=4", "ici_autoregressive_parallelism=2", "per_device_batch_size=1"]  # fmt: skip
    lws = {"LWS_LEADER_ADDRESS": HOST, "LWS_GROUP_SIZE": "2", "JAX_COORDINATOR_PORT": str(coordinator_port)}
    leader, worker = (
        server_process.spawn(args, server_process.server_env(4, **lws, LWS_WORKER_INDEX=str(i)), f"multihost-{i}.log")
        for i in range(2)
    )
    url = f"http://{HOST}:{http_port}"
    try:
        server_process.wait_live(url, [leader, worker])
        assert generate_all(url) == single_process_output

        worker.kill()
        assert leader_fails_health(url, leader), "leader still reports healthy after its worker died"
    finally:
        server_process.stop([leader, worker])
