"""TPU node pool specs as plain data: one pool per slice, derived from the catalog row.

GKE rules encoded here (cloud.google.com/kubernetes-engine/docs/how-to/tpus):
  * a multi-host slice is one node pool of `hosts` nodes in one zone with a COMPACT placement
    policy carrying the TPU topology; GKE creates it atomically as one slice;
  * a single-host slice is one node of the slice's machine type, no placement policy;
  * auto-upgrade recreates a multi-host slice (every host restarts), so it is off there, but GKE
    refuses auto_upgrade=false in a cluster enrolled in a release channel, so it is off only when
    the cluster has none (`releaseChannel=UNSPECIFIED`, the default).
`GkeCluster` turns each spec into a `gcp.container.NodePool`; the renderer prints them.
"""

from __future__ import annotations

import dataclasses

from components.core.config import StackConfig
from components.core.planner import node_pool_name

NO_RELEASE_CHANNEL = "UNSPECIFIED"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodePoolSpec:
    name: str
    role: str  # serving | prefill | generate
    machine_type: str
    node_count: int
    zone: str
    tpu_topology: str | None  # set (with COMPACT placement) on multi-host slices only
    auto_upgrade: bool
    spot: bool
    reservation: str | None


def tpu_node_pools(cfg: StackConfig) -> tuple[NodePoolSpec, ...]:
    """One pool per slice role: ("serving",) interleaved, ("prefill", "generate") disaggregated."""
    row = cfg.tpu_slice
    return tuple(
        NodePoolSpec(
            name=node_pool_name(cfg, role),
            role=role,
            machine_type=row.machine_type,
            node_count=row.hosts,
            zone=cfg.zone,
            tpu_topology=row.topology if row.multi_host else None,
            auto_upgrade=not row.multi_host or cfg.release_channel != NO_RELEASE_CHANNEL,
            spot=cfg.tpu_provisioning == "spot",
            reservation=cfg.tpu_reservation or None,
        )
        for role in cfg.slice_roles
    )
