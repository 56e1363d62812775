"""Replicas and autoscaling on the server's own metrics: config keys, capacity, manifests as data.

Pure, no Pulumi: `parse_autoscaling` reads the four config keys, `replica_summary` and
`slice_pools` plan the TPU capacity of every replica, and `autoscaling_manifests` builds the
PodMonitoring and the HorizontalPodAutoscaler as dicts. `components.resources.autoscaling`
wraps them (and installs the metrics adapter with its own identity). With `maxReplicas` equal to
`replicas` (the default) nothing here adds an object, a flag or a summary line.

The control loop, as GKE documents it for JetStream and for LeaderWorkerSets
(https://cloud.google.com/kubernetes-engine/docs/how-to/machine-learning/inference/autoscaling-tpu,
https://cloud.google.com/kubernetes-engine/docs/tutorials/serve-multihost-gpu):
  1. Google Cloud Managed Service for Prometheus (on by default in GKE) scrapes each replica's
     leader pod, as a `PodMonitoring` in the workload's namespace says, into Cloud Monitoring;
  2. the Custom Metrics Stackdriver Adapter serves those series to the HPA under the name
     `prometheus.googleapis.com|<metric>|gauge`; it reads Cloud Monitoring as the Kubernetes
     service account custom-metrics/custom-metrics-stackdriver-adapter, which Workload Identity
     maps to an IAM principal granted `roles/monitoring.viewer`;
  3. an `autoscaling/v2` HPA scales the LeaderWorkerSet through its scale subresource (LWS CRD
     v0.10.0: specReplicasPath .spec.replicas, labelSelectorPath .status.hpaPodSelector, which
     LWS sets to the leader pods: leaderworkerset.sigs.k8s.io/name=<lws>, worker-index=0), on the
     average of a Pods metric over those leaders: desired = ceil(replicas x average / target).
A new LWS group stays Pending until GKE's cluster autoscaler has created its slice (see
`slice_pools`), so the HPA adds whole slices and the scale-down window covers their warm-up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from components.core import lws_model, tpu
from components.core.config_keys import ConfigKey, is_set, read_choice, read_integer, read_text
from components.core.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# The metrics. `autoscalingMetric` names what a gauge counts; each runtime maps the name to its
# server's gauge (`ServerRuntime.scaling_metrics`). METRICS are JetStream's orchestrator gauges
# (jetstream/core/metrics/prometheus.py), which the bundled server exports under the same names and
# units (serving/server/metrics.py); vLLM's are in components/core/runtimes/vllm.py.

# The HPA, as this stack models it (https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/
# #algorithm-details; kubernetes pkg/controller/podautoscaler/replica_calculator.go, calcPlainMetricReplicas).
# It skips a scaling step while |1 - average/target| <= 0.1 (kube-controller-manager
# --horizontal-pod-autoscaler-tolerance, default 0.1; per-HPA tolerance is an alpha feature).
HPA_TOLERANCE = 0.1
# The default scale-up behaviour: per period, add at most 100% of the current pods or 4 pods,
# whichever is more (spec.behavior.scaleUp default policies, selectPolicy Max).
HPA_SCALE_UP_PERCENT = 100
HPA_SCALE_UP_PODS = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingMetric:
    """One metric `autoscalingMetric` can name, with its default target and the reason for it."""

    name: str  # the autoscalingMetric value
    prometheus_name: str
    meaning: str  # what the target counts, per replica (for messages and docs)
    default_target: float
    ceiling: float | None = None  # the largest value the gauge can report; None: unbounded

    @property
    def adapter_metric(self) -> str:
        """The name the Custom Metrics Stackdriver Adapter gives a Managed Prometheus gauge."""
        return f"prometheus.googleapis.com|{self.prometheus_name}|gauge"

    @property
    def highest_target(self) -> float | None:
        """Targets at or above this can never be exceeded by the HPA's tolerance, so never scale up."""
        return None if self.ceiling is None else self.ceiling / (1 + HPA_TOLERANCE)


METRICS: dict[str, ScalingMetric] = {
    metric.name: metric
    for metric in (
        ScalingMetric(
            name="prefill-backlog",
            prometheus_name="jetstream_prefill_backlog_size",
            meaning="requests waiting for prefill, averaged over the replicas' leaders",
            # A backlog only builds once every decode slot is busy; from then on latency grows with
            # it while throughput stays flat. 10 is the queue-length target of GKE's LLM-on-TPU
            # autoscaling sample for the same kind of gauge (vLLM's num_requests_waiting,
            # kubernetes-engine-samples ai-ml/vllm-tpu/vllm-hpa.yaml). Lower scales out sooner.
            default_target=10.0,
        ),
        ScalingMetric(
            name="slots-used",
            prometheus_name="jetstream_slots_used_percentage",
            meaning="the fraction (0..1) of decode slots in use, averaged over the replicas' leaders",
            # The gauge is 1 - free/total slots. At 1.0 new requests queue and latency climbs, so the
            # default leaves a fifth of the slots as headroom for the minutes a new slice takes.
            default_target=0.8,
            ceiling=1.0,
        ),
    )
}
DEFAULT_METRIC = "prefill-backlog"

# ---------------------------------------------------------------------------------------------
# Config keys (values arrive as strings). 0 and "" mean "derived", as elsewhere in the stack.

MAX_REPLICAS_LIMIT = 100  # a typo guard: every replica is a whole TPU slice (one per role)
SAME_AS_REPLICAS = 0

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        name="replicas",
        type="integer",
        default=1,
        description=(
            "LeaderWorkerSet replicas, each on its own TPU slice (one per role); the Service balances over their "
            "leaders."
        ),
    ),
    ConfigKey(
        name="maxReplicas",
        type="integer",
        default=SAME_AS_REPLICAS,
        description=(
            "Upper bound for autoscaling; larger than replicas turns the HPA on; 0 = replicas (no autoscaling)."
        ),
    ),
    ConfigKey(
        name="autoscalingMetric",
        type="string",
        default=DEFAULT_METRIC,
        description=(
            f"Metric the HPA scales on: {', '.join(METRICS)} (requests waiting: JetStream's "
            f"jetstream_prefill_backlog_size, vLLM's vllm:num_requests_waiting; or the share of decode capacity in use:"
            f" jetstream_slots_used_percentage, vllm:kv_cache_usage_perc)."
        ),
    ),
    ConfigKey(
        name="autoscalingTarget",
        type="string",
        default="",
        description=(
            "Per-replica target of autoscalingMetric; empty = the metric's default (prefill-backlog 10 requests, "
            "slots-used 0.8)."
        ),
    ),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Autoscaling:
    """How many LeaderWorkerSet replicas, and what the HPA scales them on."""

    replicas: int
    max_replicas: int
    metric: ScalingMetric
    target: float

    @property
    def enabled(self) -> bool:
        return self.max_replicas > self.replicas

    @property
    def target_quantity(self) -> str:
        """The target as a Kubernetes quantity in canonical form ("10", "800m")."""
        milli = round(self.target * 1000)
        return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


KEYS_BY_NAME = {key.name: key for key in CONFIG_KEYS}


def _replica_bounds(raw: Mapping[str, str]) -> tuple[int, int]:
    replicas = read_integer(raw, KEYS_BY_NAME["replicas"])
    if not 1 <= replicas <= MAX_REPLICAS_LIMIT:
        raise ConfigError(
            "replicas",
            f"{replicas} is outside 1..{MAX_REPLICAS_LIMIT} (each replica is a whole TPU slice per role)",
            "pulumi config set replicas 1",
        )
    maximum = read_integer(raw, KEYS_BY_NAME["maxReplicas"])
    maximum = replicas if maximum == SAME_AS_REPLICAS else maximum
    if maximum < replicas:
        raise ConfigError(
            ("maxReplicas", "replicas"),
            f"maxReplicas {maximum} is smaller than replicas {replicas}",
            f"pulumi config set maxReplicas {replicas} for a fixed size, or larger to autoscale from {replicas}",
        )
    if maximum > MAX_REPLICAS_LIMIT:
        raise ConfigError(
            "maxReplicas",
            f"{maximum} is above {MAX_REPLICAS_LIMIT} (each replica is a whole TPU slice per role)",
            f"pulumi config set maxReplicas {MAX_REPLICAS_LIMIT}",
        )
    return replicas, maximum


def _metric(raw: Mapping[str, str], metrics: Mapping[str, ScalingMetric]) -> ScalingMetric:
    suggestion = "pulumi config set autoscalingMetric prefill-backlog (latency and throughput) or slots-used (capacity)"
    return metrics[read_choice(raw, KEYS_BY_NAME["autoscalingMetric"], metrics, suggestion)]


def _target(raw: Mapping[str, str], metric: ScalingMetric) -> float:
    text = read_text(raw, KEYS_BY_NAME["autoscalingTarget"])
    if not text:
        return metric.default_target
    try:
        target = float(text)
    except ValueError:
        target = math.nan
    if not math.isfinite(target) or round(target * 1000) <= 0:
        raise ConfigError(
            "autoscalingTarget",
            f"{text!r} is not a positive number (at least 0.001); for {metric.name} it counts {metric.meaning}",
            f"pulumi config set autoscalingTarget {metric.default_target:g}",
        )
    highest = metric.highest_target
    if highest is not None and target >= highest:
        raise ConfigError(
            ("autoscalingTarget", "autoscalingMetric"),
            f"{metric.name} target {target:g} cannot be met: {metric.prometheus_name} is at most {metric.ceiling:g} "
            f"({metric.meaning}) and the HPA scales up only above target x {1 + HPA_TOLERANCE:g} (its tolerance), "
            f"so targets must stay below {highest:.4g}",
            f"pulumi config set autoscalingTarget {metric.default_target:g}",
        )
    return target


def _check_used(raw: Mapping[str, str], replicas: int) -> None:
    """A metric or target without maxReplicas is a forgotten maxReplicas, not a no-op."""
    for name in ("autoscalingMetric", "autoscalingTarget"):
        if is_set(raw, KEYS_BY_NAME[name]):
            raise ConfigError(
                (name, "maxReplicas"),
                f"is set but autoscaling is off (maxReplicas = replicas = {replicas})",
                f"pulumi config set maxReplicas {replicas + 1} or more to autoscale, or remove {name}",
            )


def parse_autoscaling(raw: Mapping[str, str], metrics: Mapping[str, ScalingMetric] = METRICS) -> Autoscaling:
    """The typed replica and autoscaling settings from the raw config (other keys are ignored);
    `metrics` are the server runtime's gauges by autoscalingMetric value."""
    replicas, maximum = _replica_bounds(raw)
    metric = _metric(raw, metrics)
    scaling = Autoscaling(replicas=replicas, max_replicas=maximum, metric=metric, target=_target(raw, metric))
    if not scaling.enabled:
        _check_used(raw, replicas)
    return scaling


# ---------------------------------------------------------------------------------------------
# Capacity: one TPU slice per role per replica.


def _capacity_at(replicas: int, tpu_slice: tpu.TpuSlice, roles: tuple[str, ...]) -> dict:
    slices = replicas * len(roles)
    return {
        "replicas": replicas,
        "slices": slices,
        "chips": slices * tpu_slice.chips,
        "hosts": slices * tpu_slice.hosts,
    }


def replica_summary(
    scaling: Autoscaling, *, tpu_slice: tpu.TpuSlice, roles: tuple[str, ...], startup_delay_seconds: int
) -> dict | None:
    """Chips and hosts at the minimum and maximum replica count, for the plan output.

    None for the default single, fixed replica, so a stack without these keys previews as before.
    """
    if scaling.max_replicas == 1:
        return None
    summary = {
        "min": _capacity_at(scaling.replicas, tpu_slice, roles),
        "max": _capacity_at(scaling.max_replicas, tpu_slice, roles),
    }
    if scaling.enabled:
        summary["autoscaling"] = {
            "metric": scaling.metric.prometheus_name,
            "target": scaling.target_quantity,
            "scaleDownStabilizationSeconds": scale_down_stabilization_seconds(startup_delay_seconds),
        }
    return summary


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeRange:
    min_nodes: int
    max_nodes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlicePool:
    """The TPU node pool of one role of one LWS replica (node_pools.py turns it into a NodePoolSpec)."""

    role: str  # serving | prefill | generate
    replica: int  # node_pools.node_pool_name: replica 0 keeps the role's pool name, others add -r<i>
    node_count: int  # the size it is created with: the slice's hosts if fixed, 0 if autoscaled
    autoscaling: NodeRange | None  # None: fixed size


def slice_pools(scaling: Autoscaling, *, roles: tuple[str, ...], hosts_per_slice: int) -> tuple[SlicePool, ...]:
    """One node pool per role per replica, up to maxReplicas; the autoscaled ones start empty.

    One pool per replica, also for single-host slices, because the LeaderWorkerSet places each
    group exclusively on one node pool (exclusive-topology on cloud.google.com/gke-nodepool): two
    groups never share a pool. Replicas below `replicas` always run, so their pools have a fixed
    size (exactly today's pools for replica 0). Pools of replicas above it autoscale between 0
    and the slice's hosts, as GKE documents for TPU slices
    (https://cloud.google.com/kubernetes-engine/docs/how-to/tpus, autoscaling flags of
    `gcloud container node-pools create`; https://cloud.google.com/kubernetes-engine/docs/concepts/tpus):
      * multi-host slice pool: `--enable-autoscaling --max-nodes=<hosts of the slice>`, created
        with 0 nodes; the cluster autoscaler adds or removes the whole slice at once (atomic
        0 <-> full size), so an unused slice costs nothing and a partial slice never exists;
      * single-host slice pool: an ordinary autoscaled pool of one-node slices, here 0..1.
    (xpk, Google's TPU cluster tool, creates its autoscaled TPU pools the same way:
    --num-nodes=0 --enable-autoscaling --max-nodes=<VMs per slice>.) The cluster autoscaler
    scales a pool up when a Pending LWS group's pods fit it, which is what the HPA causes.
    """
    return tuple(
        SlicePool(
            role=role,
            replica=replica,
            node_count=hosts_per_slice if replica < scaling.replicas else 0,
            autoscaling=None if replica < scaling.replicas else NodeRange(min_nodes=0, max_nodes=hosts_per_slice),
        )
        for replica in range(scaling.max_replicas)
        for role in roles
    )


# ---------------------------------------------------------------------------------------------
# What the HPA decides.


@dataclasses.dataclass(frozen=True)
class ScaleDecision:
    """One HPA evaluation of a Pods metric with an AverageValue target."""

    average: float  # the metric averaged over the pods that report it
    ratio: float  # average / target
    within_tolerance: bool  # |1 - ratio| <= tolerance: the HPA keeps the current count
    desired: int  # replicas the HPA sets, after the tolerance, the scale-up limit and min/max


def hpa_desired_replicas(
    per_pod: Sequence[float], target: float, *, min_replicas: int, max_replicas: int, tolerance: float = HPA_TOLERANCE
) -> ScaleDecision:
    """desired = ceil(pods x average / target), as the HPA computes it for a `type: Pods` metric
    with `target.averageValue` (the metric of `horizontal_pod_autoscaler`):

    - the metric is averaged over the pods (here: one value per LeaderWorkerSet leader, the pods
      the LWS scale subresource selects), and the current count is the number of pods reporting;
    - within the tolerance of the target (|1 - average/target| <= 0.1) nothing changes;
    - one step grows by at most max(100 %, 4 pods); the result is clamped to [min, max].

    Not modelled: pods that are not ready or report no value (the HPA then assumes 0 on a
    scale-up and the target on a scale-down), and the scale-down stabilization window (the HPA
    uses the highest recommendation of the window, `scale_down_stabilization_seconds`).
    """
    if not per_pod:
        raise ValueError("per_pod: the HPA needs a value from at least one pod")
    if not target > 0:
        raise ValueError(f"target must be > 0, got {target}")
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"need 1 <= min_replicas ({min_replicas}) <= max_replicas ({max_replicas})")
    current = len(per_pod)
    average = sum(per_pod) / current
    ratio = average / target
    within = abs(1.0 - ratio) <= tolerance
    desired = current if within else math.ceil(ratio * current)
    scale_up_limit = max(current * (100 + HPA_SCALE_UP_PERCENT) // 100, current + HPA_SCALE_UP_PODS)
    desired = min(desired, scale_up_limit)
    return ScaleDecision(average, ratio, within, max(min_replicas, min(desired, max_replicas)))


# ---------------------------------------------------------------------------------------------
# Where the metrics come from.


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsEndpoint:
    """Where a runtime's leaders serve their gauges (`ServerRuntime.metrics_endpoint`)."""

    port: int
    path: str


# ---------------------------------------------------------------------------------------------
# The metrics adapter: installed from its pinned production manifest, read-only on Monitoring.

ADAPTER_NAMESPACE = "custom-metrics"
ADAPTER_SERVICE_ACCOUNT = "custom-metrics-stackdriver-adapter"
# GoogleCloudPlatform/k8s-stackdriver at the commit that moved the manifest to the adapter image
# v0.16.9-gke.0 (the cm-sd-adapter-v0.16.9 tag still names v0.16.7); GKE's docs apply it from master.
ADAPTER_COMMIT = "af49d863755c0535f598cfde9288ae9a75251d38"
ADAPTER_MANIFEST_URL = (
    "https://raw.githubusercontent.com/GoogleCloudPlatform/k8s-stackdriver/"
    f"{ADAPTER_COMMIT}/custom-metrics-stackdriver-adapter/deploy/production/adapter_new_resource_model.yaml"
)
ADAPTER_ROLE = "roles/monitoring.viewer"  # read time series; nothing else


def adapter_principal(project_id: str, project_number: str) -> str:
    """The adapter's Kubernetes service account as an IAM principal (Workload Identity Federation)."""
    return (
        f"principal://iam.googleapis.com/projects/{project_number}/locations/global/workloadIdentityPools/"
        f"{project_id}.svc.id.goog/subject/ns/{ADAPTER_NAMESPACE}/sa/{ADAPTER_SERVICE_ACCOUNT}"
    )


# ---------------------------------------------------------------------------------------------
# Manifests.

POD_MONITORING_API_VERSION = "monitoring.googleapis.com/v1"
SCRAPE_INTERVAL = "15s"  # GKE's JetStream example; also the HPA's default sync period
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
# Kubernetes' default scale-down window, and the most autoscaling/v2 allows.
MIN_SCALE_DOWN_WINDOW_SECONDS = 300
MAX_SCALE_DOWN_WINDOW_SECONDS = 3600


def leader_pod_labels(lws_name: str) -> dict[str, str]:
    """The labels LWS puts on every group's leader: the pods its hpaPodSelector selects."""
    return {LWS_NAME_LABEL: lws_name, LWS_WORKER_INDEX_LABEL: "0"}


def scale_down_stabilization_seconds(startup_delay_seconds: int) -> int:
    """How long the load must stay low before the HPA removes a replica.

    A removed replica costs a new slice and its warm-up (the startup probe's delay, i.e. the
    checkpoint restore) when load returns, and a new replica only reports useful metrics after
    that warm-up; keeping every decision for two warm-ups means a dip shorter than the time a
    replica needs to come back never removes one. At least Kubernetes' default 300 s, at most the
    API's 3600 s (llama2-7b: 300, llama2-70b: 480, llama3.1-405b: 1800).
    """
    return min(MAX_SCALE_DOWN_WINDOW_SECONDS, max(MIN_SCALE_DOWN_WINDOW_SECONDS, 2 * startup_delay_seconds))


def pod_monitoring(*, namespace: str, lws_name: str, endpoint: MetricsEndpoint) -> dict:
    """Managed Prometheus scrapes each replica's leader, the only pod that serves (and counts)."""
    return {
        "apiVersion": POD_MONITORING_API_VERSION,
        "kind": "PodMonitoring",
        "metadata": {"name": lws_name, "namespace": namespace},
        # targetLabels left at the CRD default, which includes `pod`: the adapter matches series to pods by it.
        "spec": {
            "selector": {"matchLabels": leader_pod_labels(lws_name)},
            "endpoints": [{"port": endpoint.port, "path": endpoint.path, "interval": SCRAPE_INTERVAL}],
        },
    }


def horizontal_pod_autoscaler(
    scaling: Autoscaling, *, namespace: str, lws_name: str, startup_delay_seconds: int
) -> dict:
    """The one HPA: the LeaderWorkerSet by name, between replicas and maxReplicas, on the leaders' average."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": lws_name, "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": lws_model.API_VERSION, "kind": lws_model.KIND, "name": lws_name},
            "minReplicas": scaling.replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": scaling.metric.adapter_metric},
                        "target": {"type": "AverageValue", "averageValue": scaling.target_quantity},
                    },
                }
            ],
            "behavior": {
                "scaleDown": {"stabilizationWindowSeconds": scale_down_stabilization_seconds(startup_delay_seconds)}
            },
        },
    }


def autoscaling_manifests(
    scaling: Autoscaling, *, namespace: str, lws_name: str, endpoint: MetricsEndpoint, startup_delay_seconds: int
) -> list[dict]:
    """The PodMonitoring and the HPA in apply order; nothing when autoscaling is off."""
    if not scaling.enabled:
        return []
    return [
        pod_monitoring(namespace=namespace, lws_name=lws_name, endpoint=endpoint),
        horizontal_pod_autoscaler(
            scaling, namespace=namespace, lws_name=lws_name, startup_delay_seconds=startup_delay_seconds
        ),
    ]
