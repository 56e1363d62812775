"""A local proof of the autoscaling control loop.

Two real `python -m serving` replicas (the tiny random-weight config) on loopback behind a small
load balancer; a burst from one client session fills one replica's prefill backlog; both
replicas' /metrics are scraped as Google Managed Prometheus scrapes each pod, and the values go
through the Horizontal Pod Autoscaler's formula (components.core.hpa.hpa_desired_replicas,
the stack's model of the HPA) to the decision the HPA would take. The numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import itertools
import math
import threading
from collections.abc import Iterator, Sequence

import httpx
import pytest

from components.core.hpa import HPA_TOLERANCE, hpa_desired_replicas
from tests.server import server_process
from tests.server.server_process import HOST, free_port, long_completion, scrape_gauges, tiny_server_args, wait_until

SLOTS = 2  # per replica
BURST = 16  # requests of one session: SLOTS decode on its replica, the rest wait there
MAX_TOKENS = 2000
MIN_REPLICAS, MAX_REPLICAS = 1, 8
BACKLOG_TARGET = 2.0  # averageValue of jetstream_prefill_backlog_size per replica
SLOTS_TARGET = 0.5  # averageValue of jetstream_slots_used_percentage (a fraction) per replica
BACKLOG = "jetstream_prefill_backlog_size"
SLOTS_USED = "jetstream_slots_used_percentage"


# -- the HPA's formula on hand-computed cases ----------------------------------------------------
@pytest.mark.parametrize(
    "per_pod,target,desired,within",
    [
        ([6.0, 0.0], 2.0, 3, False),  # average 3 over 2 pods: ceil(2 x 3 / 2) = 3
        ([2.1, 2.0], 2.0, 2, True),  # ratio 1.025: inside the 10 % tolerance, no change
        ([2.5, 2.0], 2.0, 3, False),  # ratio 1.125: outside it, ceil(2 x 1.125) = 3
        ([1.0, 0.0], 0.5, 2, True),  # slots used: one full replica, one idle, averages to the target
        ([0.0, 0.0], 2.0, 1, False),  # idle: ceil(0) = 0, held at minReplicas
        ([40.0], 1.0, 5, False),  # ceil(40) = 40; one step adds at most 4 pods (or 100 %): 5
        ([9.0, 9.0, 9.0], 1.0, 7, False),  # 27; at most 3 + 4 = 7
        ([4.0] * 6, 1.0, 8, False),  # 24; at most 6 x 2 = 12; held at maxReplicas
    ],
)
def test_hpa_formula(per_pod, target, desired, within):
    decision = hpa_desired_replicas(per_pod, target, min_replicas=MIN_REPLICAS, max_replicas=MAX_REPLICAS)
    assert (decision.desired, decision.within_tolerance) == (desired, within)


def test_hpa_scale_up_is_limited_per_step():
    """The default scaleUp policies: at most +100 % or +4 pods per period, whichever is more."""
    assert hpa_desired_replicas([50.0], 1.0, min_replicas=1, max_replicas=100).desired == 5  # 1 + 4
    assert hpa_desired_replicas([50.0] * 8, 1.0, min_replicas=1, max_replicas=100).desired == 16  # 8 x 2


def test_hpa_formula_refuses_what_the_hpa_cannot_compute():
    with pytest.raises(ValueError, match="per_pod"):
        hpa_desired_replicas([], 1.0, min_replicas=1, max_replicas=2)
    with pytest.raises(ValueError, match="target"):
        hpa_desired_replicas([1.0], 0.0, min_replicas=1, max_replicas=2)
    with pytest.raises(ValueError, match="min_replicas"):
        hpa_desired_replicas([1.0], 1.0, min_replicas=3, max_replicas=2)


# -- the loop on real servers --------------------------------------------------------------------
class StickyBalancer(http.server.ThreadingHTTPServer):
    """A small HTTP load balancer with session affinity: a session's first request (X-Session
    header) goes to the next replica in turn and the session sticks there, as one heavy client's
    requests do behind a Service with sessionAffinity or a consistent-hash gateway. It forwards a
    request and returns the whole response."""

    daemon_threads = True

    def __init__(self, replicas: Sequence[str]):
        super().__init__((HOST, 0), _Forward)
        self.replicas = list(replicas)
        self._next = itertools.cycle(self.replicas)
        self._sessions: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def replica_for(self, session: str) -> str:
        with self._lock:
            if session not in self._sessions:
                self._sessions[session] = next(self._next)
            return self._sessions[session]


class _Forward(http.server.BaseHTTPRequestHandler):
    server: StickyBalancer

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        replica = self.server.replica_for(self.headers.get("X-Session", ""))
        upstream = httpx.post(
            replica + self.path, content=body, headers={"Content-Type": "application/json"},
            timeout=server_process.START_TIMEOUT_S,
        )  # fmt: skip
        self.send_response(upstream.status_code)
        self.send_header("Content-Type", upstream.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    def log_message(self, *args):  # quiet: the test prints what matters
        pass


@contextlib.contextmanager
def replicas(count: int) -> Iterator[list[str]]:
    """`count` tiny servers started together; stopped when the block ends."""
    ports = [free_port() for _ in range(count)]
    env = server_process.server_env(devices=1)
    procs = [
        server_process.spawn(tiny_server_args(port, slots=SLOTS, max_target_length=MAX_TOKENS + 32), env,
                             f"replica-{i}.log")
        for i, port in enumerate(ports)
    ]  # fmt: skip
    try:
        urls = [f"http://{HOST}:{port}" for port in ports]
        for url in urls:
            server_process.wait_live(url, procs)
        yield urls
    finally:
        server_process.stop(procs)


@contextlib.contextmanager
def balancer(urls: Sequence[str]) -> Iterator[StickyBalancer]:
    lb = StickyBalancer(urls)
    thread = threading.Thread(target=lb.serve_forever, daemon=True)
    thread.start()
    try:
        yield lb
    finally:
        lb.shutdown()
        lb.server_close()
        thread.join(timeout=10)


def decide(scraped: Sequence[dict], metric: str, target: float):
    return hpa_desired_replicas(
        [gauges[metric].value for gauges in scraped], target, min_replicas=MIN_REPLICAS, max_replicas=MAX_REPLICAS
    )


def report(phase: str, scraped: Sequence[dict]) -> None:
    print(f"\n{phase}:")
    for i, gauges in enumerate(scraped):
        print(f"  replica {i}: {BACKLOG} {gauges[BACKLOG].value:.0f}, {SLOTS_USED} {gauges[SLOTS_USED].value:.2f}")
    for metric, target in ((BACKLOG, BACKLOG_TARGET), (SLOTS_USED, SLOTS_TARGET)):
        d = decide(scraped, metric, target)
        if d.within_tolerance:
            outcome = f"within the {HPA_TOLERANCE:.0%} tolerance: no change"
        elif d.desired < len(scraped):
            outcome = "scale down, once the stabilization window has passed"
        else:
            outcome = "scale up"
        print(f"  {metric}: average {d.average:.2f} / target {target} = {d.ratio:.2f}: "
              f"{len(scraped)} -> {d.desired} replicas ({outcome})")  # fmt: skip


def test_one_backlogged_replica_scales_the_deployment_up_then_down():
    with replicas(2) as urls, balancer(urls) as lb:
        # a light session is served by one replica; then the burst session lands on the other
        assert long_completion(lb.url, 8, {"X-Session": "light"})["usage"]["completion_tokens"] == 8
        with concurrent.futures.ThreadPoolExecutor(BURST) as clients:
            session = {"X-Session": "burst"}
            burst = [clients.submit(long_completion, lb.url, MAX_TOKENS, session) for _ in range(BURST)]
            loaded_index = urls.index(lb.replica_for("burst"))
            loaded: list = []

            def burst_arrived() -> bool:  # every request of the burst admitted, none finished yet
                scraped = [scrape_gauges(url) for url in urls]
                if scraped[loaded_index]["num_requests_waiting"].value == BURST - SLOTS:
                    loaded[:] = scraped
                    return True
                return False

            wait_until(burst_arrived, 60, "the burst on its replica", every_s=0.05)
            results = [f.result() for f in burst]
        assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
        report("under the burst", loaded)
        idle_index = 1 - loaded_index
        assert loaded[loaded_index][SLOTS_USED].value == 1.0
        assert loaded[idle_index][BACKLOG].value == 0 and loaded[idle_index][SLOTS_USED].value == 0
        by_backlog = decide(loaded, BACKLOG, BACKLOG_TARGET)
        assert by_backlog.desired > 2  # the backlog of one replica, averaged over two, still scales up
        # two pods, one with backlog B: ceil(2 x (B / 2) / target) = ceil(B / target)
        backlog = loaded[loaded_index][BACKLOG].value
        assert by_backlog.desired == min(MAX_REPLICAS, math.ceil(backlog / BACKLOG_TARGET))
        assert decide(loaded, SLOTS_USED, SLOTS_TARGET).within_tolerance  # (1.0 + 0.0) / 2 is the target

        wait_until(lambda: all(scrape_gauges(url)[SLOTS_USED].value == 0 for url in urls), 30, "load served")
        drained = [scrape_gauges(url) for url in urls]
        report("after the burst", drained)
        assert decide(drained, BACKLOG, BACKLOG_TARGET).desired == MIN_REPLICAS
