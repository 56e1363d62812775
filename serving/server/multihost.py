"""One logical server over several JAX processes (multi-controller), and Pathways (single-controller).

Multi-controller JAX runs one process per host; every process must launch the same jitted programs
in the same order or the collectives inside them deadlock. So process 0 (the leader) owns the front
ends and the orchestrator, and every engine call it makes is first broadcast to the other processes
(the workers) over a control channel, then dispatched locally, all under one lock: the engine calls
form one totally ordered stream that every process replays.

  leader:  orchestrator threads -> LeaderEngine.prefill(...) --lock--> send op --> inner.prefill(...)
  workers: run_worker(): recv op -> inner.prefill(...) (same arguments, same order)

The opaque pytrees an engine hands back (Params, Prefix, DecodeState) differ per process, so the
leader hands out `_Handle`s with ids; each worker keeps the object for each id. Handles that an op
consumes (a donated DecodeState, an inserted Prefix) are dropped on both sides; a Prefix that is
never inserted (a cancelled request) is released when its handle is garbage collected.

Failure: a worker whose control connection closes marks the group unhealthy, so the leader's
health check fails and LeaderWorkerSet recreates the whole group instead of hanging in a collective
that can never finish. A worker whose leader disappears exits non-zero for the same reason.

Where the group comes from: the LeaderWorkerSet environment (LWS_LEADER_ADDRESS, LWS_GROUP_SIZE,
LWS_WORKER_INDEX) or explicit flags; the coordinator port is JAX_COORDINATOR_PORT (default 8476)
and the control channel listens on the port after it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from serving.engine_api import Engine, SamplingParams
from serving.protocol import CONTROL_PORT, COORDINATOR_PORT, COORDINATOR_PORT_ENV

log = logging.getLogger(__name__)

DEFAULT_COORDINATOR_PORT = COORDINATOR_PORT
CONNECT_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a multi-controller group."""

    coordinator_host: str
    num_processes: int
    process_id: int
    coordinator_port: int = DEFAULT_COORDINATOR_PORT

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id {self.process_id} is outside 0..{self.num_processes - 1}")

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def coordinator_address(self) -> str:
        return f"{self.coordinator_host}:{self.coordinator_port}"

    @property
    def control_port(self) -> int:
        return self.coordinator_port + (CONTROL_PORT - COORDINATOR_PORT)


def group_from_env(environ: Mapping[str, str] = os.environ) -> ProcessGroup | None:
    """The group described by LeaderWorkerSet's environment, or None outside a multi-pod group."""
    size = environ.get("LWS_GROUP_SIZE")
    if size is None or int(size) <= 1:
        return None
    missing = [key for key in ("LWS_LEADER_ADDRESS", "LWS_WORKER_INDEX") if key not in environ]
    if missing:
        raise ValueError(f"LWS_GROUP_SIZE={size} but {', '.join(missing)} unset")
    return ProcessGroup(
        coordinator_host=environ["LWS_LEADER_ADDRESS"],
        num_processes=int(size),
        process_id=int(environ["LWS_WORKER_INDEX"]),
        coordinator_port=int(environ.get(COORDINATOR_PORT_ENV, DEFAULT_COORDINATOR_PORT)),
    )


def initialize_distributed(group: ProcessGroup) -> None:
    """Join the JAX process group (CPU collectives: gloo, jax's default; GPU/TPU bring their own)."""
    import jax

    jax.distributed.initialize(
        coordinator_address=group.coordinator_address,
        num_processes=group.num_processes,
        process_id=group.process_id,
    )


def initialize_single_controller() -> None:
    """Pathways: one process drives every host's chips through the Pathways proxy."""
    try:
        import pathwaysutils
    except ImportError:
        raise RuntimeError(
            "enable_single_controller=true needs Pathways: install pathwaysutils and run beside a "
            "pathways-proxy (JAX_PLATFORMS=proxy, JAX_BACKEND_TARGET=grpc://<proxy>:38681)"
        ) from None
    pathwaysutils.initialize()


# --- control channel: newline-delimited JSON ops, leader -> workers ---------------------------


class ControlServer:
    """The leader's end: one connection per worker; tracks whether every worker is still there."""

    def __init__(self, group: ProcessGroup, bind_host: str = "0.0.0.0"):
        self._expected = group.num_processes - 1
        self._listener = socket.create_server((bind_host, group.control_port))
        self._workers: list[socket.socket] = []
        self._lost: list[str] = []
        self._closing = False

    def accept_workers(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self._listener.settimeout(timeout_s)
        while len(self._workers) < self._expected:
            conn, address = self._listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._workers.append(conn)
            threading.Thread(target=self._watch, args=(conn, address), daemon=True).start()
        self._listener.close()

    def _watch(self, conn: socket.socket, address) -> None:
        # Workers never send; a read returning means the connection closed (the worker died).
        with contextlib.suppress(OSError):
            conn.recv(1)
        if self._closing:
            return
        self._lost.append(f"worker at {address[0]}:{address[1]} disconnected")
        log.error("multi-host group unhealthy: %s", self._lost[-1])

    @property
    def problems(self) -> list[str]:
        return list(self._lost)

    def send(self, op: dict) -> None:
        line = (json.dumps(op) + "\n").encode()
        for conn in self._workers:
            try:
                conn.sendall(line)
            except OSError as error:
                self._lost.append(f"send to worker failed: {error}")
        if self._lost:
            raise RuntimeError(f"multi-host group broken: {'; '.join(self._lost)}")

    def close(self) -> None:
        """End the group cleanly: workers get a shutdown op, then see the channel close."""
        self._closing = True
        for conn in self._workers:
            with contextlib.suppress(OSError):
                conn.sendall(b'{"op": "shutdown"}\n')
        for conn in self._workers:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # the workers see the channel end and exit
            conn.close()


def connect_to_leader(group: ProcessGroup, timeout_s: float = CONNECT_TIMEOUT_S):
    """The worker's end: a line iterator over ops from the leader (ends when the leader goes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = socket.create_connection((group.coordinator_host, group.control_port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.settimeout(None)
    return conn.makefile("r", encoding="utf-8")


# --- engines -------------------------------------------------------------------------------------


class _Handle:
    """The leader's stand-in for an opaque pytree that every process holds its own copy of."""

    __slots__ = ("__weakref__", "id", "value")

    def __init__(self, handle_id: int, value: Any):
        self.id = handle_id
        self.value = value


class LeaderEngine(Engine):
    """Wraps an engine so that each call is replayed, in the same order, on every worker."""

    def __init__(self, inner: Engine, role: str, broadcaster: Broadcaster):
        self._inner = inner
        self._role = role
        self._broadcaster = broadcaster

    max_concurrent_decodes = property(lambda self: self._inner.max_concurrent_decodes)
    max_prefill_length = property(lambda self: self._inner.max_prefill_length)
    max_target_length = property(lambda self: self._inner.max_target_length)
    prefill_buckets = property(lambda self: self._inner.prefill_buckets)
    prefix_caching = property(lambda self: self._inner.prefix_caching)

    def _call(self, op: str, consumes: Sequence[str] = (), **args):
        return self._broadcaster.call(self._inner, self._role, op, args, consumes)

    def load_params(self):
        return self._call("load_params")

    def init_decode_state(self):
        return self._call("init_decode_state")

    def prefill(self, *, params, tokens, sampling, token_mask=None):
        tokens = [int(t) for t in tokens]
        return self._call("prefill", params=params, tokens=tokens, sampling=sampling, token_mask=token_mask)

    def transfer(self, prefix):
        return self._call("transfer", ("prefix",), prefix=prefix)

    def insert(self, prefix, decode_state, slot):
        return self._call("insert", ("prefix", "decode_state"), prefix=prefix, decode_state=decode_state, slot=slot)

    def release(self, decode_state, slot):
        return self._call("release", ("decode_state",), decode_state=decode_state, slot=slot)

    def generate(self, *, params, decode_state, token_mask=None):
        return self._call(
            "generate", ("decode_state",), params=params, decode_state=decode_state, token_mask=token_mask
        )

    def warmup(self, params, *, prefill=True, generate=True):
        """The inner engine's own warm-up (it may compile more than the base class's calls do)."""
        self._call("warmup", params=params, prefill=prefill, generate=generate)


# Ops whose result is (opaque pytree, StepTokens): only the pytree gets a handle.
_RETURNS_STEP_TOKENS = ("prefill", "generate")
_OPS = ("load_params", "init_decode_state", "prefill", "transfer", "insert", "release", "generate", "warmup")


class Broadcaster:
    """Orders every engine call of the leader into one stream and sends it to the workers."""

    def __init__(self, send: Callable[[dict], None]):
        self._send = send
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._released: collections.deque[int] = collections.deque()  # ids collected on the leader

    def call(self, engine: Engine, role: str, op: str, args: dict, consumes: Sequence[str]):
        wire = {key: _to_wire(value) for key, value in args.items()}
        local = {key: value.value if isinstance(value, _Handle) else value for key, value in args.items()}
        with self._lock:
            out_id = next(self._ids)
            released = [self._released.popleft() for _ in range(len(self._released))]
            self._send(
                {"role": role, "op": op, "args": wire, "out": out_id, "consumes": list(consumes), "free": released}
            )
            result = getattr(engine, op)(**local)
        for key in consumes:  # the workers dropped theirs; drop the leader's (donated) buffers too
            args[key].value = None
        if op in _RETURNS_STEP_TOKENS:
            return self._handle(out_id, result[0]), result[1]
        return self._handle(out_id, result)

    def _handle(self, out_id: int, value: Any) -> _Handle:
        handle = _Handle(out_id, value)
        weakref.finalize(handle, self._released.append, out_id)
        return handle


def _to_wire(value: Any) -> Any:
    if isinstance(value, _Handle):
        return value.id
    if isinstance(value, SamplingParams):
        return dataclasses.asdict(value)
    if isinstance(value, np.ndarray):  # a token mask
        return value.tolist()
    return value


def wrap_engines(engines: Mapping[str, Engine], broadcaster: Broadcaster) -> dict[str, Engine]:
    """LeaderEngines sharing one broadcaster; the same inner engine under two roles is wrapped once."""
    wrapped: dict[int, Engine] = {}
    return {
        role: wrapped.setdefault(id(engine), LeaderEngine(engine, role, broadcaster))
        for role, engine in engines.items()
    }


_HANDLE_ARGS = ("params", "prefix", "decode_state")


def run_worker(engines: Mapping[str, Engine], ops) -> None:
    """Replay the leader's engine calls until it shuts the group down.

    A channel that closes without a shutdown op means the leader died: raise, so this process
    exits non-zero and LeaderWorkerSet recreates the group.
    """
    objects: dict[int, Any] = {}
    for line in ops:
        op = json.loads(line)
        if op["op"] == "shutdown":
            return
        if op["op"] not in _OPS:
            raise ValueError(f"unknown engine op {op['op']!r} from the leader")
        for handle_id in op["free"]:
            objects.pop(handle_id, None)
        args = {key: _from_wire(key, value, objects) for key, value in op["args"].items()}
        for key in op["consumes"]:
            objects.pop(op["args"][key])
        result = getattr(engines[op["role"]], op["op"])(**args)
        objects[op["out"]] = result[0] if op["op"] in _RETURNS_STEP_TOKENS else result
    raise ConnectionError("the leader closed the control channel")


def _from_wire(key: str, value: Any, objects: Mapping[int, Any]) -> Any:
    if key in _HANDLE_ARGS:
        return objects[value]
    if key == "sampling":
        return SamplingParams(**value)
    if key == "token_mask" and value is not None:
        return np.asarray(value, np.int32)
    return value
