"""The metrics the autoscaler reads are right: JetStream's names, types, labels
and units, live at scrape time, on a real `python -m serving` process (the tiny random-weight
config: the point is the plumbing, not the model) driven to a prefill backlog.

JetStream's definitions (jetstream/core/metrics/prometheus.py, set in jetstream/core/orchestrator.py):
  jetstream_prefill_backlog_size   gauge {id, model_name}       prefill queue size (requests)
  jetstream_slots_used_percentage  gauge {id, model_name, idx}  1 - free slots / slots: a fraction
  kv_cache_utilization_perc        gauge {id, model_name}       used * 100 / total: a percent

The model-server protocol of the Gateway API Inference Extension (docs/proposals/003-model-server-protocol),
under the vLLM names its endpoint picker reads by default (pkg/epp/server/options.go):
  vllm:num_requests_waiting   gauge  TotalQueuedRequests: requests in the queue
  vllm:num_requests_running   gauge  TotalRunningRequests: requests actively being served
  vllm:kv_cache_usage_perc    gauge  KVCacheUtilization: a fraction 0..1 (the picker's flag says "from 0 to 1")
"""

from __future__ import annotations

import concurrent.futures

import pytest

from serving.server.metrics import METRICS
from tests.server import server_process
from tests.server.server_process import (
    HOST,
    free_port,
    long_completion,
    scrape_gauges,
    tiny_server_args,
    wait_until,
)

SLOTS = 2
PROTOCOL = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
WAITING, RUNNING, KV_USAGE = PROTOCOL
PREFIX_CACHE = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")  # exported with _total
REQUESTS = 10  # SLOTS decode, the rest wait: a backlog on a 2-slot server
MAX_TOKENS = 2000  # per request: long enough to hold a slot while the test scrapes


def test_metric_table_matches_jetstream():
    """Names, types and labels as JetStream declares them (hand-copied from its prometheus.py)."""
    jetstream = {
        "jetstream_prefill_backlog_size": ("Gauge", False),
        "jetstream_transfer_backlog_size": ("Gauge", True),
        "jetstream_generate_backlog_size": ("Gauge", True),
        "jetstream_slots_used_percentage": ("Gauge", True),
        "num_requests_waiting": ("Gauge", False),
        "kv_cache_utilization_perc": ("Gauge", False),
        "jetstream_model_load_time": ("Gauge", False),
        "jetstream_server_startup_latency": ("Gauge", False),
        "jetstream_queue_duration": ("Histogram", False),
        "jetstream_request_input_length": ("Histogram", False),
        "jetstream_request_output_length": ("Histogram", False),
        "jetstream_request_success_count": ("Counter", False),
        "jetstream_time_to_first_token": ("Histogram", False),
        "jetstream_time_per_output_token": ("Histogram", False),
        "jetstream_time_per_prefill_token": ("Histogram", False),
        "jetstream_time_per_request": ("Histogram", False),
        "jetstream_wait_time_per_request": ("Histogram", False),
    }
    ours = {spec.name: (spec.kind.__name__, spec.per_engine) for spec in METRICS.values()}
    assert {name: ours[name] for name in jetstream} == jetstream
    # ours: disaggregated transfers, the model-server protocol's gauges, vLLM's prefix cache counters
    assert set(ours) - set(jetstream) == {"jetstream_transfer_time", *PROTOCOL, *PREFIX_CACHE}
    assert all(ours[name] == ("Counter", False) for name in PREFIX_CACHE)
    assert all(ours[name] == ("Gauge", False) for name in PROTOCOL)
    buckets = {spec.name: spec.buckets for spec in METRICS.values()}
    input_buckets = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)  # DEFAULT_PREFILL_BUCKETS
    assert buckets["jetstream_request_input_length"] == input_buckets
    assert buckets["jetstream_request_output_length"][-3:] == (500000, 1000000, 2000000)


def test_backlog_and_slots_are_live_on_a_real_server():
    port = free_port()
    url = f"http://{HOST}:{port}"
    args = tiny_server_args(port, slots=SLOTS, max_target_length=MAX_TOKENS + 32)
    env = server_process.server_env(devices=1)
    with server_process.running(args, env, port, "metrics-server.log"):
        idle = scrape_gauges(url)
        assert idle["jetstream_prefill_backlog_size"].value == 0
        assert idle["jetstream_slots_used_percentage"].value == 0
        assert idle["jetstream_prefill_backlog_size"].labels == {"id": idle["num_requests_waiting"].labels["id"],
                                                                 "model_name": "tiny"}  # fmt: skip
        assert idle["jetstream_slots_used_percentage"].labels["idx"] == "0"
        assert [idle[name].value for name in PROTOCOL] == [0, 0, 0]

        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as clients:
            done = [clients.submit(long_completion, url, MAX_TOKENS)]
            # one request on a 2-slot server: half the slots, as a fraction
            wait_until(lambda: scrape_gauges(url)["jetstream_slots_used_percentage"].value == 0.5, 30,
                       "one slot of two used")  # fmt: skip
            done += [clients.submit(long_completion, url, MAX_TOKENS) for _ in range(REQUESTS - 1)]
            loaded: dict = {}
            wait_until(lambda: _backlogged(scrape_gauges(url), loaded), 30, "a prefill backlog")
            protocol: dict = {}
            wait_until(lambda: _all_admitted(scrape_gauges(url), protocol), 30, "every request admitted")
            results = [f.result() for f in done]

        backlog = loaded["jetstream_prefill_backlog_size"].value
        print(f"\nloaded: prefill backlog {backlog:.0f}, slots used {loaded['jetstream_slots_used_percentage'].value}, "
              f"waiting {loaded['num_requests_waiting'].value:.0f}, "
              f"KV cache {loaded['kv_cache_utilization_perc'].value:.1f} %")  # fmt: skip
        assert loaded["jetstream_slots_used_percentage"].value == 1.0  # every slot: 1, not 100
        # requests in a slot are not waiting; those waiting include the ones not yet prefilled
        assert 0 < backlog <= loaded["num_requests_waiting"].value <= REQUESTS - SLOTS
        assert 0 < loaded["kv_cache_utilization_perc"].value <= 100
        assert all(r["usage"]["completion_tokens"] == MAX_TOKENS for r in results)
        print(f"protocol: waiting {protocol[WAITING].value:.0f}, running {protocol[RUNNING].value:.0f}, "
              f"KV cache usage {protocol[KV_USAGE].value:.4f}")  # fmt: skip
        # every slot serves one request, the rest queue; the KV-cache gauge is JetStream's percent as a fraction
        assert protocol[RUNNING].value == SLOTS
        assert protocol[WAITING].value == protocol["num_requests_waiting"].value == REQUESTS - SLOTS
        assert 0 < protocol[KV_USAGE].value <= 1
        assert protocol[KV_USAGE].value == pytest.approx(protocol["kv_cache_utilization_perc"].value / 100, abs=0.01)
        # live values, not the last ones set: back to idle once the load is served
        wait_until(lambda: _idle(scrape_gauges(url)), 10, "idle gauges")


def _backlogged(gauges: dict, keep: dict) -> bool:
    if gauges["jetstream_prefill_backlog_size"].value > 0 and gauges["jetstream_slots_used_percentage"].value == 1:
        keep.update(gauges)
        return True
    return False


def _all_admitted(gauges: dict, keep: dict) -> bool:
    """Every client's request is on the server: queued or in a slot (the protocol's two counts)."""
    if gauges[WAITING].value + gauges[RUNNING].value == REQUESTS:
        keep.update(gauges)
        return True
    return False


def _idle(gauges: dict) -> bool:
    return all(gauges[name].value == 0 for name in (
        "jetstream_prefill_backlog_size", "jetstream_slots_used_percentage", "num_requests_waiting",
        "kv_cache_utilization_perc", *PROTOCOL))  # fmt: skip
