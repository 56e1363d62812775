"""Replica and autoscaling keys: parsing, refusals naming the key, capacity and node pools per replica."""

from __future__ import annotations

import pytest

from components.core import config_scaling, hpa, node_pools
from components.core.autoscaling import METRICS
from components.core.config_keys import ConfigKey
from components.core.config_scaling import parse_autoscaling
from components.core.config_table import CONFIG_KEYS
from components.core.errors import ConfigError
from components.core.node_pools import node_pool_name, slice_pools, tpu_node_pools
from components.core.planner import replica_summary
from tests.stack.stack_helpers import example


def test_defaults_are_one_fixed_replica_on_the_backlog_metric():
    scaling = parse_autoscaling({})
    assert (scaling.replicas, scaling.max_replicas, scaling.enabled) == (1, 1, False)
    assert scaling.metric is METRICS["prefill-backlog"]
    assert scaling.target == 10


def test_keys_are_the_contract_names_and_in_the_stacks_table_once():
    assert [key.name for key in config_scaling.CONFIG_KEYS] == [
        "replicas",
        "maxReplicas",
        "autoscalingMetric",
        "autoscalingTarget",
    ]
    assert all(isinstance(key, ConfigKey) and key.default is not None for key in config_scaling.CONFIG_KEYS)
    names = [key.name for key in CONFIG_KEYS]
    assert all(names.count(key.name) == 1 for key in config_scaling.CONFIG_KEYS)


def test_max_replicas_defaults_to_replicas():
    scaling = parse_autoscaling({"replicas": "3"})
    assert (scaling.replicas, scaling.max_replicas, scaling.enabled) == (3, 3, False)


def test_a_larger_max_replicas_turns_autoscaling_on():
    scaling = parse_autoscaling({"replicas": "1", "maxReplicas": "3"})
    assert (scaling.replicas, scaling.max_replicas, scaling.enabled) == (1, 3, True)


@pytest.mark.parametrize(
    ("metric", "target", "quantity"),
    [
        ("prefill-backlog", "", "10"),
        ("prefill-backlog", "2.5", "2500m"),
        ("slots-used", "", "800m"),
        ("slots-used", "0.9", "900m"),
    ],
)
def test_targets_default_per_metric_and_render_as_quantities(metric, target, quantity):
    raw = {"maxReplicas": "2", "autoscalingMetric": metric, **({"autoscalingTarget": target} if target else {})}
    assert parse_autoscaling(raw).target_quantity == quantity


REFUSALS = [
    ({"replicas": "0"}, ("replicas",), "outside 1..100"),
    ({"replicas": "two"}, ("replicas",), "expected an integer"),
    ({"replicas": "1.5"}, ("replicas",), "expected an integer"),
    ({"replicas": "3", "maxReplicas": "2"}, ("maxReplicas", "replicas"), "smaller than replicas 3"),
    ({"maxReplicas": "101"}, ("maxReplicas",), "above 100"),
    (
        {"maxReplicas": "3", "autoscalingMetric": "cpu"},
        ("autoscalingMetric",),
        "not one of prefill-backlog, slots-used",
    ),
    ({"maxReplicas": "3", "autoscalingTarget": "many"}, ("autoscalingTarget",), "not a positive number"),
    ({"maxReplicas": "3", "autoscalingTarget": "0"}, ("autoscalingTarget",), "not a positive number"),
    ({"maxReplicas": "3", "autoscalingTarget": "-4"}, ("autoscalingTarget",), "not a positive number"),
    ({"maxReplicas": "3", "autoscalingTarget": "inf"}, ("autoscalingTarget",), "not a positive number"),
    (
        {"maxReplicas": "3", "autoscalingMetric": "slots-used", "autoscalingTarget": "1.5"},
        ("autoscalingTarget", "autoscalingMetric"),
        "cannot be met",
    ),
    (
        {"maxReplicas": "3", "autoscalingMetric": "slots-used", "autoscalingTarget": "1"},
        ("autoscalingTarget", "autoscalingMetric"),
        "cannot be met",
    ),
    (
        {"maxReplicas": "3", "autoscalingMetric": "slots-used", "autoscalingTarget": "0.95"},
        ("autoscalingTarget", "autoscalingMetric"),
        "below 0.909",
    ),
    ({"autoscalingTarget": "5"}, ("autoscalingTarget", "maxReplicas"), "autoscaling is off"),
    (
        {"replicas": "2", "autoscalingMetric": "slots-used"},
        ("autoscalingMetric", "maxReplicas"),
        "maxReplicas = replicas = 2",
    ),
]


def test_the_defaults_pulumi_fills_in_are_not_taken_as_set():
    """Pulumi hands the program every declared key, defaults included: only other values count."""
    defaults = {key.name: key.default_text for key in config_scaling.CONFIG_KEYS}
    assert parse_autoscaling(defaults).enabled is False
    assert parse_autoscaling({**defaults, "maxReplicas": "2", "autoscalingTarget": "4"}).target == 4


@pytest.mark.parametrize(("raw", "keys", "problem"), REFUSALS)
def test_bad_values_are_refused_naming_the_key(raw, keys, problem):
    with pytest.raises(ConfigError) as raised:
        parse_autoscaling(raw)
    assert raised.value.keys == keys
    assert problem in raised.value.problem
    assert raised.value.suggestion


def test_the_slots_used_bound_follows_the_hpa_tolerance():
    # The gauge cannot exceed 1.0; the HPA scales up only when average/target > 1 + tolerance.
    highest = METRICS["slots-used"].highest_target
    assert highest == pytest.approx(1 / 1.1)
    assert (
        parse_autoscaling({"maxReplicas": "2", "autoscalingMetric": "slots-used", "autoscalingTarget": "0.9"}).target
        == 0.9
    )
    assert METRICS["prefill-backlog"].highest_target is None
    assert parse_autoscaling({"maxReplicas": "2", "autoscalingTarget": "500"}).target == 500


def test_other_stack_keys_are_ignored():
    assert parse_autoscaling({"model": "llama3.1-8b", "maxReplicas": "2"}).max_replicas == 2


# ---------------------------------------------------------------------------------------------
# Capacity.


def summary(stack: str, raw: dict[str, str]) -> dict | None:
    cfg, _ = example(stack)
    return replica_summary(
        parse_autoscaling(raw),
        tpu_slice=cfg.tpu_slice,
        roles=cfg.slice_roles,
        startup_delay_seconds=cfg.startup_probe_delay_seconds,
    )


def test_capacity_for_min_and_max_replicas_interleaved():
    # llama3.1-405b on a v6e-16: 16 chips on 4 hosts per replica.
    assert summary("llama3-405b-v6e16", {"replicas": "1", "maxReplicas": "3"}) == {
        "min": {"replicas": 1, "slices": 1, "chips": 16, "hosts": 4},
        "max": {"replicas": 3, "slices": 3, "chips": 48, "hosts": 12},
        "autoscaling": {
            "metric": "jetstream_prefill_backlog_size",
            "target": "10",
            "scaleDownStabilizationSeconds": 1800,
        },
    }


def test_capacity_for_min_and_max_replicas_disaggregated():
    # llama2-70b: a prefill and a generate v6e-8 of 2 hosts each per replica.
    assert summary("llama2-70b-disagg", {"replicas": "2", "maxReplicas": "4", "autoscalingMetric": "slots-used"}) == {
        "min": {"replicas": 2, "slices": 4, "chips": 32, "hosts": 8},
        "max": {"replicas": 4, "slices": 8, "chips": 64, "hosts": 16},
        "autoscaling": {
            "metric": "jetstream_slots_used_percentage",
            "target": "800m",
            "scaleDownStabilizationSeconds": 480,
        },
    }


def test_fixed_replicas_report_capacity_without_autoscaling():
    assert summary("llama3-8b-v6e8", {"replicas": "2"}) == {
        "min": {"replicas": 2, "slices": 2, "chips": 16, "hosts": 2},
        "max": {"replicas": 2, "slices": 2, "chips": 16, "hosts": 2},
    }


@pytest.mark.parametrize("stack", ["llama3-405b-v6e16", "llama2-70b-disagg", "llama3-8b-v6e8"])
def test_default_config_adds_nothing_to_the_plan(stack):
    assert summary(stack, {}) is None


@pytest.mark.parametrize(
    ("startup", "window"), [(0, 300), (60, 300), (150, 300), (240, 480), (900, 1800), (1800, 3600), (7200, 3600)]
)
def test_scale_down_window_is_two_warm_ups_within_the_api_bounds(startup, window):
    assert hpa.scale_down_stabilization_seconds(startup) == window


# ---------------------------------------------------------------------------------------------
# Node pools.


def pools(stack: str, raw: dict[str, str]):
    cfg, plan = example(stack)
    return cfg, slice_pools(parse_autoscaling(raw), roles=cfg.slice_roles, hosts_per_slice=plan.hosts_per_slice)


# The pool names of the example stacks before replicas existed: a default stack keeps them.
TODAYS_POOLS = {
    "llama3-405b-v6e16": ["v6e-16-serving-llama3-405b-v6e16"],
    "llama2-70b-disagg": ["v6e-8-prefill-llama2-70b-disagg", "v6e-8-generate-llama2-70b-disagg"],
    "llama3-8b-v6e8": ["v6e-8-serving-llama3-8b-v6e8"],
}


@pytest.mark.parametrize("stack", list(TODAYS_POOLS))
def test_default_pools_are_todays_pools(stack):
    cfg, planned = pools(stack, {})
    assert (
        [node_pool_name(cfg, pool.role, pool.replica) for pool in planned]
        == [spec.name for spec in tpu_node_pools(cfg)]
        == TODAYS_POOLS[stack]
    )
    assert [(pool.node_count, pool.autoscaling) for pool in planned] == [(cfg.tpu_slice.hosts, None)] * len(planned)


def test_multi_host_replicas_above_the_minimum_scale_their_whole_slice_from_zero():
    cfg, planned = pools("llama3-405b-v6e16", {"replicas": "1", "maxReplicas": "3"})
    assert [
        (node_pool_name(cfg, pool.role, pool.replica), pool.replica, pool.node_count, pool.autoscaling)
        for pool in planned
    ] == [
        ("v6e-16-serving-llama3-405b-v6e16", 0, 4, None),
        ("v6e-16-serving-r1-llama3-405b-v6e16", 1, 0, node_pools.NodeRange(min_nodes=0, max_nodes=4)),
        ("v6e-16-serving-r2-llama3-405b-v6e16", 2, 0, node_pools.NodeRange(min_nodes=0, max_nodes=4)),
    ]


def test_disaggregated_replicas_get_a_pool_per_role():
    cfg, planned = pools("llama2-70b-disagg", {"replicas": "2", "maxReplicas": "3"})
    names = [node_pool_name(cfg, pool.role, pool.replica).removesuffix("-llama2-70b-disagg") for pool in planned]
    assert names == [
        "v6e-8-prefill",
        "v6e-8-generate",
        "v6e-8-prefill-r1",
        "v6e-8-generate-r1",
        "v6e-8-prefill-r2",
        "v6e-8-generate-r2",
    ]
    assert [pool.autoscaling is None for pool in planned] == [True, True, True, True, False, False]
    assert {pool.node_count for pool in planned if pool.autoscaling is None} == {2}


def test_single_host_replicas_scale_one_node_each():
    _, planned = pools("llama3-8b-v6e8", {"maxReplicas": "2"})
    assert [(pool.node_count, pool.autoscaling) for pool in planned] == [
        (1, None),
        (0, node_pools.NodeRange(min_nodes=0, max_nodes=1)),
    ]


def test_fixed_replicas_get_fixed_pools():
    _, planned = pools("llama3-405b-v6e16", {"replicas": "3"})
    assert [(pool.replica, pool.node_count, pool.autoscaling) for pool in planned] == [
        (0, 4, None),
        (1, 4, None),
        (2, 4, None),
    ]
