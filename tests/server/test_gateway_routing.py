"""GKE Inference Gateway's routing, shown locally as the autoscaling loop was: two real
`python -m serving` replicas (the tiny random-weight config), and a test-only model of the
endpoint picker's default scorer (tests/server/picker_model.py) reading their real /metrics.

On a skewed load (one replica's slots full and a queue behind them) new requests go to the other
replica, where the Service would pick either at random; requests that share a prompt prefix go to
the replica that was sent that prefix before. The numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator

import httpx
import pytest

from tests.server import server_process
from tests.server.picker_model import (
    BLOCK_CHARACTERS,
    PickerModel,
    PodMetrics,
    kv_cache_scores,
    prompt_blocks,
    queue_scores,
)
from tests.server.server_process import HOST, free_port, wait_until

SLOTS = 2  # per replica
BUSY = 8  # requests sent straight to one replica: SLOTS decode there, the rest queue
NEW = 6  # requests the picker routes while that replica is busy
MAX_TOKENS = 1000  # long enough to hold a slot while the test routes
MAX_PROMPT = 256  # tokens (bytes, for the tiny model's tokenizer)
SHARED_BLOCKS = 2
SYSTEM_PROMPTS = {  # two shared prefixes of SHARED_BLOCKS whole blocks each
    name: (f"You are the {name} assistant. " * 16)[: SHARED_BLOCKS * BLOCK_CHARACTERS]
    for name in ("billing", "support")
}
ROUNDS = 4  # requests per system prompt


# -- the model on hand-computed values ------------------------------------------------------------
def test_queue_and_kv_cache_scorers():
    metrics = {
        "a": PodMetrics(waiting=6, running=2, kv_usage=0.5),
        "b": PodMetrics(waiting=2, running=2, kv_usage=0.25),
    }
    assert queue_scores(metrics) == {"a": 0.0, "b": 1.0}
    assert kv_cache_scores(metrics) == {"a": 0.5, "b": 0.75}
    level = {"a": PodMetrics(waiting=3, running=2, kv_usage=0.0), "b": PodMetrics(waiting=3, running=2, kv_usage=0.0)}
    assert queue_scores(level) == {"a": 1.0, "b": 1.0}  # equal queues: neutral


def test_prefix_scores_count_the_longest_shared_prefix_of_whole_blocks():
    picker = PickerModel(["a", "b"])
    shared = "s" * (2 * BLOCK_CHARACTERS)
    assert len(prompt_blocks(shared + "q" * (BLOCK_CHARACTERS - 1))) == 2  # a partial block is not hashed
    picker.record("a", prompt_blocks(shared + "1" * BLOCK_CHARACTERS))
    assert picker.prefix_scores(prompt_blocks(shared + "2" * BLOCK_CHARACTERS)) == {"a": 2 / 3, "b": 0.0}
    # blocks are chained: the same block after a different prefix is not a match
    assert picker.prefix_scores(prompt_blocks("x" * BLOCK_CHARACTERS + shared)) == {"a": 0.0, "b": 0.0}


# -- on real replicas -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pods() -> Iterator[list[str]]:
    ports = [free_port() for _ in range(2)]
    env = server_process.server_env(devices=1)
    # no warm-up: only the few buckets the test uses compile, on first use (admission comes before it)
    args = ["--host", HOST, "--grpc-port", "0", "--slots", str(SLOTS), "--max-prefill-length", str(MAX_PROMPT),
            "--max-target-length", str(MAX_PROMPT + MAX_TOKENS + 32), "--no-warmup", "model_name=tiny"]  # fmt: skip
    procs = [
        server_process.spawn(["--http-port", str(port), *args], env, f"routed-{i}.log") for i, port in enumerate(ports)
    ]
    try:
        urls = [f"http://{HOST}:{port}" for port in ports]
        for url in urls:
            server_process.wait_live(url, procs)
            for prompt in ("warm up", "w" * (MAX_PROMPT - 32)):  # compile the two prefill buckets the test uses
                complete(url, prompt, max_tokens=2)
        yield urls
    finally:
        server_process.stop(procs)


def complete(pod: str, prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    response = httpx.post(pod + "/v1/completions", json=body, timeout=server_process.START_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def admitted(pod: str) -> float:
    """Requests on the pod, queued or in a slot (the protocol's two counts)."""
    metrics = server_process.scrape_gauges(pod)
    return metrics["vllm:num_requests_waiting"].value + metrics["vllm:num_requests_running"].value


def saturated(pod: str) -> bool:
    metrics = server_process.scrape_gauges(pod)
    return (metrics["vllm:num_requests_running"].value, metrics["vllm:num_requests_waiting"].value) == (
        SLOTS,
        BUSY - SLOTS,
    )


@contextlib.contextmanager
def clients(count: int) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        yield pool


def prefilled(pod: str) -> float:
    """Requests the pod has prefilled so far (a count that only grows, unlike the gauges)."""
    return server_process.scrape_sample(pod, "jetstream_request_input_length_count")


def cached_tokens(pod: str) -> float:
    """Prompt tokens the pod's prefix cache has supplied so far."""
    return server_process.scrape_sample(pod, "vllm:prefix_cache_hits_total")


def route(picker: PickerModel, pool, prompt: str, pending: list):
    """Pick a pod for the prompt, send it there, and wait until the pod has prefilled it (so the
    next pick reads metrics that include it, as the picker's 50 ms refresh would)."""
    before = {pod: prefilled(pod) for pod in picker.pods}
    pick = picker.pick(prompt)
    pending.append(pool.submit(complete, pick.pod, prompt))
    wait_until(lambda: prefilled(pick.pod) == before[pick.pod] + 1, 60, f"the request routed to {pick.pod} prefilled",
               every_s=0.02)  # fmt: skip
    return pick


def describe(pick, names) -> str:
    parts = [f"{names[pod]}: waiting {m.waiting:.0f}, running {m.running:.0f}, KV {m.kv_usage:.3f}, "
             f"prefix {pick.scores['prefix-cache-scorer'][pod]:.2f}, score {pick.totals[pod]:.2f}"
             for pod, m in pick.metrics.items()]  # fmt: skip
    return f"-> {names[pick.pod]}   ({'; '.join(parts)})"


def test_new_requests_go_away_from_the_busy_replica(pods):
    busy, idle = pods
    names = {busy: "busy", idle: "idle"}
    picker = PickerModel(pods)
    with clients(BUSY + NEW) as pool:
        pending = [pool.submit(complete, busy, f"burst {i}") for i in range(BUSY)]
        wait_until(lambda: saturated(busy), 120, "the burst decoding on one replica, the rest queued", every_s=0.05)
        picks = [route(picker, pool, f"request {i}", pending) for i in range(NEW)]
        results = [future.result() for future in pending]
    print(f"\nskewed load: {BUSY} requests on one replica ({SLOTS} slots), then {NEW} routed by the picker model:")
    for pick in picks:
        print("  " + describe(pick, names))
    assert all(result["usage"]["completion_tokens"] == MAX_TOKENS for result in results)
    assert picks[0].metrics[busy].waiting == BUSY - SLOTS and picks[0].metrics[idle].waiting == 0
    to_idle = sum(pick.pod == idle for pick in picks)
    print(f"  {to_idle} of {NEW} to the idle replica (a Service picking at random: {NEW / 2:.0f} expected)")
    assert to_idle == NEW


def test_requests_sharing_a_prefix_go_to_the_replica_that_saw_it(pods):
    picker = PickerModel(pods, random_state=1)
    names = {pod: f"replica {index}" for index, pod in enumerate(pods)}
    wait_until(lambda: all(admitted(pod) == 0 for pod in pods), 120, "idle replicas", every_s=0.1)
    picks: dict[str, list] = {name: [] for name in SYSTEM_PROMPTS}
    hits_before = {pod: cached_tokens(pod) for pod in pods}
    with clients(ROUNDS * len(SYSTEM_PROMPTS)) as pool:
        pending: list = []
        for round_ in range(ROUNDS):
            for name, system in SYSTEM_PROMPTS.items():
                question = f" Question {round_} about {name}: " + "why? " * 13  # 64+ characters: one more block
                picks[name].append(route(picker, pool, system + question, pending))
        results = [future.result() for future in pending]
    assert all(result["usage"]["completion_tokens"] == MAX_TOKENS for result in results)
    print(f"\nshared prefixes: {ROUNDS} requests each of {len(SYSTEM_PROMPTS)} system prompts, interleaved:")
    for name, routed in picks.items():
        print(f"  {name}:")
        for pick in routed:
            print("    " + describe(pick, names))
    homes = {name: {pick.pod for pick in routed} for name, routed in picks.items()}
    assert all(len(home) == 1 for home in homes.values()), homes  # every request of a prefix where its first went
    assert homes["billing"] != homes["support"]  # the second prefix's first request went to the less loaded replica
    for routed in picks.values():
        for pick in routed[1:]:
            # the shared blocks of the prompt's blocks (the question's whole block is its own)
            assert pick.scores["prefix-cache-scorer"][pick.pod] == SHARED_BLOCKS / (SHARED_BLOCKS + 1)
    # and the replica's own prefix cache then computed each system prompt once: every later request
    # of it found at least the system prompt's tokens (one per character here) cached
    hits = {pod: cached_tokens(pod) - hits_before[pod] for pod in pods}
    print(
        f"  prompt tokens from the replicas' prefix caches: {', '.join(f'{names[p]} {h:.0f}' for p, h in hits.items())}"
    )
    for name, system in SYSTEM_PROMPTS.items():
        assert hits[next(iter(homes[name]))] >= (ROUNDS - 1) * len(system)
