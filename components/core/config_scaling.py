"""The replica and autoscaling config keys, and their parsing into `autoscaling.Autoscaling`.

Values arrive as strings; 0 and "" mean "derived", as elsewhere in the stack. The keys join the
stack's key table (`config_table.CONFIG_KEYS`); `parse_autoscaling` reads only its own four.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from components.core.autoscaling import DEFAULT_METRIC, METRICS, Autoscaling, ScalingMetric
from components.core.config_keys import ConfigKey, is_set, read_choice, read_integer, read_text
from components.core.errors import ConfigError
from components.core.hpa import HPA_TOLERANCE

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
