"""Servers the benchmarks start and wait for: a free loopback port, the process, readiness.

Shared by serve_bench.py and vs_llamacpp.py (each puts the repository root on sys.path first).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY_POLL_S = 0.5
STOP_TIMEOUT_S = 60.0


@dataclasses.dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start(name: str, cmd: list[str], port: int, health: str, timeout_s: float, env=None) -> Server:
    """Run `cmd` and return once GET `health` on `port` answers 200; SystemExit if the process
    exits first or `timeout_s` passes."""
    print(f"starting {name}:", " ".join(cmd), file=sys.stderr, flush=True)
    process = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://{HOST}:{port}"
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}")
        try:
            if httpx.get(url + health, timeout=5).status_code == 200:
                print(f"{name} ready after {time.monotonic() - started:.0f} s", file=sys.stderr)
                return Server(name, process, url)
        except httpx.TransportError:
            pass
        time.sleep(READY_POLL_S)
    process.terminate()
    raise SystemExit(f"{name} did not become ready in {timeout_s:.0f} s")


def serving_command(port: int, args: list[str]) -> list[str]:
    """`python -m serving` on `port` (HTTP only), with `args` after the loopback flags."""
    return [sys.executable, "-m", "serving", "--host", HOST, "--http-port", str(port), "--grpc-port", "0", *args]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a started `python -m serving`: CPU unless JAX_PLATFORMS says otherwise."""
    return dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), **extra)
