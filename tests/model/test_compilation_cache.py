"""The persistent compilation cache: the flag and the MaxText-style key set it, and a second
start with the same model and settings compiles nothing (every executable comes from the cache).

Each start runs in its own process: the cache directory is process-wide JAX configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serving.server import cli
from serving.server.settings import parse_settings

ROOT = Path(__file__).resolve().parents[2]
# A start of the tiny model (random weights, two prefill and two decode buckets) with the cache
# enabled; prints the cache's counts.
START = """
import json, sys
from serving.engine.jax_engine import build_engines, enable_compilation_cache
from serving.server.settings import parse_settings
stats = enable_compilation_cache(sys.argv[1])
settings = parse_settings(["model_name=tiny", "max_prefill_predict_length=32", "max_target_length=64",
                           "per_device_batch_size=2"])
engines = build_engines(settings.engine_settings())
engines.generate_engine.warmup(engines.generate_engine.load_params())
print(json.dumps({"hits": stats.hits, "misses": stats.misses}))
"""


def _start(cache_dir: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", START, str(cache_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_flag_and_the_key_set_the_cache_directory():
    args = cli.build_parser().parse_intermixed_args(["--compilation-cache-dir", "/cache"])
    assert cli.settings_from_args(args).jax_cache_dir == "/cache"
    assert parse_settings(["jax_cache_dir=gs://bucket/deployment"]).jax_cache_dir == "gs://bucket/deployment"
    assert cli.start_compilation_cache(parse_settings([])) is None  # off unless asked for


def test_a_second_start_compiles_nothing(tmp_path):
    first = _start(tmp_path)
    assert first["hits"] == 0 and first["misses"] > 0
    second = _start(tmp_path)
    assert second == {"hits": first["misses"], "misses": 0}
