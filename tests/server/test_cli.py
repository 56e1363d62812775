"""serving/server/cli.py: flag mapping, and build_runtime + serve wired to the echo engine in-process."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
import threading
from collections.abc import Iterator

import httpx
import pytest

from serving.server import cli
from serving.server.orchestrator import default_max_queued_requests
from serving.server.settings import DISAGGREGATED_SERVER, SettingsError
from tests.server.fake_engine import ByteTokenizer, EchoEngine
from tests.server.server_process import HOST, ROOT, wait_until


def settings(argv, devices=1):
    args = cli.build_parser().parse_intermixed_args(argv)
    return cli.with_slots(cli.settings_from_args(args), args.slots, devices)


def test_flags_map_onto_settings_keys():
    s = settings(
        ["--model", "/m.gguf", "--max-prefill-length", "64", "--max-target-length", "128", "--dtype", "bfloat16"]
    )
    assert s.load_parameters_path == "/m.gguf"
    assert (s.max_prefill_predict_length, s.max_target_length) == (64, 128)
    assert (s.dtype, s.weight_dtype) == ("bfloat16", "bfloat16")
    assert not settings(["--no-warmup"]).enable_model_warmup
    assert settings([]).enable_prefix_caching
    assert not settings(["--no-enable-prefix-caching"]).enable_prefix_caching
    assert settings(["--prefix-cache-tokens", "4096"]).prefix_cache_tokens == 4096


def test_key_values_follow_flags_and_win():
    s = settings(["base.yml", "--http-port", "8001", "max_target_length=1500", "--max-target-length", "1200"])
    assert s.max_target_length == 1500
    assert s.ignored == ("base.yml",)


def test_slots_divide_over_the_generate_mesh():
    assert settings(["--slots", "8"], devices=4).per_device_batch_size == 2
    disagg = settings(["--slots", "8", f"inference_server={DISAGGREGATED_SERVER}"], devices=8)
    assert disagg.per_device_batch_size == 2  # 8 devices -> 4 prefill + 4 generate
    with pytest.raises(SettingsError, match="--slots 3"):
        settings(["--slots", "3"], devices=2)


def test_local_runs_bind_loopback_and_the_image_binds_every_interface():
    assert cli.build_parser().parse_intermixed_args([]).host == "127.0.0.1"
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", (ROOT / "serving/Dockerfile").read_text(), re.MULTILINE)
    command = json.loads(entrypoint.group(1))
    assert command[command.index("--host") + 1] == "0.0.0.0"  # a pod is reached through its IP


def test_help_shows_the_quick_start_request(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    curl = next(line.strip() for line in help_text.splitlines() if line.strip().startswith("curl "))
    words = shlex.split(curl)
    assert words[-2] == "-d" and words[2] == "localhost:8000/generate"
    assert set(json.loads(words[-1])) == {"prompt", "max_tokens"}


def test_queue_limit_default():
    assert default_max_queued_requests(4) == 64  # a floor for small servers
    assert default_max_queued_requests(128) == 256  # two per slot


def test_unknown_key_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--http-port", "1", "not_a_key=1"])
    assert info.value.code == 2
    assert "not_a_key" in capsys.readouterr().err


@dataclasses.dataclass
class FakeEngineSet:
    tokenizer: ByteTokenizer
    prefill_engine: EchoEngine
    generate_engine: EchoEngine
    model_config: object = None

    def memory_report(self) -> str:
        return "params: 0 bytes"


class GatedWarmupEngine(EchoEngine):
    """Warm-up waits for the test, so it can see the health check before the server is live."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.warmup_gate = threading.Event()

    def warmup(self, params, **roles):
        assert self.warmup_gate.wait(20), "test never opened the warm-up gate"
        super().warmup(params, **roles)


@contextlib.contextmanager
def serving(argv: list[str], engine: EchoEngine) -> Iterator[tuple[str, io.StringIO]]:
    """build_runtime + serve on the echo engine in a thread: (its URL, its progress log), then stop."""
    args = cli.build_parser().parse_intermixed_args(  # HTTP port 0: the server picks and reports one
        ["--host", HOST, "--http-port", "0", "--grpc-port", "0", *argv]
    )
    out = io.StringIO()
    progress = cli.Progress(stream=out)
    s = cli.with_slots(cli.settings_from_args(args), args.slots, 1)
    runtime = cli.build_runtime(
        s, args, progress, build_engines=lambda _: FakeEngineSet(ByteTokenizer(), engine, engine)
    )
    stop = threading.Event()
    server = threading.Thread(target=cli.serve, args=(runtime, args, progress, stop), daemon=True)
    server.start()
    try:
        wait_until(lambda: "HTTP on" in out.getvalue(), 20, what="HTTP server up")
        yield "http://" + re.search(r"HTTP on (\S+)", out.getvalue()).group(1), out
    finally:
        stop.set()
        server.join(timeout=20)
    assert not server.is_alive()


def test_serve_reports_progress_and_is_live_only_after_warmup():
    engine = GatedWarmupEngine(slots=2, max_prefill_length=16, max_target_length=32)
    with serving(["--slots", "2", "compute_axis_order=0,1,2,3"], engine) as (url, out):
        try:
            health = httpx.get(url + "/healthcheck", timeout=5)
            assert health.status_code == 500  # warming up
            engine.warmup_gate.set()
            wait_until(lambda: httpx.get(url + "/healthcheck", timeout=5).status_code == 200, 20, what="live")
            r = httpx.post(url + "/generate", json={"prompt": "hey", "max_tokens": 4}, timeout=10)
            assert r.json() == {"response": "heyh"}
        finally:
            engine.warmup_gate.set()
    log = out.getvalue()
    assert "ignored settings (not applicable here): compute_axis_order" in log
    assert "params: 0 bytes" in log and "ready: curl" in log and "shutting down" in log
    assert log.count("ignored settings") == 1


def test_the_start_up_log_says_a_key_is_required_and_never_shows_it(caplog):
    key, origin = "start-up-log-key-0123", "https://chat.example.com"
    argv = ["--no-warmup", "--api-key", key, "--allowed-origins", f"{origin}, *"]
    assert cli.build_parser().parse_intermixed_args(argv).allowed_origins == (origin, "*")
    assert key not in repr(cli.build_parser().parse_intermixed_args(argv))
    with serving(argv, EchoEngine(slots=2, max_prefill_length=16, max_target_length=32)) as (url, out):
        wait_until(lambda: "ready" in out.getvalue(), 20, what="server ready")
        body = {"prompt": "hey", "max_tokens": 2}
        assert httpx.post(url + "/generate", json=body, timeout=10).status_code == 401
        authorized = httpx.post(url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert authorized.json() == {"response": "he"}
    assert "API key required" in out.getvalue() and origin in out.getvalue()
    assert key not in out.getvalue() and key not in caplog.text


def test_an_empty_api_key_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_intermixed_args(["--api-key", "  "])
    assert "must not be empty" in capsys.readouterr().err
