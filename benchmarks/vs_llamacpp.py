"""Our server against llama.cpp's `llama-server` on the same GGUF, same slots, same prompts.

  python benchmarks/vs_llamacpp.py                       # 1, 8, 32 clients; both servers 32 slots
  python benchmarks/vs_llamacpp.py --levels 1,8 --rounds 1 --max-tokens 32    # a short run
  python benchmarks/vs_llamacpp.py --server-arg quantization=int8             # another config of ours
  python benchmarks/vs_llamacpp.py --model llama3.2-1b --format q8_0 --levels 1,32 --rounds 1 --max-tokens 32 \
      --context 256 --max-prefill-length 64 --no-slots1-baseline           # Llama 3.2 1B's size, Q8_0

What it does, in one run on one machine (CPU by default):
1. `llama-server` (llama.cpp's OpenAI-compatible server): taken from --llama-server, or built once
   from the `llama-cpp-python` source distribution (it vendors llama.cpp; --llama-cpp-sdist names a
   copy already at hand, else `pip download --no-binary :all: --no-deps`) into --cache-dir, outside
   the repository, cmake for the llama-server target only. Benchmark-only: the project never
   depends on it.
2. The model (--model): the bundled SmolLM2-135M GGUF (the file `python -m serving` loads by
   default; llama.cpp reads it as stored, Q4_1), or `llama3.2-1b`: random weights in Llama 3.2 1B's
   shapes (hidden 2048, 16 layers, 32 / 8 heads of 64, ffn 8192, vocabulary 128256, tied
   embeddings, llama3 RoPE) written once into --cache-dir as a bfloat16 Hugging Face directory with
   Llama 3's tokenizer (from llama.cpp's vocabulary test file), then converted by llama.cpp's own
   convert_hf_to_gguf.py to --format (Q8_0 or bf16). Ours loads the same GGUF, or with
   --ours-loads hf the Hugging Face directory.
   Starts both servers on 127.0.0.1 on it, with the same number of slots, then
   `python -m serving --slots 1` when --slots1-baseline is on (the configuration every other one
   must beat at one client).
3. For each client count: every client sends --rounds greedy `/v1/completions` requests back to
   back, --max-tokens output tokens each (`ignore_eos`, so every request generates them all; if a
   server rejects `ignore_eos`, both run without it and the output says so). The two servers are
   measured one after the other at each level, so both see the same machine load. Aggregate output
   tok/s = all completion tokens (from `usage`) / the level's wall time.
4. Measures the machine's memory read bandwidth (numpy reductions over a buffer much larger than
   the caches, one thread per core) and, at one client, the ratio of each server's tok/s to its
   memory roofline: bandwidth / bytes of weights read per token (ours: the weight format of the
   configuration benchmarked, from the model's own declarations; llama.cpp: the GGUF's tensors).
5. Prints one table with the ratios ours / llama.cpp, and optionally writes it as JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import load_bench, servers  # noqa: E402
from serving.server.orchestrator import default_max_queued_requests  # noqa: E402
from serving.server.settings import ServingSettings  # noqa: E402

SHIPPED = ServingSettings()  # what `python -m serving` runs with no flags

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors the llama.cpp the numbers were taken with
# -march=native turns on ggml's AMX kernels where the CPU lists AMX, but using AMX tiles needs a
# permission from the kernel that VMs and sandboxes often do not grant (llama-server then dies with
# SIGSEGV at its first decode); the AVX-512 / VNNI paths stay on.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jetstream-tpu"
START_TIMEOUT_S = 900.0  # ours compiles every prefill bucket before /healthcheck turns 200
REQUEST_TIMEOUT_S = 900.0
BANDWIDTH_BUFFER_BYTES = 1 << 30  # far beyond any CPU cache, so reads come from DRAM
LLAMA_BPE_VOCAB = "ggml-vocab-llama-bpe.gguf"  # Llama 3's vocabulary, in llama.cpp's tests
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of computing began with mechanical calculators. In the nineteenth century,",
    "Here is a detailed recipe for a simple tomato soup. First,",
    "The three most important ideas in physics are",
    "Dear diary, today I finally visited the mountains and",
    "A beginner's guide to gardening: the first thing to know is that",
    "The ocean covers most of the Earth's surface. Scientists believe that",
    "In this lecture we will explain how a compiler turns source code into",
]


# ---- llama.cpp ------------------------------------------------------------------------------------


def llama_cpp_source(cache_dir: Path, sdist: Path | None) -> Path:
    """llama.cpp's source tree (vendored in the llama-cpp-python sdist): `sdist` itself when it is an
    unpacked sdist directory, else the tarball (`sdist`, or downloaded into cache_dir) unpacked there."""
    if sdist is not None and sdist.is_dir():
        return sdist / "vendor" / "llama.cpp"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarballs = [sdist] if sdist is not None else sorted(cache_dir.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(cache_dir),
              LLAMA_CPP_PYTHON])  # fmt: skip
        tarballs = sorted(cache_dir.glob("llama_cpp_python-*.tar.gz"))
    source = cache_dir / tarballs[-1].name.removesuffix(".tar.gz")
    if not source.exists():
        with tarfile.open(tarballs[-1]) as archive:
            archive.extractall(cache_dir, filter="data")
    return source / "vendor" / "llama.cpp"


def llama_server_binary(cache_dir: Path, llama_cpp: Path) -> Path:
    """`llama-server` under cache_dir, built from the source tree `llama_cpp` if absent."""
    binary = cache_dir / "llama-server"
    if binary.exists():
        return binary
    build = cache_dir / "build"
    _run([
        "cmake", "-S", str(llama_cpp), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
        "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}",
    ])  # fmt: skip
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j2"])
    built = next(build.rglob("llama-server"))
    shutil.copy2(built, binary)
    return binary


# ---- the models -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
    """What both servers load: llama.cpp the GGUF, ours `ours` (the GGUF, or a Hugging Face directory)."""

    gguf: Path
    ours: Path


def write_tokenizer(hf_dir: Path, vocab_gguf: Path) -> None:
    """tokenizer.json (+ tokenizer_config.json) of the vocabulary in a GGUF file (e.g. llama.cpp's
    vocabulary test files): the converter and our Hugging Face loader both read it."""
    from serving.engine.loaders import gguf_loader
    from serving.engine.tokenizer import tokenizer_from_gguf

    vocab = gguf_loader.gguf.GGUFReader(str(vocab_gguf))
    tokenizer = tokenizer_from_gguf(vocab)
    (hf_dir / "tokenizer.json").write_text(tokenizer.to_json())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def random_llama32_1b(cache_dir: Path, llama_cpp: Path) -> Path:
    """A random-weight checkpoint of Llama 3.2 1B's shapes with its tokenizer (bfloat16 safetensors,
    written once into cache_dir)."""
    hf_dir = cache_dir / "llama3.2-1b-random" / "hf"
    if not (hf_dir / "tokenizer.json").is_file():
        load_bench.write_checkpoint(hf_dir)
        write_tokenizer(hf_dir, llama_cpp / "models" / LLAMA_BPE_VOCAB)
    return hf_dir


def converted_gguf(hf_dir: Path, llama_cpp: Path, outtype: str) -> Path:
    """`hf_dir` converted by llama.cpp's own convert_hf_to_gguf.py to `outtype` (written once beside it)."""
    out = hf_dir.parent / f"model-{outtype}.gguf"
    if not out.exists():
        partial = out.with_suffix(".partial")
        _run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
              "--outfile", str(partial)])  # fmt: skip
        partial.rename(out)
    return out


def benchmark_model(args, llama_cpp: Path | None) -> Model:
    from serving.engine.loaders import gguf_loader

    if args.model == "smollm2":
        bundled = gguf_loader.bundled_gguf_path()
        return Model(bundled, bundled)
    if llama_cpp is None:
        raise SystemExit(f"--model {args.model} is converted by llama.cpp's converter: drop --ours-only")
    hf_dir = random_llama32_1b(args.cache_dir, llama_cpp)
    gguf = converted_gguf(hf_dir, llama_cpp, args.format)
    return Model(gguf, hf_dir if args.ours_loads == "hf" else gguf)


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


# ---- servers --------------------------------------------------------------------------------------


def start_llama(binary: Path, gguf: Path, slots: int, context: int, threads: int) -> servers.Server:
    port = servers.free_port()
    cmd = [
        str(binary), "-m", str(gguf), "--host", servers.HOST, "--port", str(port), "-np", str(slots),
        "-c", str(slots * context), "-t", str(threads), "-tb", str(threads), "--no-webui",
    ]  # fmt: skip
    return servers.start("llama.cpp", cmd, port, "/health", START_TIMEOUT_S)


def start_ours(name: str, checkpoint: Path, slots: int, args) -> servers.Server:
    port = servers.free_port()
    cmd = servers.serving_command(port, [
        "--model", str(checkpoint), "--slots", str(slots), "--max-prefill-length", str(args.max_prefill_length),
        "--max-target-length", str(args.context),
        # the server's own queue bound, raised only if one level has more clients than it admits
        "--max-queued-requests", str(max(default_max_queued_requests(slots), max(args.levels))),
        *args.server_arg,
    ])  # fmt: skip
    return servers.start(name, cmd, port, "/healthcheck", START_TIMEOUT_S, servers.cpu_env())


# ---- load -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Level:
    clients: int
    tokens: int
    requests: int
    wall_s: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


def _complete(client: httpx.Client, url: str, prompt: str, max_tokens: int, ignore_eos: bool) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    if ignore_eos:
        body["ignore_eos"] = True
    return client.post(url + "/v1/completions", json=body)


def accepts_ignore_eos(url: str) -> bool:
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        response = _complete(client, url, PROMPTS[0], 2, ignore_eos=True)
    if response.status_code == 400 and "ignore_eos" in response.text:
        return False
    response.raise_for_status()
    return True


def run_level(url: str, clients: int, rounds: int, max_tokens: int, ignore_eos: bool) -> Level:
    def client_loop(index: int) -> int:
        tokens = 0
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            for r in range(rounds):
                response = _complete(client, url, PROMPTS[(index + r) % len(PROMPTS)], max_tokens, ignore_eos)
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]
        return tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client_loop, range(clients)))
    return Level(clients, tokens, clients * rounds, time.perf_counter() - started)


# ---- rooflines ------------------------------------------------------------------------------------


def read_bandwidth(reps: int = 5) -> float:
    """Bytes/s the cores read from DRAM together: the best of `reps` passes, one thread per core
    summing its own slice of a 1 GiB buffer (numpy releases the GIL inside the reduction)."""
    workers = os.cpu_count() or 1
    buffer = np.ones(BANDWIDTH_BUFFER_BYTES // 4, np.float32)
    slices = np.array_split(buffer, workers)
    best = 0.0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in range(reps):
            started = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = max(best, buffer.nbytes / (time.perf_counter() - started))
    return best


def our_weight_bytes(checkpoint: Path, server_args: list[str]) -> tuple[str, int]:
    """(format name, bytes of weights one decode step reads) for our server on `checkpoint` (a GGUF
    or a Hugging Face directory) under these settings."""
    from serving.engine import model
    from serving.engine.loaders import gguf_loader, hf_loader, runtime_config
    from serving.server.settings import parse_settings

    backend = os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0]  # what start_ours runs on
    settings = parse_settings([a for a in server_args if "=" in a]).for_backend(backend).engine_settings()
    if hf_loader.is_hf_dir(str(checkpoint)):
        arch = hf_loader.read_config(checkpoint, settings.max_target_length)
    else:
        arch = gguf_loader.read_config(gguf_loader.gguf.GGUFReader(str(checkpoint)))
    cfg = runtime_config(arch, settings)
    infos = model.param_infos(cfg)
    leaves = model.jax.tree.leaves(infos, is_leaf=model.is_info)
    total = sum(math.prod(i.shape) * np.dtype(i.dtype).itemsize for i in leaves)
    # a decode step reads one embedding row per token, not the table, unless the table is the lm head
    embed = infos["embed"]
    embed_leaves = model.jax.tree.leaves(embed, is_leaf=model.is_info)
    if not cfg.tie_embeddings:
        total -= sum(math.prod(i.shape) * np.dtype(i.dtype).itemsize for i in embed_leaves)
    return ("int8" if cfg.quantize_weights else cfg.weight_dtype), total


def gguf_weight_bytes(path: Path) -> tuple[str, int]:
    from serving.engine.loaders import gguf_loader

    reader = gguf_loader.gguf.GGUFReader(str(path))
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    return "/".join(kinds), sum(int(t.n_bytes) for t in reader.tensors)


# ---- report ---------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    head = ["clients", "llama.cpp tok/s", "ours tok/s", "ours / llama.cpp"]
    if any("slots1" in r for r in rows):
        head.append("ours --slots 1 tok/s")
    lines = [head]
    for r in rows:
        llama = r.get("llama")
        line = [
            str(r["clients"]),
            "-" if llama is None else f"{llama:.1f}",
            f"{r['ours']:.1f}",
            "-" if llama is None else f"{r['ours'] / llama:.2f}",
        ]
        if len(head) == 5:
            line.append(f"{r['slots1']:.1f}" if "slots1" in r else "-")
        lines.append(line)
    widths = [max(len(row[i]) if i < len(row) else 0 for row in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,8,32", help="comma-separated concurrent client counts (default 1,8,32)")
    p.add_argument("--slots", type=int, default=32, help="decode slots of both servers (llama.cpp -np)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client per level (default 2)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument(
        "--context",
        type=int,
        default=SHIPPED.max_target_length,
        help=f"KV cache tokens per slot on both servers (default {SHIPPED.max_target_length}, ours' default)",
    )
    p.add_argument(
        "--max-prefill-length",
        type=int,
        default=SHIPPED.max_prefill_predict_length,
        help=f"ours: longest prompt (default {SHIPPED.max_prefill_predict_length}, the shipped default)",
    )
    p.add_argument(
        "--model",
        choices=("smollm2", "llama3.2-1b"),
        default="smollm2",
        help="smollm2: the bundled SmolLM2-135M GGUF (default); llama3.2-1b: random weights in Llama 3.2 1B's "
        "shapes, converted by llama.cpp's converter to --format (written once into --cache-dir)",
    )
    p.add_argument("--format", choices=("q8_0", "bf16"), default="q8_0", help="llama3.2-1b: the GGUF's weight type")
    p.add_argument(
        "--ours-loads",
        choices=("gguf", "hf"),
        default="gguf",
        help="llama3.2-1b: ours loads the same GGUF (default) or the bfloat16 Hugging Face directory",
    )
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for ours, e.g. quantization=int8")
    p.add_argument(
        "--slots1-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run ours with --slots 1 at one client (default on)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    p.add_argument("--llama-server", type=Path, help="a llama-server binary to use instead of building one")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where llama-server is built and models are written (default {DEFAULT_CACHE})",
    )
    p.add_argument(
        "--llama-cpp-sdist",
        type=Path,
        help=f"the {LLAMA_CPP_PYTHON} source distribution (tarball or unpacked directory) instead of downloading it",
    )
    p.add_argument("--build-only", action="store_true", help="build llama-server and exit")
    p.add_argument("--ours-only", action="store_true", help="measure only our server (no llama.cpp, no ratios)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.levels.split(",")]

    # llama.cpp's source: to build llama-server, and to convert any model but the bundled one
    needs_source = args.model != "smollm2" or not (args.ours_only or args.llama_server)
    llama_cpp = llama_cpp_source(args.cache_dir, args.llama_cpp_sdist) if needs_source else None
    binary = None if args.ours_only else args.llama_server or llama_server_binary(args.cache_dir, llama_cpp)
    if args.build_only:
        print(binary)
        return 0
    checkpoint = benchmark_model(args, llama_cpp)
    gguf = checkpoint.gguf
    bandwidth = read_bandwidth()
    running = []
    try:
        if not args.ours_only:  # each server joins `running` at once, so `finally` stops it
            running.append(start_llama(binary, gguf, args.slots, args.context, args.threads))
        running.append(start_ours("ours", checkpoint.ours, args.slots, args))
        llama, ours = (None if args.ours_only else running[0]), running[-1]
        ignore_eos = all(accepts_ignore_eos(server.url) for server in running)
        if not ignore_eos:
            print("note: a server rejects ignore_eos; requests may stop early at EOS", file=sys.stderr)
        for server in running:  # one untimed request each: first-request costs out of the numbers
            run_level(server.url, 1, 1, args.max_tokens, ignore_eos)
        rows = []
        for clients in args.levels:
            row = {"clients": clients}
            for key, server in (("llama", llama), ("ours", ours)):
                if server is None:
                    continue
                level = run_level(server.url, clients, args.rounds, args.max_tokens, ignore_eos)
                row[key] = level.tok_s
                row[key + "_tokens"] = level.tokens
                print(
                    (
                        f"{server.name} @ {clients} clients: {level.tokens} tokens in {level.wall_s:.1f} s = "
                        f"{level.tok_s:.1f} tok/s"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
            rows.append(row)
        ours.stop()
        running.remove(ours)
        if args.slots1_baseline and 1 in args.levels:
            single = start_ours("ours --slots 1", checkpoint.ours, 1, args)
            running.append(single)
            run_level(single.url, 1, 1, args.max_tokens, ignore_eos)
            level = run_level(single.url, 1, args.rounds, args.max_tokens, ignore_eos)
            next(r for r in rows if r["clients"] == 1)["slots1"] = level.tok_s
    finally:
        for server in running:
            server.stop()

    our_format, our_bytes = our_weight_bytes(checkpoint.ours, args.server_arg)
    llama_format, llama_bytes = gguf_weight_bytes(gguf)
    print(
        f"\nvs_llamacpp: {args.slots} slots each, {args.max_tokens} output tokens/request, {args.rounds} "
        f"requests/client, greedy{', ignore_eos' if ignore_eos else ' (EOS may end requests early)'}; "
        f"llama.cpp: {gguf.name}; ours: {checkpoint.ours.name} {' '.join(args.server_arg) or 'defaults'}"
    )
    print(table(rows))
    print(f"\nread bandwidth {bandwidth / 1e9:.1f} GB/s ({os.cpu_count()} threads)")
    summary = {"bandwidth_gb_s": bandwidth / 1e9, "rows": rows, "server_args": args.server_arg}
    one = next((r for r in rows if r["clients"] == 1), None)
    for key, name, fmt, nbytes in (
        ("ours", "ours", our_format, our_bytes),
        ("llama", "llama.cpp", llama_format, llama_bytes),
    ):
        roofline = bandwidth / nbytes
        line = f"{name}: weights {fmt} {nbytes / 1e6:.0f} MB/token -> roofline {roofline:.0f} tok/s"
        if one is not None and key in one:
            line += f"; batch 1 at {one[key] / roofline:.0%} of it"
            summary[key + "_roofline_ratio"] = one[key] / roofline
        print(line)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
