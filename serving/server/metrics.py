"""Prometheus metrics under JetStream's names, types, labels and units
(AI-Hypercomputer/JetStream jetstream/core/metrics/prometheus.py, set in jetstream/core/orchestrator.py),
so existing dashboards and the GKE autoscaling examples (which scale on
jetstream_prefill_backlog_size and jetstream_slots_used_percentage) work against this server unchanged.

Next to them, the gauges of the Gateway API Inference Extension's model-server protocol
(kubernetes-sigs/gateway-api-inference-extension docs/proposals/003-model-server-protocol) under
vLLM's names, which the extension's endpoint picker reads by default: vllm:num_requests_waiting,
vllm:num_requests_running and vllm:kv_cache_usage_perc (a fraction 0..1, despite the name). They
read the same live values as JetStream's rows (`MetricSpec.reads`, `scale`), so the two sets never
disagree. The protocol's optional vllm:cache_config_info (block_size, num_gpu_blocks) is not
exported: the cache is allocated per decode slot, not in blocks, and without it the picker's
prefix scorer uses its own configured block size.

Every metric is one row of `METRICS`. Gauges are read live at scrape time from callbacks the
orchestrator registers (`ServerMetrics.watch`); histograms and counters are recorded as requests
progress. Each server owns its registry (no process globals), so tests can run several servers in
one process. Label set as JetStream: `id` (the host name) and `model_name` when it is a valid label
value; per-engine metrics add `idx`.

What a Horizontal Pod Autoscaler decides from these values is the stack's model of it,
`components.core.autoscaling.hpa_desired_replicas` (tests/server/test_autoscaling_loop.py feeds it
the values real servers report).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS_SHORT = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_PREFILL_TOKEN = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
_REQUEST = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
_INPUT_LENGTH = tuple(2**i for i in range(4, 16))  # JetStream's DEFAULT_PREFILL_BUCKETS, 16 .. 32768
_OUTPUT_LENGTH = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))[:20]  # 1, 2, 5, 10, ... 2000000
_TRANSFER = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric: JetStream's name and type, its help text, the unit of its value, its buckets."""

    name: str
    kind: type  # Gauge, Counter or Histogram
    doc: str
    unit: str  # what one unit of the value is; shown in the help text
    per_engine: bool = False  # labelled `idx` (the engine's index), as JetStream does
    buckets: tuple[float, ...] = ()  # histograms only
    reads: str = ""  # live gauges: the `watch` callback it reads, when not its own key
    scale: float = 1.0  # live gauges: the callback's value times this, e.g. a percent to a fraction

    @property
    def help(self) -> str:
        return f"{self.doc} ({self.unit})"


# The live gauges' keys are the keyword names of `ServerMetrics.watch`. Units are JetStream's: its
# orchestrator sets jetstream_slots_used_percentage to 1 - free_slots / slots, a fraction despite the
# name, and kv_cache_utilization_perc to occupied slots * 100 / slots, a percent. Ours counts the
# cache's token positions in use instead of whole slots (the same unit, a finer measure: a slot
# holding a short request is mostly free cache).
METRICS: dict[str, MetricSpec] = {
    spec_key: spec
    for spec_key, spec in (
        ("prefill_backlog", MetricSpec(
            "jetstream_prefill_backlog_size", Gauge, "Size of prefill queue", "requests not yet prefilled")),
        ("transfer_backlog", MetricSpec(
            "jetstream_transfer_backlog_size", Gauge, "Size of transfer queue", "prefixes", per_engine=True)),
        ("generate_backlog", MetricSpec(
            "jetstream_generate_backlog_size", Gauge, "Size of generate queue", "prefixes awaiting a slot",
            per_engine=True)),
        ("slots_used_percentage", MetricSpec(
            "jetstream_slots_used_percentage", Gauge, "The percentage of decode slots currently being used",
            "fraction of slots, 0 to 1", per_engine=True)),
        ("requests_waiting", MetricSpec(
            "num_requests_waiting", Gauge, "Requests count waiting to be processed for inference",
            "requests admitted and not yet in a slot")),
        ("kv_cache_utilization", MetricSpec(
            "kv_cache_utilization_perc", Gauge, "kv-cache utilization by the requests under processing",
            "percent of the cache's token positions, 0 to 100")),
        # The model-server protocol's gauges (TotalQueuedRequests, TotalRunningRequests, KVCacheUtilization).
        ("protocol_requests_waiting", MetricSpec(
            "vllm:num_requests_waiting", Gauge, "Number of requests waiting to be processed",
            "requests admitted and not yet in a slot", reads="requests_waiting")),
        ("requests_running", MetricSpec(
            "vllm:num_requests_running", Gauge, "Number of requests in model execution batches",
            "requests holding a decode slot")),
        ("protocol_kv_cache_usage", MetricSpec(
            "vllm:kv_cache_usage_perc", Gauge, "KV-cache usage. 1 means 100 percent usage",
            "fraction of the cache's token positions, 0 to 1", reads="kv_cache_utilization", scale=0.01)),
        # vLLM's prefix cache counters, in prompt tokens (exported with prometheus' _total suffix).
        ("prefix_cache_queries", MetricSpec(
            "vllm:prefix_cache_queries", Counter, "Prefix cache queries, in terms of number of queried tokens",
            "prompt tokens looked up")),
        ("prefix_cache_hits", MetricSpec(
            "vllm:prefix_cache_hits", Counter, "Prefix cache hits, in terms of number of cached tokens",
            "prompt tokens found cached")),
        ("model_load_time", MetricSpec(
            "jetstream_model_load_time", Gauge, "Total time taken to load the model", "seconds")),
        ("startup_latency", MetricSpec(
            "jetstream_server_startup_latency", Gauge, "Total time taken to start the Jetstream server", "seconds")),
        ("queue_duration", MetricSpec(
            "jetstream_queue_duration", Histogram, "The total time each request spends enqueued", "seconds",
            buckets=_SECONDS_SHORT)),
        ("input_length", MetricSpec(
            "jetstream_request_input_length", Histogram, "Number of input tokens per request", "tokens",
            buckets=_INPUT_LENGTH)),
        ("output_length", MetricSpec(
            "jetstream_request_output_length", Histogram, "Number of output tokens per request", "tokens",
            buckets=_OUTPUT_LENGTH)),
        ("success", MetricSpec(
            "jetstream_request_success_count", Counter, "Number of requests successfully completed", "requests")),
        ("ttft", MetricSpec(
            "jetstream_time_to_first_token", Histogram, "Time to first token per request", "seconds",
            buckets=_TTFT)),
        ("tpot", MetricSpec(
            "jetstream_time_per_output_token", Histogram, "Average time per output token per request", "seconds",
            buckets=_TPOT)),
        ("prefill_token", MetricSpec(
            "jetstream_time_per_prefill_token", Histogram, "Prefill time per token per request", "seconds",
            buckets=_PREFILL_TOKEN)),
        ("time_per_request", MetricSpec(
            "jetstream_time_per_request", Histogram, "End to end request latency", "seconds", buckets=_REQUEST)),
        ("wait_time", MetricSpec(
            "jetstream_wait_time_per_request", Histogram, "Time each request is not being prefilled or decoded",
            "seconds", buckets=_SECONDS_SHORT)),
        ("transfer_time", MetricSpec(
            "jetstream_transfer_time", Histogram,
            "Time to move one prefill result to the generate mesh (disaggregated mode)", "seconds",
            buckets=_TRANSFER)),
    )
}  # fmt: skip

_ENGINE_IDX = "0"  # one prefill and one generate engine per server


def _labels(model_name: str) -> dict[str, str]:
    labels = {"id": os.environ.get("HOSTNAME") or socket.gethostname()}
    sanitized = model_name.replace("-", "_").replace(".", "_")
    if re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", sanitized):
        labels["model_name"] = sanitized
    return labels


def _series(spec: MetricSpec, labels: dict[str, str], registry: CollectorRegistry):
    """The metric's one labelled series: JetStream's universal labels, plus idx per engine."""
    labels = {**labels, **({"idx": _ENGINE_IDX} if spec.per_engine else {})}
    extra = {"buckets": spec.buckets} if spec.kind is Histogram else {}
    return spec.kind(spec.name, spec.help, list(labels), registry=registry, **extra).labels(**labels)


def _scaled(callback: Callable[[], float], scale: float) -> Callable[[], float]:
    return callback if scale == 1.0 else lambda: callback() * scale


class ServerMetrics:
    """The server's metrics. Record with the methods below; expose with `exposition()`."""

    def __init__(self, model_name: str = "", registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = _labels(model_name)
        # Every series is made here, so each is exported from the start: a counter's first rate() needs its 0.
        self._series = {key: _series(spec, labels, self.registry) for key, spec in METRICS.items()}

    # -- live gauges ------------------------------------------------------------------------------
    def watch(
        self,
        *,
        prefill_backlog: Callable[[], float],
        transfer_backlog: Callable[[], float],
        generate_backlog: Callable[[], float],
        slots_used_percentage: Callable[[], float],
        requests_waiting: Callable[[], float],
        requests_running: Callable[[], float],
        kv_cache_utilization: Callable[[], float],
    ) -> None:
        """Register callbacks read at every scrape (so values are live, not last-set), each in the
        unit of its row in METRICS: slots_used_percentage a fraction 0..1, kv_cache_utilization a
        percent 0..100, the backlogs and requests counts. Rows that `read` another row's callback
        get its value times their `scale`."""
        callbacks = {
            "prefill_backlog": prefill_backlog,
            "transfer_backlog": transfer_backlog,
            "generate_backlog": generate_backlog,
            "slots_used_percentage": slots_used_percentage,
            "requests_waiting": requests_waiting,
            "requests_running": requests_running,
            "kv_cache_utilization": kv_cache_utilization,
        }
        for key, spec in METRICS.items():
            source = spec.reads or key
            if source in callbacks:
                self._series[key].set_function(_scaled(callbacks[source], spec.scale))

    # -- events -----------------------------------------------------------------------------------
    def startup(self, *, model_load_s: float, total_s: float) -> None:
        self._series["model_load_time"].set(model_load_s)
        self._series["startup_latency"].set(total_s)

    def prefilled(self, *, queued_s: float, prefill_s: float, prompt_tokens: int) -> None:
        self._series["queue_duration"].observe(queued_s)
        self._series["input_length"].observe(prompt_tokens)
        self._series["prefill_token"].observe(prefill_s / max(prompt_tokens, 1))

    def prefix_cache_lookup(self, *, prompt_tokens: int, cached_tokens: int) -> None:
        self._series["prefix_cache_queries"].inc(prompt_tokens)
        self._series["prefix_cache_hits"].inc(cached_tokens)

    def transferred(self, seconds: float) -> None:
        self._series["transfer_time"].observe(seconds)

    def first_token(self, seconds: float) -> None:
        self._series["ttft"].observe(seconds)

    def completed(self, *, total_s: float, ttft_s: float, output_tokens: int, wait_s: float) -> None:
        """A request finished normally (stop token or string, max_tokens or cache full)."""
        self._series["success"].inc()
        self._series["time_per_request"].observe(total_s)
        self._series["output_length"].observe(output_tokens)
        self._series["wait_time"].observe(wait_s)
        if output_tokens > 1:
            self._series["tpot"].observe((total_s - ttft_s) / (output_tokens - 1))

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    content_type = prometheus_client.CONTENT_TYPE_LATEST
