"""The Horizontal Pod Autoscaler as this stack models it: when it scales, by how much, how slowly down.

Pure arithmetic, imports nothing of the project: the metric table (`autoscaling.py`) bounds its
targets by the tolerance, the planner and the HPA manifest take the scale-down window, and the
server's tests drive `hpa_desired_replicas` with the gauges a real server reports.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# The HPA, as this stack models it (https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/
# #algorithm-details; kubernetes pkg/controller/podautoscaler/replica_calculator.go, calcPlainMetricReplicas).
# It skips a scaling step while |1 - average/target| <= 0.1 (kube-controller-manager
# --horizontal-pod-autoscaler-tolerance, default 0.1; per-HPA tolerance is an alpha feature).
HPA_TOLERANCE = 0.1
# The default scale-up behaviour: per period, add at most 100% of the current pods or 4 pods,
# whichever is more (spec.behavior.scaleUp default policies, selectPolicy Max).
HPA_SCALE_UP_PERCENT = 100
HPA_SCALE_UP_PODS = 4

# Kubernetes' default scale-down window, and the most autoscaling/v2 allows.
MIN_SCALE_DOWN_WINDOW_SECONDS = 300
MAX_SCALE_DOWN_WINDOW_SECONDS = 3600


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


def scale_down_stabilization_seconds(startup_delay_seconds: int) -> int:
    """How long the load must stay low before the HPA removes a replica.

    A removed replica costs a new slice and its warm-up (the startup probe's delay, i.e. the
    checkpoint restore) when load returns, and a new replica only reports useful metrics after
    that warm-up; keeping every decision for two warm-ups means a dip shorter than the time a
    replica needs to come back never removes one. At least Kubernetes' default 300 s, at most the
    API's 3600 s (llama2-7b: 300, llama2-70b: 480, llama3.1-405b: 1800).
    """
    return min(MAX_SCALE_DOWN_WINDOW_SECONDS, max(MIN_SCALE_DOWN_WINDOW_SECONDS, 2 * startup_delay_seconds))
