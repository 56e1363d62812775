"""The scheduling check: every pod placed as LWS v0.10.0 and GKE would, or the plan is refused."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import pulumi
import pytest

from components.core import lws_model, manifests, models, scheduling, tpu
from components.core.config import parse_stack_config
from components.core.config_table import MODES, SERVER_RUNTIMES
from components.core.errors import ConfigError
from components.core.node_pools import system_node_pool, tpu_node_pools
from components.core.planner import plan_deployment
from tests.stack.pulumi_harness import GCP_PROJECT, qualified, run_stack
from tests.stack.stack_helpers import config


def _raw(model: str, row: tpu.TpuSlice, mode: str, runtime: str) -> dict[str, str]:
    raw = {
        "model": model,
        "topology": row.topology,
        "tpuMachineType": row.machine_type,
        "mode": mode,
        "serverRuntime": runtime,
        "checkpointPath": "gs://test-checkpoints/m/model.npz",
    }
    return raw | ({"bundledServerImage": "registry.example/jetstream-jax:0.1.0"} if runtime == "bundled" else {})


def _accepted_and_refused():
    accepted, refused = [], []
    for model, row, mode, runtime in itertools.product(models.PRESETS, tpu.SLICES, MODES, SERVER_RUNTIMES):
        case = (model, row, mode, runtime)
        try:
            cfg = parse_stack_config(_raw(*case), project=GCP_PROJECT, stack="test")
            accepted.append((case, cfg, plan_deployment(cfg)))
        except ConfigError:
            refused.append(case)
    return accepted, refused


ACCEPTED, REFUSED = _accepted_and_refused()


def _replaced(obj: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """`obj` with the field at `path` (attribute names, tuple indices, mapping keys) set to `value`."""
    if not path:
        return value
    head, *rest = path
    if isinstance(head, int):
        return tuple(_replaced(item, tuple(rest), value) if index == head else item for index, item in enumerate(obj))
    if isinstance(obj, Mapping):
        return {**obj, head: _replaced(obj[head], tuple(rest), value)}
    return dataclasses.replace(obj, **{head: _replaced(getattr(obj, head), tuple(rest), value)})


TEMPLATE = ("spec", "leader_worker_template")


def _id(case) -> str:
    model, row, mode, runtime = case
    return f"{model}-{row.topology}-{row.machine_type.removeprefix('ct6e-standard-')}-{mode}-{runtime}"


def test_the_planner_accepts_most_combinations():
    assert len(ACCEPTED) + len(REFUSED) == len(models.PRESETS) * len(tpu.SLICES) * len(MODES) * len(SERVER_RUNTIMES)
    assert len(ACCEPTED) >= 100  # every refusal is the planner's (HBM, heads) or bundled+disaggregated


@pytest.mark.parametrize("case, cfg, plan", ACCEPTED, ids=[_id(case) for case, _, _ in ACCEPTED])
def test_every_accepted_combination_can_be_scheduled(case, cfg, plan):
    placement = scheduling.check_deployment(cfg, plan)
    assert len(placement) == manifests.leader_worker_set(cfg, plan).spec.leader_worker_template.size
    tpu_nodes = {name for name, node in placement.items() if not node.startswith("system")}
    assert tpu_nodes == set(placement)  # every pod of the workload is on the stack's TPU nodes


def _single_host_disaggregated():
    cfg = config(model="llama3.1-8b", topology="2x4", tpuMachineType="ct6e-standard-8t", mode="disaggregated")
    plan = plan_deployment(cfg)
    return cfg, plan, (system_node_pool(cfg), *tpu_node_pools(cfg))


def test_single_host_disaggregated_places_one_worker_per_slice():
    """8.8: size 3, subGroupSize 1, LeaderExcluded: workers 1 and 2 are subgroups 1 and 2."""
    cfg, plan, pools = _single_host_disaggregated()
    lws = manifests.leader_worker_set(cfg, plan)
    assert lws.spec.leader_worker_template.sub_group_policy == lws_model.SubGroupPolicy(
        sub_group_policy_type="LeaderExcluded", sub_group_size=1
    )
    placement = scheduling.place(lws, pools)
    worker_pools = {
        placement["jetstream-pathways-0-1"].rsplit("-", 1)[0],
        placement["jetstream-pathways-0-2"].rsplit("-", 1)[0],
    }
    assert worker_pools == {"v6e-8-prefill-test", "v6e-8-generate-test"}


def test_the_old_single_host_disaggregated_layout_is_refused():
    """8.8/8.9: without LeaderExcluded the leader is subgroup 0 and the workers 1 and 2: three
    exclusive subgroups for two node pools, so one worker would stay Pending forever."""
    cfg, plan, pools = _single_host_disaggregated()
    policy_type = (*TEMPLATE, "sub_group_policy", "sub_group_policy_type")
    lws = _replaced(manifests.leader_worker_set(cfg, plan), policy_type, None)
    with pytest.raises(scheduling.SchedulingError) as refused:
        scheduling.place(lws, pools)
    message = str(refused.value)
    assert "jetstream-pathways-0-2" in message and "subgroup 2" in message and "Pending forever" in message
    assert {"mode", "topology", "tpuMachineType"} <= set(refused.value.keys)


def test_preview_refuses_a_layout_that_cannot_be_scheduled_before_any_resource(monkeypatch):
    original = manifests._sub_group_policy
    monkeypatch.setattr(
        manifests,
        "_sub_group_policy",
        lambda cfg, plan: (
            None
            if original(cfg, plan) is None
            else dataclasses.replace(original(cfg, plan), sub_group_policy_type=None)
        ),
    )
    raw = {
        "model": "llama3.1-8b",
        "topology": "2x4",
        "tpuMachineType": "ct6e-standard-8t",
        "mode": "disaggregated",
        "checkpointPath": "gs://test-checkpoints/m/0/items",
    }
    recording = run_stack({"gcp:project": GCP_PROJECT, **qualified(raw)}, expect_error=True)
    assert isinstance(recording.error, pulumi.RunError) and "Pending forever" in str(recording.error)
    assert recording.resources == []


@pytest.mark.parametrize(
    "size, sub_group_size, leader_excluded, subgroups",
    [
        (5, 2, False, [0, 0, 0, 1, 1]),  # disaggregated reference, 2 x v6e-8: the leader joins subgroup 0
        (5, 2, True, [None, 0, 0, 1, 1]),
        (3, 1, False, [0, 1, 2]),  # size % 1 == 0: worker i is subgroup i
        (3, 1, True, [None, 1, 2]),
        (4, 2, False, [0, 0, 1, 1]),  # size divisible: the leader counts as a member
    ],
)
def test_subgroups_are_assigned_as_lws_v0_10_0_does(size, sub_group_size, leader_excluded, subgroups):
    assert [scheduling.subgroup_of(index, size, sub_group_size, leader_excluded) for index in range(size)] == subgroups


def _pathways_405b():
    cfg = config(model="llama3.1-405b", topology="4x4")
    plan = plan_deployment(cfg)
    return manifests.leader_worker_set(cfg, plan), [system_node_pool(cfg), *tpu_node_pools(cfg)]


def test_a_pod_without_the_tpu_toleration_is_refused():
    lws, pools = _pathways_405b()
    lws = _replaced(lws, (*TEMPLATE, "worker_template", "spec", "tolerations"), None)
    with pytest.raises(scheduling.SchedulingError) as refused:
        scheduling.place(lws, pools)
    assert "google.com/tpu=present:NoSchedule not tolerated" in str(refused.value)


def test_a_node_selector_no_pool_matches_is_refused():
    lws, pools = _pathways_405b()
    selector = (*TEMPLATE, "leader_template", "spec", "node_selector", "cloud.google.com/gke-tpu-topology")
    lws = _replaced(lws, selector, "8x8")
    with pytest.raises(scheduling.SchedulingError) as refused:
        scheduling.place(lws, pools)
    assert "no label cloud.google.com/gke-tpu-topology=8x8" in str(refused.value) and "topology" in refused.value.keys


def test_more_chips_than_a_host_has_are_refused():
    lws, pools = _pathways_405b()
    limit = (*TEMPLATE, "worker_template", "spec", "containers", 0, "resources", "limits", "google.com/tpu")
    lws = _replaced(lws, limit, "8")
    with pytest.raises(scheduling.SchedulingError) as refused:
        scheduling.place(lws, pools)
    assert "8 google.com/tpu requested, 4 free" in str(refused.value)


def test_another_stacks_pools_are_never_used():
    lws, pools = _pathways_405b()
    foreign = [
        dataclasses.replace(
            pool, name=f"other-{pool.name}", labels={**pool.labels, "jetstream-tpu/deployment": "jetstream-other"}
        )
        for pool in pools[1:]
    ]
    with pytest.raises(scheduling.SchedulingError):
        scheduling.place(lws, [pools[0], *foreign])
    assert set(scheduling.place(lws, [pools[0], *foreign, *pools[1:]]).values()) <= {
        f"{pool.name}-{i}" for pool in pools[1:] for i in range(4)
    }


def test_each_replica_needs_its_own_slice():
    """Written for replicas: N groups need N exclusive slices (one node pool each)."""
    lws, pools = _pathways_405b()
    two = _replaced(lws, ("spec", "replicas"), 2)
    with pytest.raises(scheduling.SchedulingError) as refused:
        scheduling.place(two, pools)
    assert "jetstream-pathways-1" in str(refused.value) and "taken by group 0" in str(refused.value)
    second_slice = dataclasses.replace(pools[1], name=f"{pools[1].name}-r1")
    placement = scheduling.place(two, [*pools, second_slice])
    groups = {node.rsplit("-", 1)[0] for name, node in placement.items() if name.startswith("jetstream-pathways-1")}
    assert len(groups) == 1 and groups != {
        node.rsplit("-", 1)[0] for name, node in placement.items() if name.startswith("jetstream-pathways-0")
    }


@pytest.mark.parametrize("mode, topology", [("interleaved", "4x4"), ("disaggregated", "2x4")])
def test_autoscaling_is_checked_at_min_and_at_max_replicas(mode, topology):
    """At maxReplicas every group lands on its own slice, once the cluster autoscaler has grown the
    empty pools: the check places all groups on the pools at full size."""
    cfg = config(
        model="llama2-70b", topology=topology, mode=mode, replicas="2", maxReplicas="3", tensorParallelism="-1"
    )
    plan = plan_deployment(cfg)
    placement = scheduling.check_deployment(cfg, plan)
    size = manifests.leader_worker_set(cfg, plan).spec.leader_worker_template.size
    assert len(placement) == 3 * size
    # The TPU workers of different groups never share a pool (the Pathways leader holds no TPU).
    pools_by_group = {
        group: {
            node.rsplit("-", 1)[0]
            for name, node in placement.items()
            if name.startswith(f"jetstream-pathways-{group}-")
        }
        for group in range(3)
    }
    assert all(pools_by_group[a].isdisjoint(pools_by_group[b]) for a, b in itertools.combinations(range(3), 2))
    # The third group only fits once its empty pools have grown: as created, there is no slice for it.
    lws = manifests.leader_worker_set(cfg, plan)
    with pytest.raises(scheduling.SchedulingError):
        scheduling.place(_replaced(lws, ("spec", "replicas"), 3), [system_node_pool(cfg), *tpu_node_pools(cfg)])
