"""Time to first token with and without the prefix cache, beside llama.cpp's `cache_prompt`.

  python benchmarks/prefix_cache_bench.py                     # 32 requests at 1 and 8 clients
  python benchmarks/prefix_cache_bench.py --no-llama          # ours only
  python benchmarks/prefix_cache_bench.py --requests 8 --levels 1 --system-tokens 200   # a short run

The workload of a chat service with a long fixed system prompt: --requests completions whose
prompts share a --system-tokens system prompt, each followed by its own --question-tokens question
(seeded random words, cut to exact token counts with the model's own tokenizer). Each request asks
for one greedy token, not streamed, so its latency is its time to first token: queueing, prefill
and the first token. Each client count has questions of its own (the same system prompt), and its
clients take the requests from one queue. The
table also gives the mean number of prompt tokens each server says it took from its cache (ours:
`usage.prompt_tokens_details.cached_tokens`; llama.cpp: `usage.prompt_tokens` - `timings.prompt_n`).

Three servers on the bundled SmolLM2-135M GGUF, one after the other (each alone on the machine),
each with as many slots as the most clients: ours with the prefix cache (the default), ours with
--no-enable-prefix-caching, and llama.cpp's `llama-server` (built as vs_llamacpp.py builds it) with
`cache_prompt: true` in every request. Before measuring, each server answers two requests with a
different system prompt of the same length, so compiles (ours) and first-use allocations happen
outside the measurement, and the measured prefix is not cached beforehand.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import queue
import statistics
import sys
import time
from pathlib import Path

import gguf
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import servers, vs_llamacpp  # noqa: E402
from serving.engine.loaders.gguf_loader import bundled_gguf_path  # noqa: E402
from serving.engine.tokenizer import tokenizer_from_gguf  # noqa: E402

VOCABULARY = (
    "the model serves requests across many hosts while each slice keeps its own cache of keys and values "
    "a careful operator reads the metrics before changing the topology of the cluster and its node pools "
    "latency grows with the prompt so a shared system prompt computed once saves most of the prefill work"
)


def text_of_tokens(tokenizer, rng: np.random.Generator, n_tokens: int) -> str:
    """Seeded random words, cut to exactly `n_tokens` tokens (re-encoding the cut text may merge
    differently at the cut; the prompts are built whole and re-counted by `prompt_tokens`)."""
    words = " ".join(rng.choice(VOCABULARY.split(), size=n_tokens * 2))
    return tokenizer.decode(tokenizer.encode(" " + words)[:n_tokens])


def workload(args) -> tuple[dict[int, list[str]], list[str], int]:
    """({clients: that level's prompts}, warm-up prompts, tokens in the longest prompt). Every level
    has questions of its own: a later level finds the system prompt cached, never a whole prompt."""
    tokenizer = tokenizer_from_gguf(gguf.GGUFReader(bundled_gguf_path()))
    rng = np.random.default_rng(args.seed)
    system, warm_system = (text_of_tokens(tokenizer, rng, args.system_tokens) for _ in range(2))

    def prompts(head: str, n: int) -> list[str]:
        return [head + "\n\nQuestion:" + text_of_tokens(tokenizer, rng, args.question_tokens) for _ in range(n)]

    measured = {clients: prompts(system, args.requests) for clients in args.levels}
    warm = prompts(warm_system, 2)
    every = [prompt for level in measured.values() for prompt in level] + warm
    return measured, warm, max(len(tokenizer.encode(prompt)) for prompt in every)


@dataclasses.dataclass(frozen=True)
class FirstToken:
    seconds: float
    cached_tokens: int


def first_token(client: httpx.Client, url: str, prompt: str, extra: dict) -> FirstToken:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
    start = time.perf_counter()
    response = client.post(url + "/v1/completions", json=body)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
    reply = response.json()
    usage = reply["usage"]
    if "timings" in reply:  # llama.cpp: the prompt tokens it evaluated
        return FirstToken(seconds, usage["prompt_tokens"] - reply["timings"]["prompt_n"])
    return FirstToken(seconds, usage["prompt_tokens_details"]["cached_tokens"])


def run_level(url: str, prompts: list[str], clients: int, extra: dict) -> list[FirstToken]:
    """Every prompt once, `clients` at a time; the first token of each, in request order."""
    pending: queue.Queue[int] = queue.Queue()
    for index in range(len(prompts)):
        pending.put(index)
    results: list[FirstToken | None] = [None] * len(prompts)

    def client_loop() -> None:
        with httpx.Client(timeout=vs_llamacpp.REQUEST_TIMEOUT_S) as client:
            while True:
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    return
                results[index] = first_token(client, url, prompts[index], extra)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    return results


def start_ours(name: str, args, prompt_tokens: int, *flags: str) -> servers.Server:
    port = servers.free_port()
    longest = -(-prompt_tokens // 16) * 16  # the largest prefill bucket: the prompts pad to it, not to 2048
    cmd = servers.serving_command(port, [
        "--slots", str(max(args.levels)), "--max-prefill-length", str(longest),
        "--max-target-length", str(longest + 16), *flags,
    ])  # fmt: skip
    return servers.start(name, cmd, port, "/healthcheck", vs_llamacpp.START_TIMEOUT_S, servers.cpu_env())


def measure(server: servers.Server, args, measured: dict[int, list[str]], warm: list[str], extra: dict):
    """{clients: [FirstToken]} after the warm-up prompts."""
    try:
        run_level(server.url, warm, 1, extra)
        return {clients: run_level(server.url, measured[clients], clients, extra) for clients in args.levels}
    finally:
        server.stop()


def table(results: dict[str, dict[int, list[FirstToken]]], levels: list[int]) -> str:
    lines = [
        "| server | clients | median TTFT (ms) | p90 TTFT (ms) | median / ours without cache | cached tokens (mean) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    medians = {
        (name, clients): statistics.median(r.seconds for r in by_level[clients])
        for name, by_level in results.items()
        for clients in levels
    }
    for name, by_level in results.items():
        for clients in levels:
            median = medians[name, clients]
            baseline = medians.get(("ours, no prefix cache", clients))
            ratio = f"{median / baseline:.2f}" if baseline else "-"
            p90 = float(np.percentile([r.seconds for r in by_level[clients]], 90))
            cached = statistics.mean(r.cached_tokens for r in by_level[clients])
            lines.append(f"| {name} | {clients} | {median * 1000:.0f} | {p90 * 1000:.0f} | {ratio} | {cached:.0f} |")
    return "\n".join(lines)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--question-tokens", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--cache-dir", type=Path, default=vs_llamacpp.DEFAULT_CACHE, help="where llama-server is built")
    parser.add_argument("--llama-server", type=Path, help="a llama-server binary to use instead of building one")
    parser.add_argument(
        "--llama-cpp-sdist", type=Path, help="the llama-cpp-python source distribution to build llama-server from"
    )
    parser.add_argument("--json", type=Path, help="also write the TTFTs as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    measured, warm, prompt_tokens = workload(args)
    print(f"{args.requests} prompts of up to {prompt_tokens} tokens ({args.system_tokens} shared)", file=sys.stderr)
    results = {
        "ours, prefix cache": measure(start_ours("ours", args, prompt_tokens), args, measured, warm, {}),
        "ours, no prefix cache": measure(
            start_ours("ours, no cache", args, prompt_tokens, "--no-enable-prefix-caching"), args, measured, warm, {}
        ),
    }
    if not args.no_llama:
        binary = args.llama_server or vs_llamacpp.llama_server_binary(
            args.cache_dir, vs_llamacpp.llama_cpp_source(args.cache_dir, args.llama_cpp_sdist)
        )
        context = prompt_tokens + 16
        llama = vs_llamacpp.start_llama(binary, bundled_gguf_path(), max(args.levels), context, args.threads)
        results["llama.cpp, cache_prompt"] = measure(llama, args, measured, warm, {"cache_prompt": True})
    print(table(results, args.levels))
    if args.json:
        as_json = {name: {c: [dataclasses.asdict(t) for t in r] for c, r in by.items()} for name, by in results.items()}
        args.json.write_text(json.dumps(as_json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
