"""`python -m serving`: load the model, warm up, serve HTTP (JetStream + OpenAI) and gRPC.

  python -m serving [--host H] [--http-port P] [--grpc-port G] [--model PATH] [--slots N]
                    [--max-prefill-length N] [--max-target-length N] [--dtype D] ... [key=value ...]

The MaxText-style `key=value` arguments after the flags are the same list the stack puts in the
LeaderWorkerSet (see serving/server/settings.py). The convenience flags are shorthands for settings keys
and are applied first, so an explicit `key=value` wins:

  --model PATH              load_parameters_path=PATH
  --max-prefill-length N    max_prefill_predict_length=N
  --max-target-length N     max_target_length=N
  --dtype D                 dtype=D weight_dtype=D
  --slots N                 per_device_batch_size=N / (devices of the generate mesh)
  --no-warmup               enable_model_warmup=false
  --compilation-cache-dir D jax_cache_dir=D (JAX's persistent compilation cache; a second start
                            with the same model and settings loads every executable from it)

Start-up runs in two separable steps so a multi-host launcher can run the first everywhere and the
second only on process 0: `build_runtime` (engines, weights, orchestrator) and `serve` (front ends,
warm-up, wait for SIGINT/SIGTERM). /healthcheck answers 500 while warming up, 200 once live.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from serving.engine.settings import EngineSettings
from serving.protocol import GRPC_PORT, HTTP_PORT
from serving.server import multihost
from serving.server.auth import api_key_arg, api_key_from, parse_origins
from serving.server.metrics import ServerMetrics
from serving.server.orchestrator import MIN_QUEUED_REQUESTS, QUEUED_REQUESTS_PER_SLOT, Orchestrator
from serving.server.settings import ServingSettings, SettingsError, parse_settings

# Local runs answer only this machine; a container or pod passes --host 0.0.0.0 (the Dockerfile's
# ENTRYPOINT and the stack's LeaderWorkerSet do).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = HTTP_PORT  # the ports the stack's Service and probes use
DEFAULT_GRPC_PORT = GRPC_PORT
# The first request to try, shown by --help and once the server is ready ({port}: the HTTP port).
QUICK_START_REQUEST = """curl -s localhost:{port}/generate -d '{{"prompt": "What is JAX?", "max_tokens": 32}}'"""
_HEARTBEAT_S = 10.0  # a long start-up step (loading, compiling) says it is still running this often
_LIVENESS_POLL_S = 0.5  # how often `serve` checks that the orchestrator is still live
_GRPC_STOP_GRACE_S = 2.0  # in-flight RPCs get this long to finish at shutdown, then are cancelled


class Progress:
    """Start-up progress on stderr: one line per step with elapsed time, and a heartbeat while a
    long step (loading, compiling) runs."""

    def __init__(self, stream=sys.stderr, heartbeat_s: float = _HEARTBEAT_S):
        self._stream = stream
        self._start = time.perf_counter()
        self._heartbeat_s = heartbeat_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def __call__(self, message: str) -> None:
        print(f"[serving {self.elapsed:7.1f}s] {message}", file=self._stream, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self(f"{what} ...")
        started, done = time.perf_counter(), threading.Event()

        def beat():
            while not done.wait(self._heartbeat_s):
                self(f"  still {what} ({time.perf_counter() - started:.0f}s)")

        ticker = threading.Thread(target=beat, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            self(f"{what}: done in {time.perf_counter() - started:.1f}s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="JetStream-compatible JAX LLM server (HTTP, OpenAI-compatible HTTP, gRPC).",
        epilog="Trailing key=value arguments are MaxText/JetStream settings, e.g.\n"
        "  ici_tensor_parallelism=4 per_device_batch_size=2 quantization=int8\n\n"
        "Once it prints `ready`, from another shell:\n"
        f"  {QUICK_START_REQUEST.format(port=DEFAULT_HTTP_PORT)}\n"
        f"  (OpenAI clients: base URL http://localhost:{DEFAULT_HTTP_PORT}/v1)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default %(default)s; 0.0.0.0 for every interface)"
    )
    parser.add_argument(
        "--http-port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP port, 0 for any free one (default %(default)s)"
    )
    parser.add_argument(
        "--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port, 0 to disable (default %(default)s)"
    )
    parser.add_argument("--model", help="checkpoint path (default: the bundled SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--slots", type=int, help="decode slots (concurrent generations)")
    parser.add_argument("--max-prefill-length", type=int, help="longest prompt in tokens")
    parser.add_argument("--max-target-length", type=int, help="KV cache length: prompt + output")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights and activations")
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        help="requests waiting for a slot before new ones get 503 "
        f"(default: max({MIN_QUEUED_REQUESTS}, {QUEUED_REQUESTS_PER_SLOT} x slots))",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip compiling ahead of serving")
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        help="reuse the KV cache of prompt prefixes seen before (default: on)",
    )
    parser.add_argument("--prefix-cache-tokens", type=int, help="the prefix cache's size in token positions")
    parser.add_argument("--compilation-cache-dir", help="JAX persistent compilation cache directory (local or gs://)")
    parser.add_argument("--log-level", default="warning", help="server log level (default %(default)s)")
    group = parser.add_argument_group("access (HTTP and gRPC; /healthcheck, /metrics and gRPC HealthCheck stay open)")
    group.add_argument(
        "--api-key", type=api_key_arg, metavar="KEY", help="require Authorization: Bearer KEY (default: no key)"
    )
    group.add_argument("--api-key-env", metavar="NAME", help="the same, the key read from environment variable NAME")
    group.add_argument(
        "--allowed-origins",
        type=parse_origins,
        default=(),
        metavar="ORIGINS",
        help="comma-separated origins browsers may call from (CORS), * for any (default: none)",
    )
    group = parser.add_argument_group(
        "multi-host (default: the LeaderWorkerSet environment LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, "
        "LWS_WORKER_INDEX, JAX_COORDINATOR_PORT)"
    )
    group.add_argument("--coordinator-address", help="HOST[:PORT] of process 0 (JAX coordinator)")
    group.add_argument("--num-processes", type=int, help="processes in the group, one per host")
    group.add_argument("--process-id", type=int, help="this process's index; 0 serves the front ends")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="MaxText-style settings")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServingSettings:
    """Flags become key=value settings placed before the explicit ones (which therefore win).

    `--slots` needs the device count, so `with_slots` applies it once JAX is initialised.
    """
    flags: list[str] = []
    for flag, keys in (
        ("model", ("load_parameters_path",)),
        ("max_prefill_length", ("max_prefill_predict_length",)),
        ("max_target_length", ("max_target_length",)),
        ("dtype", ("dtype", "weight_dtype")),
        ("compilation_cache_dir", ("jax_cache_dir",)),
        ("enable_prefix_caching", ("enable_prefix_caching",)),
        ("prefix_cache_tokens", ("prefix_cache_tokens",)),
    ):
        value = getattr(args, flag)
        if value is not None:
            flags += [f"{key}={value}" for key in keys]
    if args.no_warmup:
        flags.append("enable_model_warmup=false")
    base = list(args.settings[:1]) if args.settings and "=" not in args.settings[0] else []
    return parse_settings(base + flags + list(args.settings[len(base) :]))


def with_slots(settings: ServingSettings, slots: int | None, devices: int) -> ServingSettings:
    if slots is None:
        return settings
    generate_devices = devices // 2 if settings.disaggregated else devices
    if slots <= 0 or slots % generate_devices:
        raise SettingsError(
            f"--slots {slots}: must be a positive multiple of the generate mesh's {generate_devices} "
            "devices (slots = per_device_batch_size x devices)"
        )
    return dataclasses.replace(settings, per_device_batch_size=slots // generate_devices)


@dataclasses.dataclass
class Runtime:
    """What `serve` needs: built on every process of a multi-host group."""

    settings: ServingSettings
    engines: Any  # serving.engine.EngineSet
    orchestrator: Orchestrator
    control: multihost.ControlServer | None = None  # process 0 of a multi-host group
    compilation_cache: Any = None  # serving.engine.jax_engine.CompilationCacheStats when enabled


def build_runtime(
    settings: ServingSettings,
    args: argparse.Namespace,
    progress: Progress,
    build_engines: Callable[[EngineSettings], Any] | None = None,
    group: multihost.ProcessGroup | None = None,
) -> Runtime:
    """Engines (default: serving.engine.build_engines), weights on devices, the orchestrator.

    In a multi-host group (this is process 0) every engine call is broadcast to the workers first.
    """
    engines = _load_engines(settings, progress, build_engines)
    loaded_s = progress.elapsed
    if settings.ignored:
        progress("ignored settings (not applicable here): " + "; ".join(settings.ignored))
    progress("memory: " + engines.memory_report())
    control = None
    if group is not None:
        control = _lead_group(group, progress)
        engines = _broadcast_engines(engines, control)
    with progress.step("placing weights on devices"):
        prefill_params = engines.prefill_engine.load_params()
        if engines.generate_engine is engines.prefill_engine:
            generate_params = prefill_params
        else:
            generate_params = engines.generate_engine.load_params()
    metrics = ServerMetrics(model_name=settings.model_name)
    metrics.startup(model_load_s=loaded_s, total_s=progress.elapsed)
    orchestrator = Orchestrator(
        tokenizer=engines.tokenizer,
        prefill_engine=engines.prefill_engine,
        generate_engine=engines.generate_engine,
        prefill_params=prefill_params,
        generate_params=generate_params,
        metrics=metrics,
        max_queued_requests=args.max_queued_requests or None,  # None: the orchestrator's default
        healthy=(lambda: not control.problems) if control else (lambda: True),
    )
    mode = "disaggregated" if orchestrator.disaggregated else "interleaved"
    progress(
        f"{mode} mode: {orchestrator.slots} slots, prompts up to {orchestrator.max_prefill_length} tokens, "
        f"cache {orchestrator.max_target_length} tokens"
    )
    return Runtime(settings, engines, orchestrator, control)


def _load_engines(settings: ServingSettings, progress: Progress, build_engines=None):
    if build_engines is None:  # the model stack (JAX) is imported only to serve
        from serving.engine.jax_engine import build_engines

    with progress.step("loading model and building engines"):
        return build_engines(settings.engine_settings())


def _engine_roles(engines) -> dict[str, Any]:
    return {"prefill": engines.prefill_engine, "generate": engines.generate_engine}


def _lead_group(group: multihost.ProcessGroup, progress: Progress) -> multihost.ControlServer:
    """Process 0: wait for every worker to connect to the control channel."""
    control = multihost.ControlServer(group)
    with progress.step(f"waiting for {group.num_processes - 1} worker(s) on port {group.control_port}"):
        control.accept_workers()
    return control


def _broadcast_engines(engines, control: multihost.ControlServer):
    """The same EngineSet, with every engine call replayed on the workers first."""
    wrapped = multihost.wrap_engines(_engine_roles(engines), multihost.Broadcaster(control.send))
    return dataclasses.replace(engines, prefill_engine=wrapped["prefill"], generate_engine=wrapped["generate"])


def run_worker(settings: ServingSettings, group: multihost.ProcessGroup, progress: Progress) -> int:
    """Processes 1..N-1: build the same engines, then replay process 0's engine calls."""
    engines = _load_engines(settings, progress)
    progress(f"worker {group.process_id}/{group.num_processes}: following the leader at {group.coordinator_host}")
    multihost.run_worker(_engine_roles(engines), multihost.connect_to_leader(group))
    progress("leader shut down the group")
    return 0


def process_group(args: argparse.Namespace) -> multihost.ProcessGroup | None:
    """The multi-host group from the flags, else from the LeaderWorkerSet environment."""
    if args.num_processes is None:
        return multihost.group_from_env()
    if args.coordinator_address is None or args.process_id is None:
        raise SettingsError("--num-processes needs --coordinator-address and --process-id")
    host, _, port = args.coordinator_address.partition(":")
    return multihost.ProcessGroup(
        coordinator_host=host,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_port=int(port or multihost.DEFAULT_COORDINATOR_PORT),
    )


def start_jax(settings: ServingSettings, group: multihost.ProcessGroup | None) -> tuple[str, int]:
    """Join Pathways or the multi-controller group before anything touches a device; then JAX's
    backend ("cpu", "gpu", "tpu") and the number of devices over every process."""
    if settings.enable_single_controller:
        multihost.initialize_single_controller()
    elif group is not None:
        multihost.initialize_distributed(group)
    import jax

    return jax.default_backend(), jax.device_count()


def start_compilation_cache(settings: ServingSettings):
    """The persistent compilation cache when jax_cache_dir is set (before anything compiles)."""
    if not settings.jax_cache_dir:
        return None
    from serving.engine.jax_engine import enable_compilation_cache

    return enable_compilation_cache(settings.jax_cache_dir)


def serve(runtime: Runtime, args: argparse.Namespace, progress: Progress, stop: threading.Event) -> None:
    """Front ends up first (health 500 while warming), then warm-up, then serve until `stop`."""
    from serving.server.grpc_api import start_grpc_server
    from serving.server.http_api import HttpServer, create_app

    orchestrator = runtime.orchestrator
    app = create_app(
        orchestrator,
        model_name=runtime.settings.model_name,
        api_key=args.api_key,
        allowed_origins=args.allowed_origins,
    )
    http = HttpServer(app, args.host, args.http_port, log_level=args.log_level).start()
    grpc_server, grpc_port = None, 0
    if args.grpc_port:  # 0 turns gRPC off
        grpc_server, grpc_port = start_grpc_server(orchestrator, args.host, args.grpc_port, api_key=args.api_key)
    progress(f"HTTP on {args.host}:{http.port}" + (f", gRPC on {args.host}:{grpc_port}" if grpc_server else ""))
    progress(
        ("API key required" if args.api_key else "no API key: anyone who reaches the ports may call")
        + (f"; CORS origins: {', '.join(args.allowed_origins)}" if args.allowed_origins else "")
    )
    try:
        warm = runtime.settings.enable_model_warmup
        warm_start = progress.elapsed
        with progress.step("warming up (compiling every prefill and decode bucket)" if warm else "starting"):
            orchestrator.start(warmup=warm, progress=progress)
        cache = runtime.compilation_cache
        progress(
            f"start-up: compile (warm-up) {progress.elapsed - warm_start:.1f}s, ready after {progress.elapsed:.1f}s"
            + (f"; {cache.describe()}" if cache else "")
        )
        progress("ready: " + QUICK_START_REQUEST.format(port=http.port))
        while not stop.wait(_LIVENESS_POLL_S):
            if not orchestrator.is_live:
                progress("orchestrator is no longer live; /healthcheck reports 500")
                stop.wait()
    finally:
        progress("shutting down")
        http.stop()
        if grpc_server is not None:
            grpc_server.stop(grace=_GRPC_STOP_GRACE_S).wait()
        orchestrator.stop()
        if runtime.control is not None:
            runtime.control.close()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    progress = Progress()
    try:
        args.api_key = api_key_from(args.api_key, args.api_key_env)
        settings = settings_from_args(args)
        group = process_group(args)
        backend, devices = start_jax(settings, group)
        compilation_cache = start_compilation_cache(settings)
        settings = with_slots(settings.for_backend(backend), args.slots, devices)
    except (SettingsError, ValueError, RuntimeError) as exc:  # RuntimeError: Pathways unavailable
        parser.error(str(exc))
    if group is not None and not group.is_leader:
        return run_worker(settings, group, progress)
    runtime = build_runtime(settings, args, progress, group=group)
    runtime.compilation_cache = compilation_cache
    serve(runtime, args, progress, _stop_on_signals())
    return 0
