"""A test-only model of the GKE Inference Gateway's endpoint picker, to show routing locally.

It is a model of the upstream picker (kubernetes-sigs/gateway-api-inference-extension, EPP
v1.3.0, pkg/epp/scheduling/framework/plugins), not a replacement for it: the stack deploys the
real one (components/core/gateway.py). What it keeps of the default scheduling profile, each scorer
weighted as the chart configures it (`components.core.gateway.PICKER_SCORERS`):
  * queue-scorer (scorer/queue.go): (max queue - queue) / (max queue - min queue) over the pods,
    1 for every pod when all queues are equal; the queue is `vllm:num_requests_waiting`;
  * kv-cache-utilization-scorer (scorer/kvcache_utilization.go): 1 - `vllm:kv_cache_usage_perc`;
  * prefix-cache-scorer (multi/prefix/plugin.go): the prompt cut into blocks of 64 characters (the
    plugin's default block size when the server reports no `vllm:cache_config_info`, as the bundled
    server does not), each block's hash chained to the previous one's; a pod scores the share of
    the prompt's blocks that form the longest prefix it was sent before; after each pick the
    picked pod is recorded against every block of the prompt (the plugin's PreRequest);
  * max-score-picker (picker/max_score_picker.go): the highest weighted sum, ties broken at random.
Left out: metric staleness and the refresh interval (each pick reads every pod's /metrics afresh),
the indexer's per-pod LRU bound, LoRA affinity, the model name and cache salt in the first hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Mapping, Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from components.core.gateway import PICKER_SCORERS

BLOCK_CHARACTERS = 64  # the prefix plugin's DefaultBlockSize
MAX_PREFIX_BLOCKS = 256  # its DefaultMaxPrefixBlocks
WAITING, RUNNING, KV_USAGE = "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"


@dataclasses.dataclass(frozen=True)
class PodMetrics:
    """What the picker reads of one pod: the model-server protocol's gauges."""

    waiting: float
    running: float
    kv_usage: float


def scrape(url: str) -> PodMetrics:
    """One pod's /metrics, read as the picker reads it (the protocol's vLLM names)."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if family.name in (WAITING, RUNNING, KV_USAGE):
            values[family.name] = family.samples[0].value
    return PodMetrics(waiting=values[WAITING], running=values[RUNNING], kv_usage=values[KV_USAGE])


def prompt_blocks(prompt: str) -> list[bytes]:
    """The chained hashes of the prompt's whole blocks (a shorter tail is not hashed)."""
    data = prompt.encode()[: BLOCK_CHARACTERS * MAX_PREFIX_BLOCKS]
    hashes, previous = [], b""
    for start in range(0, len(data) - BLOCK_CHARACTERS + 1, BLOCK_CHARACTERS):
        previous = hashlib.blake2b(data[start : start + BLOCK_CHARACTERS] + previous, digest_size=8).digest()
        hashes.append(previous)
    return hashes


def queue_scores(metrics: Mapping[str, PodMetrics]) -> dict[str, float]:
    low, high = min(m.waiting for m in metrics.values()), max(m.waiting for m in metrics.values())
    return {pod: 1.0 if high == low else (high - m.waiting) / (high - low) for pod, m in metrics.items()}


def kv_cache_scores(metrics: Mapping[str, PodMetrics]) -> dict[str, float]:
    return {pod: 1.0 - m.kv_usage for pod, m in metrics.items()}


@dataclasses.dataclass(frozen=True)
class Pick:
    pod: str
    scores: dict[str, dict[str, float]]  # scorer -> pod -> score, before weighting
    totals: dict[str, float]  # pod -> weighted sum
    metrics: dict[str, PodMetrics]


class PickerModel:
    """Picks one of `pods` (base URLs) for each prompt, from their live /metrics and the prompts it has routed."""

    def __init__(self, pods: Sequence[str], random_state: int = 0):
        self.pods = list(pods)
        self._seen: dict[bytes, set[str]] = {}  # block hash -> pods it was sent to
        self._random = random.Random(random_state)  # ties broken at random, reproducibly

    def prefix_scores(self, blocks: Sequence[bytes]) -> dict[str, float]:
        matched = dict.fromkeys(self.pods, 0)
        for block in blocks:  # the longest prefix each pod has: stop at the first block no pod saw
            seen = self._seen.get(block)
            if not seen:
                break
            for pod in seen:
                matched[pod] += 1
        return {pod: matched[pod] / len(blocks) if blocks else 0.0 for pod in self.pods}

    def pick(self, prompt: str) -> Pick:
        metrics = {pod: scrape(pod) for pod in self.pods}
        blocks = prompt_blocks(prompt)
        scores = {
            "queue-scorer": queue_scores(metrics),
            "kv-cache-utilization-scorer": kv_cache_scores(metrics),
            "prefix-cache-scorer": self.prefix_scores(blocks),
        }
        totals = {
            pod: sum(weight * scores[scorer][pod] for scorer, weight in PICKER_SCORERS.items()) for pod in self.pods
        }
        best = max(totals.values())
        pod = self._random.choice([pod for pod in self.pods if totals[pod] == best])
        self.record(pod, blocks)
        return Pick(pod=pod, scores=scores, totals=totals, metrics=metrics)

    def record(self, pod: str, blocks: Sequence[bytes]) -> None:
        """The pod a prompt was sent to, against every block of it (the prefix plugin's PreRequest)."""
        for block in blocks:
            self._seen.setdefault(block, set()).add(pod)
