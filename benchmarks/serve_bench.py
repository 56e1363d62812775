"""Serving benchmark: TTFT p50/p99, time per output token, aggregate output tokens/s.

Starts `python -m serving` on a free 127.0.0.1 port (or targets --url), then for each concurrency
level runs that many client threads, each sending streamed OpenAI chat completions (so the model
answers instead of stopping at once) back to back until
--requests requests are done or --duration-s elapses. TTFT is the time to the first streamed
text; time per output token is (last - first token time) / (tokens - 1) per request, with the
token count from the response's usage; throughput is all output tokens over the level's wall time.

  python benchmarks/serve_bench.py --concurrency 1,32 --max-tokens 64
  python benchmarks/serve_bench.py --devices 8 --server-arg ici_tensor_parallelism=8
  python benchmarks/serve_bench.py --devices 8 \\
      --server-arg inference_server=ExperimentalMaxtextDisaggregatedServer_8
  python benchmarks/serve_bench.py --url http://host:8000 --concurrency 8
  python benchmarks/serve_bench.py --concurrency 8 --slots 8 --json-schema-fraction 0.5

--json-schema-fraction F: that share of each level's clients ask for structured output
(response_format json_schema, FACTS_FORMAT: long enough that they too run to --max-tokens), the
others plain text; compare with the same level at 0 for the cost of the grammar.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import servers  # noqa: E402
from serving.engine.settings import DEFAULT_DECODE_SLOTS  # noqa: E402
from serving.server.orchestrator import default_max_queued_requests  # noqa: E402

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a transformer language model generates text, step by step.",
    "List some interesting facts about the ocean.",
    "Describe the water cycle to a ten year old.",
    "What are the benefits of regular exercise? Answer in detail.",
    "Summarize the history of computing in a few paragraphs.",
]


# Eight facts of up to 80 characters: more than --max-tokens' default, so constrained requests end
# at the token budget as the plain ones mostly do, and tok/s compares per-token costs.
FACTS_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "facts",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "topic": {"type": "string", "maxLength": 40},
                "facts": {"type": "array", "items": {"type": "string", "maxLength": 80}, "minItems": 8, "maxItems": 8},
            },
            "required": ["topic", "facts"],
            "additionalProperties": False,
        },
    },
}


@dataclasses.dataclass
class Result:
    ok: bool
    status: int
    ttft_s: float = 0.0
    tpot_s: float | None = None
    tokens: int = 0


def start_server(args) -> servers.Server:
    port = servers.free_port()
    devices = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"} if args.devices else {}
    slots = ["--slots", str(args.slots)] if args.slots else []
    cmd = servers.serving_command(port, [
        "--max-prefill-length", str(args.max_prefill_length), "--max-target-length", str(args.max_target_length),
        # the server's own queue bound (for the slots it gets), raised only if a level has more clients
        "--max-queued-requests",
        str(max(default_max_queued_requests(args.slots or DEFAULT_DECODE_SLOTS), max(args.levels))),
        *slots, *args.server_arg,
    ])  # fmt: skip
    return servers.start("serving", cmd, port, "/healthcheck", args.start_timeout_s, servers.cpu_env(**devices))


def one_request(
    client: httpx.Client, url: str, prompt: str, max_tokens: int, response_format: dict | None = None
) -> Result:
    messages = [{"role": "user", "content": prompt}]
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True}
    if response_format is not None:
        body["response_format"] = response_format
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return Result(False, r.status_code)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["choices"][0]["delta"].get("content"):
                first = first or now
                last = now
            if "usage" in chunk:
                tokens = chunk["usage"]["completion_tokens"]
    if first is None:
        return Result(False, 200)
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Result(True, 200, first - start, tpot, tokens)


def run_level(
    url: str, concurrency: int, requests: int, duration_s: float, max_tokens: int, json_schema_fraction: float = 0.0
) -> dict:
    constrained_clients = round(json_schema_fraction * concurrency)
    results: list[Result] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + duration_s

    def client_loop(index: int) -> None:
        response_format = FACTS_FORMAT if index < constrained_clients else None
        with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= requests:
                        return
                    issued[0] += 1
                    n = issued[0]
                result = one_request(client, url, PROMPTS[(index + n) % len(PROMPTS)], max_tokens, response_format)
                with lock:
                    results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    ttft = sorted(r.ttft_s for r in ok)
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    return {
        "concurrency": concurrency,
        "constrained_clients": constrained_clients,
        "requests": len(results),
        "ok": len(ok),
        "rejected": sum(r.status == 503 for r in results),
        "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else float("nan"),
        "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan"),
        "tpot_ms": 1000 * statistics.median(tpot) if tpot else float("nan"),
        "out_tok_s": sum(r.tokens for r in ok) / wall,
        "wall_s": wall,
    }


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    header = (
        f"{'conc':>5} {'reqs':>5} {'ok':>5} {'503':>4} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'TPOT ms':>9} "
        f"{'out tok/s':>10} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['concurrency']:>5} {r['requests']:>5} {r['ok']:>5} {r['rejected']:>4} {r['ttft_p50_ms']:>12.1f} "
            f"{r['ttft_p99_ms']:>12.1f} {r['tpot_ms']:>9.1f} {r['out_tok_s']:>10.1f} {r['wall_s']:>7.1f}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="benchmark a running server instead of starting one")
    p.add_argument("--concurrency", default="1,32", help="comma-separated client counts (default 1,32)")
    p.add_argument("--requests", type=int, help="requests per level (default 4 x concurrency, at least 8)")
    p.add_argument("--duration-s", type=float, default=120.0, help="time budget per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup-requests", type=int, default=2, help="untimed requests before measuring")
    p.add_argument("--devices", type=int, help="CPU devices for the started server (XLA_FLAGS)")
    p.add_argument("--slots", type=int, default=32, help="decode slots of the started server")
    p.add_argument("--max-prefill-length", type=int, default=128)
    p.add_argument("--max-target-length", type=int, default=512)
    p.add_argument("--server-arg", action="append", default=[], help="extra server arg, e.g. ici_tensor_parallelism=8")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument(
        "--json-schema-fraction",
        type=float,
        default=0.0,
        help="share of each level's clients asking for structured output (0..1)",
    )
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]

    server = None
    url = args.url
    if url is None:
        server = start_server(args)
        url = server.url
    try:
        with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
            for i in range(args.warmup_requests):
                one_request(client, url, PROMPTS[i % len(PROMPTS)], args.max_tokens)
        rows = []
        for level in args.levels:
            count = args.requests or max(8, 4 * level)
            rows.append(run_level(url, level, count, args.duration_s, args.max_tokens, args.json_schema_fraction))
            print_table(rows[-1:], f"concurrency {level} done")
        title = (
            f"serve_bench: {url}, max_tokens={args.max_tokens}, json_schema_fraction={args.json_schema_fraction}, "
            f"server args: {' '.join(args.server_arg) or '-'}"
        )
        print_table(rows, title)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
