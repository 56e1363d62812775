"""TPU v6e (Trillium) slice catalog: one frozen, keyword-built row per slice shape.

Everything the stack needs about a slice (GKE machine type, node count, placement topology, node
selectors, the `google.com/tpu` request, the LeaderWorkerSet size) is derived from a row here, so
a new shape is one new row. No Pulumi imports: the offline renderer and the tests use it directly.

Facts (cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus, TPU v6e system architecture):
  * a v6e chip has 32 GiB of HBM at 1640 GB/s;
  * GKE exposes v6e as `ct6e-standard-{1,4,8}t` machines with 1, 4 or 8 chips;
  * single-host slices are 1x1 (1t), 2x2 (4t) and 2x4 (8t); multi-host slices use 4t hosts,
    so nodes = chips / 4 and the node pool needs a COMPACT placement policy with the topology;
  * 2x4 can run either way; the disaggregated reference deployment runs it as two 4t hosts.
"""

from __future__ import annotations

import dataclasses

ACCELERATOR_LABEL = "tpu-v6e-slice"  # value of cloud.google.com/gke-tpu-accelerator
ACCELERATOR_SELECTOR_KEY = "cloud.google.com/gke-tpu-accelerator"
TOPOLOGY_SELECTOR_KEY = "cloud.google.com/gke-tpu-topology"
TPU_RESOURCE = "google.com/tpu"
PATHWAYS_INSTANCE_PREFIX = "tpuv6e"  # pathways-rm --instance_type=tpuv6e:<topology>
HBM_GIB_PER_CHIP = 32
HBM_BANDWIDTH_GBPS = 1640  # GB/s per chip

CHIPS_PER_MACHINE = {
    "ct6e-standard-1t": 1,
    "ct6e-standard-4t": 4,
    "ct6e-standard-8t": 8,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuSlice:
    """One v6e slice shape as GKE provisions it."""

    topology: str  # e.g. "4x4"; the value of cloud.google.com/gke-tpu-topology
    chips: int
    machine_type: str  # ct6e-standard-1t / 4t / 8t
    default: bool = True  # the row picked when the user names only the topology

    def __post_init__(self):
        if self.chips % self.chips_per_host:
            raise ValueError(f"{self.topology}: {self.chips} chips do not fill {self.machine_type} hosts")
        x, y = (int(side) for side in self.topology.split("x"))
        if x * y != self.chips:
            raise ValueError(f"{self.topology}: topology has {x * y} chips, row says {self.chips}")

    @property
    def name(self) -> str:
        return f"v6e-{self.chips}"

    @property
    def chips_per_host(self) -> int:
        return CHIPS_PER_MACHINE[self.machine_type]

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1

    @property
    def hbm_gib_per_chip(self) -> int:
        return HBM_GIB_PER_CHIP

    @property
    def hbm_bandwidth_gbps(self) -> int:
        return HBM_BANDWIDTH_GBPS

    @property
    def node_selector(self) -> dict[str, str]:
        return {ACCELERATOR_SELECTOR_KEY: ACCELERATOR_LABEL, TOPOLOGY_SELECTOR_KEY: self.topology}

    @property
    def tpu_request(self) -> str:
        """`google.com/tpu` limit of one worker pod: every chip of its host."""
        return str(self.chips_per_host)

    @property
    def pathways_instance_type(self) -> str:
        return f"{PATHWAYS_INSTANCE_PREFIX}:{self.topology}"

    def lws_size(self, slices: int) -> int:
        """Pods per LeaderWorkerSet group: one worker per host of every slice, plus the leader."""
        return slices * self.hosts + 1


SLICES: tuple[TpuSlice, ...] = (
    TpuSlice(topology="1x1", chips=1, machine_type="ct6e-standard-1t"),
    TpuSlice(topology="2x2", chips=4, machine_type="ct6e-standard-4t"),
    # The disaggregated reference deployment runs each v6e-8 as 2 hosts of 4 chips (LWS size 5).
    TpuSlice(topology="2x4", chips=8, machine_type="ct6e-standard-4t"),
    TpuSlice(topology="2x4", chips=8, machine_type="ct6e-standard-8t", default=False),
    TpuSlice(topology="4x4", chips=16, machine_type="ct6e-standard-4t"),
    TpuSlice(topology="4x8", chips=32, machine_type="ct6e-standard-4t"),
    TpuSlice(topology="8x8", chips=64, machine_type="ct6e-standard-4t"),
    TpuSlice(topology="8x16", chips=128, machine_type="ct6e-standard-4t"),
    TpuSlice(topology="16x16", chips=256, machine_type="ct6e-standard-4t"),
)

TOPOLOGIES: tuple[str, ...] = tuple(dict.fromkeys(row.topology for row in SLICES))


def machine_types_for(topology: str) -> tuple[str, ...]:
    return tuple(row.machine_type for row in SLICES if row.topology == topology)


def slice_for(topology: str, machine_type: str | None = None) -> TpuSlice:
    """The catalog row for a topology (and optionally a machine type); KeyError if none."""
    for row in SLICES:
        if row.topology != topology:
            continue
        if machine_type is None and row.default or machine_type == row.machine_type:
            return row
    raise KeyError((topology, machine_type))
