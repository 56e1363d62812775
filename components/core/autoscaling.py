"""Replicas and autoscaling on the server's own metrics: the metrics, the settings, the adapter.

The feature is split by layer like the rest of the core: this module holds what the layers
share (the gauges `autoscalingMetric` names, the typed `Autoscaling` settings, where a runtime
serves its metrics, the metrics adapter's pinned manifest and identity). The keys are parsed in
`config_scaling.py`; the HPA's arithmetic is `hpa.py`; the capacity of every replica is planned
in `planner.replica_summary` and `node_pools.slice_pools`; the PodMonitoring and the
HorizontalPodAutoscaler are built in `manifests.py`. `components.resources.autoscaling` wraps
them (and installs the metrics adapter with its own identity). With `maxReplicas` equal to
`replicas` (the default) nothing adds an object, a flag or a summary line.

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

from components.core.hpa import HPA_TOLERANCE

# ---------------------------------------------------------------------------------------------
# The metrics. `autoscalingMetric` names what a gauge counts; each runtime maps the name to its
# server's gauge (`ServerRuntime.scaling_metrics`). METRICS are JetStream's orchestrator gauges
# (jetstream/core/metrics/prometheus.py), which the bundled server exports under the same names and
# units (serving/server/metrics.py); vLLM's are in components/core/runtimes/vllm.py.


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
