"""Node pool specs as plain data: the CPU system pool and one TPU pool per slice.

GKE rules encoded here (cloud.google.com/kubernetes-engine/docs/how-to/tpus,
cloud.google.com/kubernetes-engine/docs/concepts/tpus):
  * a multi-host slice is one node pool of `hosts` nodes in one zone with a COMPACT placement
    policy carrying the TPU topology; GKE creates it atomically as one slice;
  * a single-host slice is one node of the slice's machine type, no placement policy;
  * GKE labels every TPU node with its pool (cloud.google.com/gke-nodepool), accelerator and
    topology, taints it google.com/tpu=present:NoSchedule, and offers its chips as the
    google.com/tpu resource (`gke_node_labels`, `gke_node_taints`, which the scheduling check reads);
  * auto-upgrade recreates a multi-host slice (every host restarts), so it is off there, but GKE
    refuses auto_upgrade=false in a cluster enrolled in a release channel, so it is off only when
    the cluster has none (`upgrades_automatically`). A cluster the stack creates has the channel
    `releaseChannel` (default UNSPECIFIED); on a cluster it does not create (existingClusterName,
    a serving stack's platform cluster) a multi-host spec leaves auto_upgrade open (None) and
    GkeCluster decides from the live cluster's channel at deploy time.
Every pool runs as the stack's node service account (identity.py), never the Compute Engine
default account, which organisations often disable.

Workload metadata: Google's tutorial "Serve LLMs using multi-host TPUs on GKE with JetStream and
Pathways" (cloud.google.com/kubernetes-engine/docs/tutorials/serve-multihost-tpu-jetstream)
creates the TPU pools with `--workload-metadata=GCE_METADATA` and notes: "Node pools that run
Pathways with JetStream and MaxText should disable Workload Identity Federation for GKE". So with
serverRuntime=jetstream the TPU pools use GCE_METADATA and the Pathways pods act as the node
service account; the bundled server keeps Workload Identity (GKE_METADATA) everywhere.

Replicas (`slice_pools`): one pool per slice role per LeaderWorkerSet replica, since each LWS
group takes a pool exclusively. Replica 0 keeps the role's pool name; the pools of replicas that
only the HPA adds are created empty and autoscale between 0 and the slice's hosts
(`NodePoolSpec.autoscaling`), so an unused slice costs nothing.

Names carry the stack (`stack_scoped_name`), and every TPU node carries the stack's deployment
label, so two stacks on one cluster never share a pool name or each other's nodes. A label only
attracts; on a shared cluster any pod that tolerates google.com/tpu could still select another
stack's nodes and, on its node-metadata (GCE_METADATA) pools, act as that stack's node account. So
every TPU pool also carries the stack's own NoSchedule taint (`stack_taint`), only the stack's pods
tolerate it (`stack_toleration`), and admission.py's ValidatingAdmissionPolicy refuses any other
namespace's pod that tolerates it or selects those nodes.
`GkeCluster` turns each spec into a `gcp.container.NodePool`; the renderer prints them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from components.core import lws_model, tpu
from components.core.autoscaling import Autoscaling
from components.core.config import PlatformConfig, StackConfig
from components.core.naming import NODE_POOL_NAME_LIMIT, stack_scoped_name

NO_RELEASE_CHANNEL = "UNSPECIFIED"
NODE_POOL_LABEL = "cloud.google.com/gke-nodepool"  # set by GKE on every node
SLICE_ROLE_LABEL = "jetstream-tpu/slice-role"
DEPLOYMENT_LABEL = "jetstream-tpu/deployment"  # ties a stack's pods to its own TPU pools
TPU_TAINT = {"key": tpu.TPU_RESOURCE, "value": "present", "effect": "NoSchedule"}  # GKE's taint on TPU nodes
WORKLOAD_IDENTITY = "GKE_METADATA"  # pods act as their Kubernetes service account's GSA
NODE_IDENTITY = "GCE_METADATA"  # pods act as the node's service account (Pathways TPU pools)
STACK_TAINT_KEY = "jetstream-tpu/stack"  # its value: the stack's deployment id
SYSTEM_POOL = "system"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeRange:
    min_nodes: int
    max_nodes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlicePool:
    """The TPU node pool of one role of one LWS replica (`tpu_node_pools` turns it into a NodePoolSpec)."""

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodePoolSpec:
    name: str
    role: str  # system | serving | prefill | generate
    machine_type: str
    node_count: int
    zone: str
    tpu_topology: str | None  # the slice's topology on TPU pools
    compact_placement: bool  # multi-host slices: a COMPACT placement policy with tpu_topology
    auto_upgrade: (
        bool | None
    )  # None: a multi-host slice on a cluster the stack does not create (its live release channel decides)
    spot: bool
    reservation: str | None
    labels: Mapping[str, str]  # node labels the stack sets (GKE adds its own, see gke_node_labels)
    workload_metadata: str  # GKE_METADATA | GCE_METADATA
    tpu_chips_per_node: int  # google.com/tpu per node; 0 on CPU pools
    tpu_accelerator: str | None = None  # cloud.google.com/gke-tpu-accelerator of TPU pools
    autoscaling: NodeRange | None = None  # None: a fixed size of node_count; else created with node_count (0) nodes
    replica: int = 0  # the LeaderWorkerSet replica whose group the pool hosts (TPU pools)
    former_names: tuple[str, ...] = ()  # GKE names the pool may have had under another slice (`former_pool_names`)
    taints: tuple[Mapping[str, str], ...] = ()  # the stack's own taints (GKE adds its own, see gke_node_taints)

    @property
    def resource_key(self) -> str:
        """The pool's stable part of its Pulumi resource name: role and replica, never the slice, so a
        topology change is an update of the same resource (a replace, old slice first), not a rename."""
        return f"{self.role}-r{self.replica}" if self.replica else self.role


def stack_taint(deployment_id: str) -> Mapping[str, str]:
    """The NoSchedule taint on every TPU node of one stack."""
    return {"key": STACK_TAINT_KEY, "value": deployment_id, "effect": "NoSchedule"}


def stack_toleration(deployment_id: str) -> lws_model.Toleration:
    """What the stack's own pods tolerate: its taint, by value, so no other stack's taint."""
    taint = stack_taint(deployment_id)
    return lws_model.Toleration(key=taint["key"], operator="Equal", value=taint["value"], effect=taint["effect"])


def upgrades_automatically(multi_host: bool, release_channel: str | None) -> bool | None:
    """Auto-upgrade of a pool in a cluster enrolled in `release_channel`: off only for multi-host
    slices (an upgrade recreates every host) in a cluster without a channel, where GKE allows it.
    None for a multi-host slice while the channel is unknown (None: read from the live cluster at deploy time)."""
    if not multi_host:
        return True
    return None if release_channel is None else release_channel != NO_RELEASE_CHANNEL


def node_pool_name(cfg: StackConfig, role: str, replica: int = 0, slice_name: str | None = None) -> str:
    """GKE node pool name of one slice, e.g. v6e-16-serving-<stack>, v6e-16-serving-r1-<stack>
    (of the stack's slice, or of `slice_name`)."""
    replica_part = f"-r{replica}" if replica else ""
    prefix = f"{slice_name or cfg.tpu_slice.name}-{role}{replica_part}"
    return stack_scoped_name(prefix, cfg.stack, NODE_POOL_NAME_LIMIT)


def former_pool_names(cfg: StackConfig, role: str, replica: int) -> tuple[str, ...]:
    """Every GKE name the pool of this role and replica had under any catalog slice: the
    Pulumi resources of pools deployed before the names became stable were named after them,
    and the pool's aliases carry them over whatever slice they ran."""
    slice_names = dict.fromkeys(row.name for row in tpu.SLICES)
    return tuple(node_pool_name(cfg, role, replica, slice_name) for slice_name in slice_names)


def tpu_node_pools(cfg: StackConfig) -> tuple[NodePoolSpec, ...]:
    """One pool per slice role ("serving" interleaved, "prefill" and "generate" disaggregated) per replica."""
    row = cfg.tpu_slice
    return tuple(
        NodePoolSpec(
            name=node_pool_name(cfg, pool.role, pool.replica),
            role=pool.role,
            machine_type=row.machine_type,
            node_count=pool.node_count,
            zone=cfg.cluster.zone,
            tpu_topology=row.topology,
            compact_placement=row.multi_host,
            auto_upgrade=upgrades_automatically(
                row.multi_host, cfg.cluster.release_channel if cfg.creates_cluster else None
            ),
            spot=cfg.tpu_capacity.provisioning == "spot",
            reservation=cfg.tpu_capacity.reservation or None,
            labels={SLICE_ROLE_LABEL: pool.role, DEPLOYMENT_LABEL: cfg.deployment_id},
            workload_metadata=WORKLOAD_IDENTITY if cfg.pods_use_workload_identity else NODE_IDENTITY,
            tpu_chips_per_node=row.chips_per_host,
            tpu_accelerator=tpu.ACCELERATOR_LABEL,
            autoscaling=pool.autoscaling,
            replica=pool.replica,
            former_names=former_pool_names(cfg, pool.role, pool.replica),
            taints=(stack_taint(cfg.deployment_id),),
        )
        for pool in slice_pools(cfg.scaling, roles=cfg.slice_roles, hosts_per_slice=row.hosts)
    )


def at_full_size(spec: NodePoolSpec) -> NodePoolSpec:
    """The pool once the cluster autoscaler has grown it to its maximum (itself if fixed)."""
    return spec if spec.autoscaling is None else dataclasses.replace(spec, node_count=spec.autoscaling.max_nodes)


LIVE_RELEASE_CHANNEL = "the cluster's release channel decides at deploy time"


def node_pool_summary(spec: NodePoolSpec) -> dict:
    """The spec as plain data for the plan output; `autoscaling` only on autoscaled pools."""
    summary = dataclasses.asdict(spec)
    del summary["former_names"]  # Pulumi aliases, not part of the pool
    if spec.autoscaling is None:
        del summary["autoscaling"]
    if spec.auto_upgrade is None:
        summary["auto_upgrade"] = LIVE_RELEASE_CHANNEL
    return summary


def system_node_pool(cfg: StackConfig | PlatformConfig) -> NodePoolSpec:
    """Small CPU pool for kube-system and the LWS controller (TPU nodes are tainted)."""
    return NodePoolSpec(
        name=SYSTEM_POOL,
        role=SYSTEM_POOL,
        machine_type=cfg.cluster.system_machine_type,
        node_count=cfg.cluster.system_node_count,
        zone=cfg.cluster.zone,
        tpu_topology=None,
        compact_placement=False,
        auto_upgrade=True,
        spot=False,
        reservation=None,
        labels={},
        workload_metadata=WORKLOAD_IDENTITY,
        tpu_chips_per_node=0,
    )


def gke_node_labels(spec: NodePoolSpec) -> dict[str, str]:
    """The labels a node of this pool carries: GKE's own, then the pool's."""
    labels = {NODE_POOL_LABEL: spec.name}
    if spec.tpu_chips_per_node:
        labels |= {tpu.ACCELERATOR_SELECTOR_KEY: spec.tpu_accelerator, tpu.TOPOLOGY_SELECTOR_KEY: spec.tpu_topology}
    return {**labels, **spec.labels}


def gke_node_taints(spec: NodePoolSpec) -> tuple[Mapping[str, str], ...]:
    """The taints a node of this pool carries: GKE's TPU taint, then the pool's."""
    return ((TPU_TAINT,) if spec.tpu_chips_per_node else ()) + spec.taints
