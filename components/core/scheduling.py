"""The scheduling check: can every pod of the LeaderWorkerSet be placed on the stack's nodes?

A LeaderWorkerSet that cannot be placed is accepted by the API server and stays Pending forever,
which only shows once a TPU slice is paid for. This module places every pod the way LWS v0.10.0
and the Kubernetes scheduler on GKE would, from the typed LeaderWorkerSet (`lws_model`) and the
node pool specs, and refuses the plan (ConfigError naming the keys) when a pod fits no node.

What LWS v0.10.0 does (kubernetes-sigs/lws at v0.10.0):
  * pods: per group g (spec.replicas groups), the leader `<lws>-<g>` and workers `<lws>-<g>-<i>`,
    i = 1..size-1; leaders first, a group's workers once its leader is placed (pod_controller.go);
  * subgroups (pkg/webhooks/pod_webhook.go, getSubGroupIndex): the leader is subgroup 0 unless
    subGroupPolicyType is LeaderExcluded; worker i is subgroup (i-1) // subGroupSize when
    (size-1) % subGroupSize == 0 and size % subGroupSize != 0, else i // subGroupSize;
  * exclusive-topology: the leader gets a required pod affinity to its own group key and a
    required anti-affinity to every other group key on the annotation's topology key
    (SetExclusiveAffinities); its workers get a node selector for the leader's domain;
  * subgroup-exclusive-topology: the same affinity pair on the subgroup key, for every pod that
    has a subgroup.
What GKE and the scheduler do: a TPU node carries its pool, accelerator and topology labels,
the google.com/tpu=present:NoSchedule taint and its chips as google.com/tpu capacity
(node_pools.py); a pod needs every node-selector label, a toleration for every NoSchedule taint,
its google.com/tpu request free on the node, and the pod (anti-)affinities above, including the
anti-affinities of pods already placed (they are symmetric).

The search tries every distinct node for each pod in creation order, so it proves that a
placement exists; nodes in the same state are tried once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

from components.core import lws_model, manifests, tpu
from components.core.config import StackConfig
from components.core.errors import ConfigError
from components.core.node_pools import (
    NodePoolSpec,
    at_full_size,
    gke_node_labels,
    gke_node_taints,
    system_node_pool,
    tpu_node_pools,
)
from components.core.planner import Plan

# Placements tried before the search gives up (and refuses with the deepest pod it could not
# place); a schedulable layout needs about one per pod, since equivalent nodes are tried once.
SEARCH_BUDGET = 100_000
GROUP_KEY = "group"
SUBGROUP_KEY = "subgroup"
# The config keys that shape each kind of constraint, named by the refusal.
KEYS_BY_REASON = {
    "node selector": ("topology", "tpuMachineType"),
    "taint": ("serverRuntime",),
    "tpu": ("topology", "tpuMachineType"),
    "exclusive topology": ("mode", "topology", "tpuMachineType"),
}


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    pool: str
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, str], ...]
    tpu_capacity: int


@dataclasses.dataclass(frozen=True)
class Term:
    """A required pod (anti-)affinity on `key` (GROUP_KEY or SUBGROUP_KEY) over `topology_key`:
    affinity: some pod with the same `value` in the domain; anti: no pod with another value."""

    key: str
    value: str
    topology_key: str


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    group: int
    worker_index: int
    subgroup: int | None
    node_selector: Mapping[str, str]
    tolerations: tuple[lws_model.Toleration, ...]
    tpu_request: int
    affinity: tuple[Term, ...]
    anti_affinity: tuple[Term, ...]

    @staticmethod
    def describe(key: str, value: str) -> str:
        """A group or subgroup key for people: "group 0", "subgroup 1 of group 0"."""
        if key == GROUP_KEY:
            return f"group {value}"
        group, subgroup = value.split("/")
        return f"subgroup {subgroup} of group {group}"

    @property
    def keys(self) -> dict[str, str]:
        """The LWS labels the affinity terms select on."""
        keys = {GROUP_KEY: str(self.group)}
        if self.subgroup is not None:
            keys[SUBGROUP_KEY] = f"{self.group}/{self.subgroup}"
        return keys


class SchedulingError(ConfigError):
    """A pod of the LeaderWorkerSet fits no node: it would stay Pending forever."""


# ---------------------------------------------------------------------------------------------
# Nodes and pods.


def cluster_nodes(pools: Sequence[NodePoolSpec]) -> list[Node]:
    return [
        Node(
            name=f"{spec.name}-{index}",
            pool=spec.name,
            labels=gke_node_labels(spec),
            taints=gke_node_taints(spec),
            tpu_capacity=spec.tpu_chips_per_node,
        )
        for spec in pools
        for index in range(spec.node_count)
    ]


def subgroup_of(worker_index: int, size: int, sub_group_size: int, leader_excluded: bool) -> int | None:
    """LWS v0.10.0's subgroup of a pod (worker_index 0 is the leader)."""
    if worker_index == 0:
        return None if leader_excluded else 0
    if (size - 1) % sub_group_size == 0 and size % sub_group_size != 0:
        return (worker_index - 1) // sub_group_size
    return worker_index // sub_group_size


def _tpu_request(spec: lws_model.PodSpec) -> int:
    """A pod's effective google.com/tpu request: its containers' sum, or its largest init container."""

    def limit(container: lws_model.Container) -> int:
        limits = (container.resources.limits if container.resources else None) or {}
        return int(limits.get(tpu.TPU_RESOURCE, 0))

    return max(sum(map(limit, spec.containers)), *map(limit, spec.init_containers or ()), 0)


def _annotations(lws: lws_model.LeaderWorkerSet) -> Mapping[str, str]:
    return lws.metadata.annotations or {}


def lws_pods(lws: lws_model.LeaderWorkerSet) -> list[Pod]:
    """Every pod the LeaderWorkerSet creates, in creation order, with LWS's scheduling terms."""
    name, template = lws.metadata.name, lws.spec.leader_worker_template
    size = 1 if template.size is None else template.size
    policy = template.sub_group_policy
    group_domain = _annotations(lws).get(lws_model.EXCLUSIVE_TOPOLOGY)
    subgroup_domain = _annotations(lws).get(lws_model.SUBGROUP_EXCLUSIVE_TOPOLOGY)

    def pod(group: int, index: int) -> Pod:
        leads = index == 0 and template.leader_template is not None
        pod_spec = (template.leader_template if leads else template.worker_template).spec or lws_model.PodSpec()
        subgroup = None
        if policy is not None:
            excluded = policy.sub_group_policy_type == lws_model.LEADER_EXCLUDED
            subgroup = subgroup_of(index, size, policy.sub_group_size, excluded)
        affinity, anti = [], []
        if group_domain and index == 0:
            affinity.append(Term(GROUP_KEY, str(group), group_domain))
            anti.append(Term(GROUP_KEY, str(group), group_domain))
        if subgroup_domain and subgroup is not None:
            affinity.append(Term(SUBGROUP_KEY, f"{group}/{subgroup}", subgroup_domain))
            anti.append(Term(SUBGROUP_KEY, f"{group}/{subgroup}", subgroup_domain))
        return Pod(
            name=f"{name}-{group}" if index == 0 else f"{name}-{group}-{index}",
            group=group,
            worker_index=index,
            subgroup=subgroup,
            node_selector=pod_spec.node_selector or {},
            tolerations=tuple(pod_spec.tolerations or ()),
            tpu_request=_tpu_request(pod_spec),
            affinity=tuple(affinity),
            anti_affinity=tuple(anti),
        )

    groups = range(1 if lws.spec.replicas is None else lws.spec.replicas)
    return [pod(group, 0) for group in groups] + [pod(group, index) for group in groups for index in range(1, size)]


# ---------------------------------------------------------------------------------------------
# Feasibility of one pod on one node, given what is placed.


def _tolerates(tolerations: Sequence[lws_model.Toleration], taint: Mapping[str, str]) -> bool:
    return any(
        (toleration.key == taint["key"] or (not toleration.key and toleration.operator == "Exists"))
        and (toleration.operator == "Exists" or toleration.value == taint["value"])
        and toleration.effect in (None, "", taint["effect"])
        for toleration in tolerations
    )


@dataclasses.dataclass
class _State:
    nodes: list[Node]
    placed: dict[str, tuple[Pod, Node]] = dataclasses.field(default_factory=dict)
    free_tpu: dict[str, int] = dataclasses.field(default_factory=dict)

    def same_domain(self, node: Node, topology_key: str) -> Iterator[Pod]:
        value = node.labels.get(topology_key)
        for pod, where in self.placed.values():
            if value is not None and where.labels.get(topology_key) == value:
                yield pod


def _rejection(
    state: _State, pod: Pod, node: Node, group_domains: Mapping[int, tuple[str, str]]
) -> tuple[str, str] | None:
    """Why `pod` cannot go on `node` now: (reason, detail), or None if it can."""
    for key, value in pod.node_selector.items():
        if node.labels.get(key) != value:
            return "node selector", f"no label {key}={value}"
    for taint in node.taints:
        if taint["effect"] in ("NoSchedule", "NoExecute") and not _tolerates(pod.tolerations, taint):
            return "taint", f"taint {taint['key']}={taint['value']}:{taint['effect']} not tolerated"
    if pod.tpu_request > state.free_tpu[node.name]:
        return "tpu", f"{pod.tpu_request} {tpu.TPU_RESOURCE} requested, {state.free_tpu[node.name]} free"
    if pod.worker_index and pod.group in group_domains:
        key, value = group_domains[pod.group]  # LWS pins the workers to their leader's domain
        if node.labels.get(key) != value:
            return "exclusive topology", f"the group's leader is in {key}={value}"
    return _affinity_rejection(state, pod, node)


def _affinity_rejection(state: _State, pod: Pod, node: Node) -> tuple[str, str] | None:
    for term in pod.affinity:
        if term.topology_key not in node.labels:
            return "exclusive topology", f"no label {term.topology_key}"
        peers = [
            other for other in state.same_domain(node, term.topology_key) if other.keys.get(term.key) == term.value
        ]
        first_of_its_kind = not any(other.keys.get(term.key) == term.value for other, _ in state.placed.values())
        if not peers and not first_of_its_kind:
            return (
                "exclusive topology",
                f"the rest of its {Pod.describe(term.key, term.value)} is in another {term.topology_key}",
            )
    for term in pod.anti_affinity:
        for other in state.same_domain(node, term.topology_key):
            if term.key in other.keys and other.keys[term.key] != term.value:
                return (
                    "exclusive topology",
                    (
                        f"{term.topology_key}={node.labels[term.topology_key]} is taken by "
                        f"{Pod.describe(term.key, other.keys[term.key])}"
                    ),
                )
    for other, where in state.placed.values():  # anti-affinity is symmetric
        for term in other.anti_affinity:
            same = node.labels.get(term.topology_key) is not None and where.labels.get(
                term.topology_key
            ) == node.labels.get(term.topology_key)
            if same and term.key in pod.keys and pod.keys[term.key] != term.value:
                return (
                    "exclusive topology",
                    (
                        f"{term.topology_key}={node.labels[term.topology_key]} is taken by "
                        f"{Pod.describe(term.key, term.value)}"
                    ),
                )
    return None


# ---------------------------------------------------------------------------------------------
# The search.


@dataclasses.dataclass
class _Deepest:
    """The furthest pod the search could not place, and why, per node pool; and its budget."""

    index: int = -1
    reasons: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    budget: int = SEARCH_BUDGET


def place(lws: lws_model.LeaderWorkerSet, pools: Sequence[NodePoolSpec]) -> dict[str, str]:
    """pod name -> node name for every pod of the LeaderWorkerSet, or SchedulingError."""
    pods = lws_pods(lws)
    nodes = cluster_nodes(pools)
    state = _State(nodes=nodes, free_tpu={node.name: node.tpu_capacity for node in nodes})
    group_domain_key = _annotations(lws).get(lws_model.EXCLUSIVE_TOPOLOGY)
    deepest = _Deepest()
    if not _search(state, pods, 0, group_domain_key, deepest):
        raise _refusal(pods[deepest.index], deepest.reasons)
    return {name: where.name for name, (_, where) in state.placed.items()}


def _search(state: _State, pods: list[Pod], index: int, group_domain_key: str | None, deepest: _Deepest) -> bool:
    if index == len(pods):
        return True
    pod = pods[index]
    group_domains = {
        placed.group: (group_domain_key, where.labels.get(group_domain_key))
        for placed, where in state.placed.values()
        if group_domain_key and placed.worker_index == 0
    }
    reasons: dict[str, tuple[str, str]] = {}
    tried = set()
    for node in state.nodes:
        rejection = _rejection(state, pod, node, group_domains)
        if rejection is not None:
            reasons.setdefault(node.pool, rejection)
            continue
        signature = (
            node.pool,
            state.free_tpu[node.name],
            frozenset(tuple(sorted(p.keys.items())) for p, n in state.placed.values() if n is node),
        )
        if signature in tried:
            continue
        tried.add(signature)
        deepest.budget -= 1
        if deepest.budget < 0:
            return False
        state.placed[pod.name] = (pod, node)
        state.free_tpu[node.name] -= pod.tpu_request
        if _search(state, pods, index + 1, group_domain_key, deepest):
            return True
        del state.placed[pod.name]
        state.free_tpu[node.name] += pod.tpu_request
    if index > deepest.index and not tried:
        deepest.index, deepest.reasons = index, reasons
    return False


def _refusal(pod: Pod, reasons: Mapping[str, tuple[str, str]]) -> SchedulingError:
    keys = tuple(dict.fromkeys(key for reason, _ in reasons.values() for key in KEYS_BY_REASON[reason]))
    role = "leader" if pod.worker_index == 0 else f"worker {pod.worker_index}"
    subgroup = "" if pod.subgroup is None else f", subgroup {pod.subgroup}"
    why = "; ".join(f"node pool {pool}: {detail}" for pool, (_, detail) in reasons.items())
    return SchedulingError(
        keys or ("mode",),
        f"pod {pod.name} ({role} of group {pod.group}{subgroup}) fits no node and would stay Pending forever ({why})",
        "this layout cannot be scheduled as LWS v0.10.0 and GKE place pods; pick another mode or topology",
    )


def check_deployment(cfg: StackConfig, plan: Plan) -> dict[str, str]:
    """The placement of the stack's LeaderWorkerSet on its own node pools, or SchedulingError.

    Checked at `replicas`, on the pools as created (the autoscaled ones empty), and, with
    autoscaling, at `maxReplicas` with every pool grown to its full size: what the HPA and the
    cluster autoscaler can reach. Returns the placement at `maxReplicas`.
    """
    lws = manifests.leader_worker_set(cfg, plan)
    system, pools = system_node_pool(cfg), tpu_node_pools(cfg)
    placement = place(lws, (system, *pools))
    if cfg.scaling.enabled:
        at_max = dataclasses.replace(lws, spec=dataclasses.replace(lws.spec, replicas=cfg.scaling.max_replicas))
        placement = place(at_max, (system, *(at_full_size(spec) for spec in pools)))
    return placement
