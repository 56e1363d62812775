"""Engine benchmark: prefill latency per bucket and decode step time for a full batch, no server.

Each positional argument is one configuration: space-separated MaxText-style `key=value` settings
(as `python -m serving` takes them) plus `devices=N` (first N devices; default all) and an
optional `name=...`. The checkpoint (the bundled SmolLM2 GGUF unless load_parameters_path is set)
is read once; every configuration builds its engines directly with `engines_from_params`.

Per configuration it reports: prefill latency (median over --reps, after one compiling call) per
bucket; the prefill -> generate transfer time (disaggregated only); the decode step time with
every slot live (median over --steps, each step read back to the host as the orchestrator does)
and the resulting output tokens/s; and params / KV-cache bytes per device. `--sampling` sets every
request's SamplingParams as JSON values (default greedy), to time penalties or log probabilities:

  python benchmarks/engine_bench.py "devices=1" --sampling 'frequency_penalty=0.5 logprobs=5'

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/engine_bench.py
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/engine_bench.py \\
      "devices=1" "devices=8 ici_tensor_parallelism=4 ici_autoregressive_parallelism=2"

With no configurations it runs the default set below. XLA_FLAGS must be set before starting (JAX
reads it at import).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from serving.engine.jax_engine import EngineSet, engines_from_params  # noqa: E402
from serving.engine.loaders import LOADERS, prepare_params, runtime_config  # noqa: E402
from serving.engine_api import SamplingParams  # noqa: E402
from serving.server.settings import parse_settings  # noqa: E402

DEFAULT_CONFIGS = (
    "name=1dev-f32 devices=1",
    "name=8dev-tp8 devices=8 ici_tensor_parallelism=8",
    "name=8dev-tp4xar2 devices=8 ici_tensor_parallelism=4 ici_autoregressive_parallelism=2",
    "name=disagg-4+4 devices=8 inference_server=ExperimentalMaxtextDisaggregatedServer_8",
    "name=1dev-int8 devices=1 quantization=int8 quantize_kvcache=true",
    "name=1dev-bf16 devices=1 weight_dtype=bfloat16 dtype=bfloat16",
)


@dataclasses.dataclass
class Result:
    name: str
    mesh: str
    batch: int
    prefill_ms: dict[int, float]
    transfer_ms: float | None
    step_ms: float
    params_mib: float
    cache_mib: float

    @property
    def tokens_per_s(self) -> float:
        return self.batch / (self.step_ms / 1e3)


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(name: str, engines: EngineSet, reps: int, steps: int, sampling: SamplingParams) -> Result:
    pre, gen = engines.prefill_engine, engines.generate_engine
    pre_params, gen_params = pre.load_params(), gen.load_params()
    prefill_ms, prefixes = {}, {}
    for bucket in pre.prefill_buckets:
        tokens = list(range(10, 10 + bucket))

        def run(tokens=tokens):
            prefix, first = pre.prefill(params=pre_params, tokens=tokens, sampling=sampling)
            first.to_host()
            return prefix

        prefixes[bucket] = run()  # compile
        prefill_ms[bucket] = _median_ms(run, reps)
    prefix = prefixes[pre.prefill_buckets[0]]
    transfer_ms = None
    if engines.disaggregated:
        move = lambda: jax.block_until_ready(gen.transfer(prefix))  # noqa: E731
        move()
        transfer_ms = _median_ms(move, reps)
    state = gen.init_decode_state()
    for slot in range(gen.max_concurrent_decodes):  # every slot live
        state = gen.insert(gen.transfer(prefix), state, slot=slot)
    holder = {"state": state}

    def step():
        holder["state"], tokens = gen.generate(params=gen_params, decode_state=holder["state"])
        tokens.to_host()

    step()  # compile
    step_ms = _median_ms(step, steps)
    memory = gen.memory()
    mesh = "+".join(
        "x".join(f"{axis[0]}{size}" for axis, size in e.mesh.shape.items() if size > 1) or "1"
        for e in ((pre, gen) if engines.disaggregated else (gen,))
    )
    return Result(
        name,
        mesh,
        gen.max_concurrent_decodes,
        prefill_ms,
        transfer_ms,
        step_ms,
        memory.params_bytes_per_device / 2**20,
        memory.kv_cache_bytes_per_device / 2**20,
    )


def table(results: list[Result]) -> str:
    buckets = sorted({b for r in results for b in r.prefill_ms})
    head = ["config", "mesh", "batch"] + [f"prefill@{b} ms" for b in buckets]
    head += ["xfer ms", "step ms", "tok/s", "params MiB/dev", "KV MiB/dev"]
    rows = [head]
    for r in results:
        rows.append(
            [r.name, r.mesh, str(r.batch)]
            + [f"{r.prefill_ms[b]:.1f}" if b in r.prefill_ms else "-" for b in buckets]
            + [
                "-" if r.transfer_ms is None else f"{r.transfer_ms:.2f}",
                f"{r.step_ms:.1f}",
                f"{r.tokens_per_s:.0f}",
                f"{r.params_mib:.1f}",
                f"{r.cache_mib:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_config(text: str, common: list[str]):
    """(name, devices, EngineSettings) from 'name=.. devices=.. key=value ...'."""
    name, devices, keys = text, len(jax.devices()), []
    for item in text.split():
        key, _, value = item.partition("=")
        if key == "name":
            name = value
        elif key == "devices":
            devices = int(value)
        else:
            keys.append(item)
    return name, jax.devices()[:devices], parse_settings(common + keys).engine_settings()


def parse_sampling(text: str) -> SamplingParams:
    """SamplingParams from 'key=<JSON value> ...' (e.g. 'logprobs=5 logit_bias=[[3,1.5]]')."""
    pairs = (item.partition("=") for item in text.split())
    return SamplingParams(**{key: json.loads(value) for key, _, value in pairs})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--max-prefill", type=int, default=64, help="max_prefill_predict_length (buckets 16..N)")
    parser.add_argument("--max-target", type=int, default=128, help="max_target_length")
    parser.add_argument("--per-device-batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5, help="timed prefills per bucket")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps")
    parser.add_argument("--sampling", default="", help="every request's SamplingParams: 'key=<JSON value> ...'")
    args = parser.parse_args(argv)
    sampling = parse_sampling(args.sampling)
    common = [
        f"max_prefill_predict_length={args.max_prefill}",
        f"max_target_length={args.max_target}",
        f"per_device_batch_size={args.per_device_batch_size}",
    ]
    configs = [parse_config(c, common) for c in args.configs]
    checkpoints = {}
    results = []
    for name, devices, settings in configs:
        loader = next(ld for ld in LOADERS if ld.matches(settings))
        key = (loader.name, settings.load_parameters_path, settings.model_name)
        if key not in checkpoints:
            checkpoints[key] = loader.load(settings)
        arch, raw, tokenizer = checkpoints[key]
        cfg = runtime_config(arch, settings)
        params = prepare_params(cfg, raw, settings.checkpoint_is_quantized)
        start = time.perf_counter()
        engines = engines_from_params(settings, cfg, params, tokenizer, devices)
        result = bench(name, engines, args.reps, args.steps, sampling)
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        results.append(result)
    print(
        f"backend {jax.default_backend()}, {len(jax.devices())} devices; "
        f"defaults (a configuration's own keys win): max_prefill={args.max_prefill} "
        f"max_target={args.max_target} per_device_batch_size={args.per_device_batch_size}; medians of {args.reps} "
        f"prefills / {args.steps} steps"
    )
    print(f"every request: {sampling}")
    print(table(results))


if __name__ == "__main__":
    main()
