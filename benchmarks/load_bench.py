"""Checkpoint loading: peak host memory and speed of placing a >= 1B-parameter model on the devices.

    python benchmarks/load_bench.py [--dir /tmp/llama3.2-1b-random] [--dtype bfloat16] [--int8]

Writes once (kept for later runs) a random-weight Hugging Face checkpoint with Llama 3.2 1B's
shapes (1.24B parameters, tied embeddings, llama3 RoPE scaling) as bfloat16 safetensors, about
2.5 GB, tensor by tensor. Then loads it twice, each in a fresh process so its peak RSS is its own:
the first read warms the page cache, the second is the warm-cache measurement. A load is what the
server does at start: read the directory, make each tensor lazy in the serving dtype, and place
the params on the devices (`JaxEngine.load_params`), until every array is ready.

Reported per load: seconds, GB/s (weights in the serving dtype / seconds), peak RSS, and the
budget it must stay under: the weights in the serving dtype + 2 GiB (peak RSS is the whole
process's, JAX runtime included); then where the seconds went: reading the memory-mapped tensors
into host arrays in the serving dtype (the dtype conversion and the stacking of layers into [L, ...]
arrays happen in that copy; int8 quantization too, with --int8), placing them on the devices
(`jax.make_array_from_callback`), and the rest (the index, the config, the engine, the final wait).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

GB = 1e9
BUDGET_OVER_WEIGHTS = 2 * 2**30
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update(
            {
                f"{layer}.input_layernorm.weight": (d,),
                f"{layer}.post_attention_layernorm.weight": (d,),
                f"{layer}.self_attn.q_proj.weight": (q, d),
                f"{layer}.self_attn.k_proj.weight": (kv, d),
                f"{layer}.self_attn.v_proj.weight": (kv, d),
                f"{layer}.self_attn.o_proj.weight": (d, q),
                f"{layer}.mlp.gate_proj.weight": (f, d),
                f"{layer}.mlp.up_proj.weight": (f, d),
                f"{layer}.mlp.down_proj.weight": (d, f),
            }
        )
    return shapes


def random_bf16_bits(rng, n: int) -> np.ndarray:
    """bfloat16 bit patterns of random values of magnitude 2^-7 .. 2^-6 and random sign (cheap to
    draw for a billion values: no float arithmetic)."""
    bits = rng.integers(0, 2**16, n, dtype=np.uint16)
    return (bits & 0x807F) | (120 << 7)


def write_checkpoint(path: Path) -> None:
    """config.json and one model.safetensors (bfloat16), written tensor by tensor."""
    path.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(LLAMA32_1B)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(0)
    with open(path / "model.safetensors.partial", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for shape in shapes.values():
            n = int(np.prod(shape))
            ones = np.full(n, 0x3F80, np.uint16)  # bfloat16 1.0: norm weights
            f.write((ones if len(shape) == 1 else random_bf16_bits(rng, n)).tobytes())
    (path / "model.safetensors.partial").rename(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(LLAMA32_1B, indent=1))


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, it does not carry
    over the peak of the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def timed(owner, name: str, totals: dict, key: str):
    """Adds the seconds spent in calls of `owner.name` to totals[key] while the block runs (the
    outermost call only: an int8 leaf's read reads its float tensor inside)."""
    original, depth = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        depth[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                totals[key] += time.perf_counter() - started

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def measure(path: str, dtype: str, int8: bool, scan_layers: bool) -> dict:
    """One load in this process: read, make lazy, place, wait. Returns the numbers."""
    import jax

    from serving.engine.jax_engine import JaxEngine
    from serving.engine.loaders import hf_loader, lazy, prepare_params, runtime_config
    from serving.server.settings import ServingSettings

    jax.devices()  # the runtime's own memory is not the load's
    before = peak_rss()
    stages = {"read": 0.0, "place": 0.0}
    start = time.perf_counter()
    settings = ServingSettings(
        weight_dtype=dtype,
        dtype=dtype,
        quantization="int8" if int8 else "",
        per_device_batch_size=1,
        scan_layers=scan_layers,
    ).engine_settings()
    with timed(lazy.LazyTensor, "read", stages, "read"), timed(jax, "make_array_from_callback", stages, "place"):
        arch, lazy_params = hf_loader.read_checkpoint(path, settings.max_target_length)
        cfg = runtime_config(arch, settings)
        engine = JaxEngine(settings, cfg, prepare_params(cfg, lazy_params, False), jax.devices()[:1])
        jax.block_until_ready(engine.load_params())
    seconds = time.perf_counter() - start
    weights = engine.memory().params_bytes
    peak = peak_rss()
    stages["other"] = seconds - stages["read"] - stages["place"]
    return {"seconds": seconds, "weights_bytes": weights, "peak_rss": peak, "rss_before_load": before, "stages": stages}


def report(label: str, m: dict) -> str:
    budget = m["weights_bytes"] + BUDGET_OVER_WEIGHTS
    verdict = "within" if m["peak_rss"] <= budget else "OVER"
    stages = m["stages"]
    return (
        f"{label}: {m['seconds']:.2f} s, {m['weights_bytes'] / GB / m['seconds']:.2f} GB/s; peak RSS "
        f"{m['peak_rss'] / 2**30:.2f} GiB (runtime before loading {m['rss_before_load'] / 2**30:.2f} GiB), "
        f"{verdict} the budget weights {m['weights_bytes'] / 2**30:.2f} GiB + 2 GiB = {budget / 2**30:.2f} GiB\n"
        f"  read into the serving dtype {stages['read']:.2f} s, place on the devices {stages['place']:.2f} s, "
        f"other {stages['other']:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/llama3.2-1b-random", help="checkpoint directory (written once)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="serving dtype")
    parser.add_argument("--int8", action="store_true", help="quantize to int8 on load")
    parser.add_argument("--per-layer", action="store_true", help="one weight array per layer (scan_layers=false)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one load, in a child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.dtype, args.int8, not args.per_layer)))
        return
    path = Path(args.dir)
    if not (path / "model.safetensors").is_file():
        started = time.perf_counter()
        write_checkpoint(path)
        print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
    size = (path / "model.safetensors").stat().st_size
    layout = ", per-layer weights" if args.per_layer else ""
    print(
        f"checkpoint {path}: {size / GB:.2f} GB bfloat16, serving as {args.dtype}{' int8' if args.int8 else ''}{layout}"
    )
    child = (
        [sys.executable, __file__, "--measure", "--dir", args.dir, "--dtype", args.dtype]
        + (["--int8"] if args.int8 else [])
        + (["--per-layer"] if args.per_layer else [])
    )
    for label in ("first load", "warm-cache load"):
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        print(report(label, json.loads(out.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
