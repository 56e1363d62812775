"""Prometheus metrics under JetStream's names (jetstream/core/metrics/prometheus.py), so existing
dashboards and the GKE autoscaling examples (which scale on jetstream_prefill_backlog_size and
jetstream_slots_used_percentage) work against this server unchanged.

Gauges are read live at scrape time from callbacks the orchestrator registers; histograms and
counters are recorded as requests progress. Each server owns its registry (no process globals), so
tests can run several servers in one process. Label set as JetStream: `id` (the host name) and
`model_name` when it is a valid label value; per-engine gauges add `idx`.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS_SHORT = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_PREFILL_TOKEN = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
_REQUEST = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
_INPUT_LENGTH = tuple(2**i for i in range(4, 16))
_OUTPUT_LENGTH = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_TRANSFER = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _labels(model_name: str) -> dict[str, str]:
    labels = {"id": os.environ.get("HOSTNAME") or socket.gethostname()}
    sanitized = model_name.replace("-", "_").replace(".", "_")
    if re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", sanitized):
        labels["model_name"] = sanitized
    return labels


class ServerMetrics:
    """The server's metrics. Record with the methods below; expose with `exposition()`."""

    def __init__(self, model_name: str = "", registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._labels = _labels(model_name)
        names = list(self._labels)
        reg = self.registry

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=reg)

        self._prefill_backlog = Gauge(
            "jetstream_prefill_backlog_size", "Size of prefill queue", names, registry=reg
        )
        self._transfer_backlog = Gauge(
            "jetstream_transfer_backlog_size", "Size of transfer queue", names + ["idx"], registry=reg
        )
        self._generate_backlog = Gauge(
            "jetstream_generate_backlog_size", "Size of generate queue", names + ["idx"], registry=reg
        )
        self._slots_used = Gauge(
            "jetstream_slots_used_percentage",
            "The percentage of decode slots currently being used",
            names + ["idx"],
            registry=reg,
        )
        self._requests_waiting = Gauge(
            "num_requests_waiting", "Number of requests waiting to be processed", names, registry=reg
        )
        self._kv_cache_utilization = Gauge(
            "kv_cache_utilization_perc",
            "KV cache utilization % by the requests under processing",
            names,
            registry=reg,
        )
        self._model_load_time = Gauge(
            "jetstream_model_load_time", "Total time taken to load the model", names, registry=reg
        )
        self._startup_latency = Gauge(
            "jetstream_server_startup_latency",
            "Total time taken to start the Jetstream server",
            names,
            registry=reg,
        )
        self._queue_duration = histogram(
            "jetstream_queue_duration", "The total time each request spends enqueued in seconds", _SECONDS_SHORT
        )
        self._input_length = histogram(
            "jetstream_request_input_length", "Number of input tokens per request", _INPUT_LENGTH
        )
        self._output_length = histogram(
            "jetstream_request_output_length", "Number of output tokens per request", _OUTPUT_LENGTH
        )
        self._success = Counter(
            "jetstream_request_success_count", "Number of requests successfully completed", names, registry=reg
        )
        self._ttft = histogram(
            "jetstream_time_to_first_token", "Time to first token per request in seconds", _TTFT
        )
        self._tpot = histogram(
            "jetstream_time_per_output_token",
            "Average time per output token per request in seconds",
            _TPOT,
        )
        self._prefill_token = histogram(
            "jetstream_time_per_prefill_token", "Prefill time per token per request in seconds", _PREFILL_TOKEN
        )
        self._time_per_request = histogram(
            "jetstream_time_per_request", "End to end request latency in seconds", _REQUEST
        )
        self._wait_time = histogram(
            "jetstream_wait_time_per_request",
            "Time each request is not being prefilled or decoded",
            _SECONDS_SHORT,
        )
        self._transfer_time = histogram(
            "jetstream_transfer_time",
            "Time to move one prefill result to the generate mesh (disaggregated mode), seconds",
            _TRANSFER,
        )

    # -- live gauges ------------------------------------------------------------------------------
    def watch(
        self,
        *,
        prefill_backlog: Callable[[], float],
        transfer_backlog: Callable[[], float],
        generate_backlog: Callable[[], float],
        slots_used_percentage: Callable[[], float],
        requests_waiting: Callable[[], float],
        kv_cache_utilization: Callable[[], float],
    ) -> None:
        """Register callbacks read at every scrape (so values are live, not last-set)."""
        self._prefill_backlog.labels(**self._labels).set_function(prefill_backlog)
        self._transfer_backlog.labels(**self._labels, idx="0").set_function(transfer_backlog)
        self._generate_backlog.labels(**self._labels, idx="0").set_function(generate_backlog)
        self._slots_used.labels(**self._labels, idx="0").set_function(slots_used_percentage)
        self._requests_waiting.labels(**self._labels).set_function(requests_waiting)
        self._kv_cache_utilization.labels(**self._labels).set_function(kv_cache_utilization)

    # -- events -----------------------------------------------------------------------------------
    def startup(self, *, model_load_s: float, total_s: float) -> None:
        self._model_load_time.labels(**self._labels).set(model_load_s)
        self._startup_latency.labels(**self._labels).set(total_s)

    def prefilled(self, *, queued_s: float, prefill_s: float, prompt_tokens: int) -> None:
        self._queue_duration.labels(**self._labels).observe(queued_s)
        self._input_length.labels(**self._labels).observe(prompt_tokens)
        self._prefill_token.labels(**self._labels).observe(prefill_s / max(prompt_tokens, 1))

    def transferred(self, seconds: float) -> None:
        self._transfer_time.labels(**self._labels).observe(seconds)

    def first_token(self, seconds: float) -> None:
        self._ttft.labels(**self._labels).observe(seconds)

    def completed(self, *, total_s: float, ttft_s: float, output_tokens: int, wait_s: float) -> None:
        """A request finished normally (stop token, max_tokens or cache full)."""
        self._success.labels(**self._labels).inc()
        self._time_per_request.labels(**self._labels).observe(total_s)
        self._output_length.labels(**self._labels).observe(output_tokens)
        self._wait_time.labels(**self._labels).observe(wait_s)
        if output_tokens > 1:
            self._tpot.labels(**self._labels).observe((total_s - ttft_s) / (output_tokens - 1))

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    content_type = prometheus_client.CONTENT_TYPE_LATEST
