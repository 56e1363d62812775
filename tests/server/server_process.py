"""Test plumbing: free loopback ports, polling, `python -m serving` as a subprocess, and reading its
/metrics as Prometheus does."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300
HOST = "127.0.0.1"
# Every server the tests start shares one JAX persistent compilation cache for the session: a model
# and settings that several tests serve compile once (a SmolLM2 start's warm-up is ~60 s cold,
# ~18 s from the cache), not once per test. A start with its own `jax_cache_dir` uses that instead.
COMPILATION_CACHE = Path(tempfile.mkdtemp(prefix="serving-tests-jax-cache-"))
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
# The API key and the browser origin of the keyed_server fixture (conftest.py).
API_KEY = "test-key-0123456789"
ALLOWED_ORIGIN = "https://chat.example.com"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def consecutive_free_ports() -> int:
    """A port p with p and p + 1 free: a multi-host group's JAX coordinator and its control channel."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition", every_s: float = 0.01) -> None:
    """Poll `predicate` every `every_s`; fail the test if it is not true within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s} s"
        time.sleep(every_s)


def server_env(devices: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(COMPILATION_CACHE),
        **extra,
    }


def spawn(args: Sequence[str], env: dict[str, str], log_name: str) -> subprocess.Popen:
    """Start `python -m serving ARGS`; its output goes to .pytest_cache/<log_name> when it exists."""
    cache = ROOT / ".pytest_cache"
    command = [sys.executable, "-m", "serving", *args]
    if not cache.is_dir():
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(cache / log_name, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_live(url: str, processes: Sequence[subprocess.Popen], timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll /healthcheck until 200; fail early if any of the processes exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in processes:
            assert proc.poll() is None, f"server process exited with {proc.returncode}"
        assert time.monotonic() < deadline, "server did not become live in time"
        try:
            if httpx.get(url + "/healthcheck", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def stop(processes: Sequence[subprocess.Popen]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def running(args: Sequence[str], env: dict[str, str], http_port: int, log_name: str) -> Iterator[subprocess.Popen]:
    """One live server process for the duration of the block."""
    proc = spawn(args, env, log_name)
    try:
        wait_live(f"http://{HOST}:{http_port}", [proc])
        yield proc
    finally:
        stop([proc])


# -- the tiny random-weight model as a real server: for plumbing (metrics, autoscaling) -----------
TINY_PROMPT = "hello"  # 5 byte tokens; the tiny model's tokenizer is one token per byte


def tiny_server_args(http_port: int, *, slots: int, max_target_length: int) -> list[str]:
    """`python -m serving` on the `tiny` config: loads in no time, compiles in seconds."""
    return [
        "--host", HOST, "--http-port", str(http_port), "--grpc-port", "0", "--slots", str(slots),
        "--max-prefill-length", "16", "--max-target-length", str(max_target_length), "model_name=tiny",
    ]  # fmt: skip


def long_completion(url: str, max_tokens: int, headers: dict[str, str] | None = None) -> dict:
    """One greedy completion of exactly max_tokens tokens (the random model's EOS is ignored)."""
    body = {"prompt": TINY_PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, headers=headers or {}, timeout=START_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return r.json()


@dataclasses.dataclass(frozen=True)
class Gauge:
    value: float
    labels: dict[str, str]


def metric_sample(text: str, name: str) -> float:
    """The value of sample `name` in Prometheus exposition text (one series per metric here)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(f"{name} not in the metrics")


def scrape_sample(url: str, name: str) -> float:
    """Sample `name` of a server's /metrics."""
    return metric_sample(httpx.get(url + "/metrics", timeout=10).text, name)


def scrape_gauges(url: str) -> dict[str, Gauge]:
    """A server's /metrics as Prometheus reads it: every gauge (one series each here) by name."""
    text = httpx.get(url + "/metrics", timeout=10).text
    gauges = {}
    for family in text_string_to_metric_families(text):
        if family.type == "gauge":
            (sample,) = family.samples
            gauges[family.name] = Gauge(sample.value, sample.labels)
    return gauges
