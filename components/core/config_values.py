"""Parsing the stack's config values: each function returns the typed value of its key(s) or
raises a `ConfigError` naming the key, what is wrong and what would be valid.

Values arrive as strings (`raw`, keys without namespace); the table they are read against is
`config_table.CONFIG_KEYS`. Checks that need another key's value (a reservation with its
provisioning, a zone in the cluster's location) are here too; those that need the server runtime
are in `config_runtime.py`, those of the role in `config_roles.py`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping

from components.core import models, naming, tpu
from components.core.config_keys import closest, read_choice, read_integer, read_text
from components.core.config_table import (
    AXIS_KEYS,
    KEYS_BY_NAME,
    LWS_ALWAYS,
    LWS_AUTO,
    LWS_INSTALLS,
    PRESET_DEFAULT,
    RELEASE_CHANNELS,
    SERVING,
)
from components.core.errors import ConfigError

# Bounds of integer keys: sanity limits that turn a typo into a preview error; whether a value
# fits the hardware is the planner's job.
BATCH_RANGE = (1, 4096)  # sequences per chip; 4096 is far past any HBM fit on v6e
PREFILL_RANGE = (1, 1 << 20)  # tokens; a 1M-token prompt is past every preset's context
TARGET_RANGE = (2, 1 << 20)  # tokens; at least one prompt token and one generated token
HBM_RESERVE_RANGE = (0, 90)  # percent; keeping more than 90% free leaves no room for weights
STARTUP_DELAY_RANGE = (0, 7200)  # seconds; a restore slower than 2 h means a wrong checkpoint
SYSTEM_NODES_RANGE = (1, 100)  # CPU nodes for kube-system and the LWS controller

_ZONE = re.compile(r"[a-z]+-[a-z]+\d+-[a-z]")

# ---------------------------------------------------------------------------------------------
# Scalar parsing: each returns the typed value or raises ConfigError naming the key.


def text_of(raw: Mapping[str, str], name: str) -> str:
    return read_text(raw, KEYS_BY_NAME[name])


def integer_of(raw: Mapping[str, str], name: str) -> int:
    return read_integer(raw, KEYS_BY_NAME[name])


def boolean_of(raw: Mapping[str, str], name: str) -> bool:
    text = text_of(raw, name).lower()
    if text not in ("true", "false"):
        raise ConfigError(name, f"expected true or false, got {text!r}", f"pulumi config set {name} true")
    return text == "true"


def choice_of(raw: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    return read_choice(raw, KEYS_BY_NAME[name], choices)


def preset_integer(raw: Mapping[str, str], name: str, preset_value: int) -> int:
    value = integer_of(raw, name)
    return preset_value if value == PRESET_DEFAULT else value


def bounded(name: str, value: int, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(
            name, f"{value} is outside {low}..{high}", f"pulumi config set {name} {min(max(value, low), high)}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Keys of a stack that serves.


def check_unknown_keys(raw: Mapping[str, str]) -> None:
    """Refuse a key this project does not declare, naming the nearest declared one. The CLI no
    longer refuses undeclared keys, and the program is handed every key of its namespace."""
    for name in raw:
        if name not in KEYS_BY_NAME:
            raise ConfigError(name, "is not a key of this stack", closest(name, KEYS_BY_NAME))


def required_text(raw: Mapping[str, str], name: str) -> str:
    """A key a stack that serves cannot do without (REQUIRED_TO_SERVE)."""
    value = text_of(raw, name)
    if not value:
        raise ConfigError(
            name,
            "is required and not set (a stack that serves needs a model, a topology and a checkpoint)",
            f"pulumi config set {name} <value>",
        )
    return value


def parse_model(raw: Mapping[str, str]) -> models.ModelPreset:
    name = required_text(raw, "model")
    if name not in models.PRESETS:
        raise ConfigError(
            "model",
            f"unknown model preset {name!r} (known: {', '.join(models.PRESETS)})",
            closest(name, models.PRESETS),
        )
    return models.PRESETS[name]


def parse_tpu_slice(raw: Mapping[str, str]) -> tpu.TpuSlice:
    topology = required_text(raw, "topology")
    if topology not in tpu.TOPOLOGIES:
        raise ConfigError(
            "topology",
            f"{topology!r} is not a TPU v6e slice shape (v6e shapes: {', '.join(tpu.TOPOLOGIES)})",
            "pick the next larger v6e shape, e.g. 4x4 for 16 chips",
        )
    machine_type = text_of(raw, "tpuMachineType") or None
    try:
        return tpu.slice_for(topology, machine_type)
    except KeyError:
        allowed = ", ".join(tpu.machine_types_for(topology))
        raise ConfigError(
            ("tpuMachineType", "topology"),
            f"{machine_type!r} cannot host a {topology} slice (allowed: {allowed})",
            "leave tpuMachineType empty to use the catalog's machine type",
        ) from None


def parse_parallelism(raw: Mapping[str, str]) -> dict[str, int]:
    """The mesh axes the user set; the others come from the preset's recipe (planner.py)."""
    return {axis: value for axis, key in AXIS_KEYS.items() if (value := integer_of(raw, key)) != PRESET_DEFAULT}


def _label_name(raw: Mapping[str, str], name: str, limit: int, derived: str = "") -> str:
    """The key's value, or `derived` if it is empty, as a DNS-1123 label (appName and serviceName
    derive nothing, so an empty one is refused)."""
    value = text_of(raw, name) or derived
    if not naming.is_dns_label(value, limit):
        raise ConfigError(
            name,
            f"{value!r} is not a DNS-1123 label of at most {limit} characters",
            "use lowercase letters, digits and '-', starting with a letter",
        )
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceNames:
    """The Kubernetes names of a stack's workload: appName, serviceName and namespace."""

    app_name: str  # the LeaderWorkerSet (its pods are <app>-<group>-<index>), the app label, the pods' service account
    service_name: str  # the Service in front of the leaders
    namespace: str  # where the workload lives; its TPU nodes admit no other (admission.py)

    @property
    def kubernetes_service_account(self) -> str:
        return self.app_name


def parse_names(raw: Mapping[str, str], stack: str) -> ServiceNames:
    """appName, serviceName and namespace (empty: derived from the stack), each a valid label."""
    return ServiceNames(
        app_name=_label_name(raw, "appName", naming.APP_NAME_LIMIT),
        service_name=_label_name(raw, "serviceName", naming.APP_NAME_LIMIT),
        namespace=_label_name(raw, "namespace", naming.DNS_LABEL_LIMIT, naming.default_namespace(stack)),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuCapacity:
    """How the stack's TPU node pools get their capacity: tpuProvisioning and its tpuReservation.

    The pools' concern, not the cluster's (`ClusterSettings`): a role=serving stack provisions its
    own pools on its platform's cluster, and a platform stack has no TPU pool at all."""

    provisioning: str  # on-demand | spot | reservation
    reservation: str  # the reservation's name for provisioning=reservation; "" otherwise


def parse_tpu_capacity(raw: Mapping[str, str], provisioning: str) -> TpuCapacity:
    """The capacity of the TPU pools; `provisioning` is tpuProvisioning's value, parsed before."""
    return TpuCapacity(provisioning=provisioning, reservation=_parse_reservation(raw, provisioning))


def _parse_reservation(raw: Mapping[str, str], provisioning: str) -> str:
    reservation = text_of(raw, "tpuReservation")
    if provisioning == "reservation" and not reservation:
        raise ConfigError(
            ("tpuReservation", "tpuProvisioning"),
            "tpuProvisioning=reservation needs a reservation name",
            "pulumi config set tpuReservation <reservation-name>",
        )
    if provisioning != "reservation" and reservation:
        raise ConfigError(
            ("tpuReservation", "tpuProvisioning"),
            f"a reservation is set but tpuProvisioning={provisioning}",
            "pulumi config set tpuProvisioning reservation, or unset tpuReservation",
        )
    return reservation


def parse_scratch_bucket(raw: Mapping[str, str], project: str, stack: str) -> str:
    bucket = text_of(raw, "scratchBucketName") or naming.default_scratch_bucket(project, stack)
    if not naming.is_bucket_name(bucket):
        raise ConfigError(
            "scratchBucketName",
            f"{bucket!r} is not a valid bucket name",
            "set scratchBucketName to 3-63 lowercase letters, digits, '-' or '_'",
        )
    return bucket


# ---------------------------------------------------------------------------------------------
# The cluster.


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterSettings:
    """The cluster of a stack, as both a platform stack and a stack that serves read it.

    For role=all or platform, the cluster the stack creates (role=all: or looks up, `existing`); for
    role=serving, its platform's, read at deploy time (PlatformReference), so `name` and `location`
    are "" and only the zone of its TPU pools is its own. Whether the stack creates the cluster
    depends on the role too, so it is the stack's answer (`StackConfig.creates_cluster`). How the TPU
    pools get their capacity is not here: a serving stack provisions its own pools on its platform's
    cluster, and a platform stack has none, so that is the pools' concern (`TpuCapacity`).
    """

    name: str  # clusterName or existingClusterName; "" for role=serving
    existing: bool  # existingClusterName is set (role=all only: the other roles refuse it)
    zone: str  # where the stack's node pools run
    location: str  # clusterLocation, a region or a zone; "" for role=serving, as name
    release_channel: str
    deletion_protection: bool
    system_machine_type: str
    system_node_count: int
    lws_version: str
    install_lws_controller: bool  # installLwsController: auto on a cluster the stack creates, always on any
    keep_lws_controller: bool  # installed into an existing cluster: kept when the stack is destroyed
    private_endpoint: bool  # privateEndpoint of a cluster the stack creates
    authorized_networks: tuple[str, ...]  # authorizedNetworks of a cluster the stack creates

    @property
    def region(self) -> str:
        """The zone's region: where the stack's regional resources (bucket, image repository) live."""
        return naming.region_of(self.zone)


def parse_cluster(raw: Mapping[str, str], stack: str, role: str) -> ClusterSettings:
    """The cluster of the role's config: the cluster a role=all or platform stack creates (or,
    role=all, looks up). A serving stack's cluster is its platform's, read at deploy time
    (PlatformReference), so its name and location are "" here."""
    existing = text_of(raw, "existingClusterName")
    zone, location = _parse_zone(raw)
    name = existing or _label_name(raw, "clusterName", naming.CLUSTER_NAME_LIMIT, naming.default_cluster_name(stack))
    on_own_cluster = role != SERVING
    return ClusterSettings(
        name=name if on_own_cluster else "",
        existing=bool(existing),
        zone=zone,
        location=location if on_own_cluster else "",
        release_channel=choice_of(raw, "releaseChannel", RELEASE_CHANNELS),
        deletion_protection=boolean_of(raw, "deletionProtection"),
        system_machine_type=text_of(raw, "systemMachineType"),
        system_node_count=bounded("systemNodeCount", integer_of(raw, "systemNodeCount"), SYSTEM_NODES_RANGE),
        lws_version=_lws_version(raw),
        **_install_lws_controller(raw, role, creates_cluster=on_own_cluster and not existing),
        **_control_plane_access(raw, existing),
    )


def _parse_zone(raw: Mapping[str, str]) -> tuple[str, str]:
    zone = text_of(raw, "zone")
    if not _ZONE.fullmatch(zone):
        raise ConfigError("zone", f"{zone!r} is not a GCP zone", "e.g. us-east5-b (a zone with TPU v6e capacity)")
    location = text_of(raw, "clusterLocation") or naming.region_of(zone)
    check_zone_in_location(zone, location, cluster="the cluster's location", keys=("zone", "clusterLocation"))
    return zone, location


def _location_region(location: str) -> str:
    """The region of a cluster location, which is a region or a zone."""
    return naming.region_of(location) if _ZONE.fullmatch(location) else location


def check_zone_in_location(zone: str, location: str, *, cluster: str, keys: tuple[str, ...] = ("zone",)) -> str:
    """`location`, or ConfigError when node pools in `zone` cannot join a cluster at `location` (GKE
    puts a cluster's node pools in zones of its region only, and would refuse them at apply).
    `cluster` names the cluster in the message."""
    region = _location_region(location)
    if naming.region_of(zone) != region:
        raise ConfigError(
            keys,
            f"zone {zone} is outside {cluster} ({location}): GKE creates a cluster's node pools only in "
            f"zones of its region, {region}",
            f"pulumi config set zone <a zone of {region} with TPU v6e capacity>",
        )
    return location


def _install_lws_controller(raw: Mapping[str, str], role: str, creates_cluster: bool) -> dict[str, bool]:
    """Whether the stack installs the cluster-wide LWS controller, and keeps it when destroyed.

    A string, not a boolean: Pulumi fills in a key's schema default before the program runs, so a
    boolean's "unset" cannot be told from true. auto installs where the stack creates the cluster;
    always also into an existing cluster, where the install outlives the stack (`keep_lws_controller`:
    deleting the CRD would delete every LeaderWorkerSet of the cluster, other stacks' too); never
    leaves it to the cluster's owner. A serving stack's platform installs it."""
    if text_of(raw, "installLwsController").lower() in ("true", "false"):
        raise ConfigError(
            "installLwsController",
            f"is now one of {', '.join(LWS_INSTALLS)}, not a boolean",
            "pulumi config set installLwsController never (was false) or auto (was true)",
        )
    choice = choice_of(raw, "installLwsController", LWS_INSTALLS)
    if role == SERVING and choice == LWS_ALWAYS:
        raise ConfigError(
            ("installLwsController", "role"),
            "a role=serving stack never installs the LWS controller: its platform stack does",
            "pulumi config set installLwsController auto (or never) here; the platform stack installs it",
        )
    install = choice == LWS_ALWAYS or choice == LWS_AUTO and creates_cluster
    return {"install_lws_controller": install, "keep_lws_controller": install and not creates_cluster}


def _control_plane_access(raw: Mapping[str, str], existing: bool) -> dict:
    """privateEndpoint and authorizedNetworks, which only a cluster the stack creates takes."""
    access = {"private_endpoint": boolean_of(raw, "privateEndpoint"), "authorized_networks": _authorized_networks(raw)}
    if existing and (access["private_endpoint"] or access["authorized_networks"]):
        key = "privateEndpoint" if access["private_endpoint"] else "authorizedNetworks"
        existing_name = text_of(raw, "existingClusterName")
        raise ConfigError(
            (key, "existingClusterName"),
            f"{key} shapes the control plane of a cluster the stack creates, not of {existing_name!r}",
            "set it on the existing cluster with gcloud container clusters update, and remove it here",
        )
    return access


def _authorized_networks(raw: Mapping[str, str]) -> tuple[str, ...]:
    """authorizedNetworks: comma-separated IPv4 CIDR blocks allowed to reach the control plane."""
    blocks = tuple(block.strip() for block in text_of(raw, "authorizedNetworks").split(",") if block.strip())
    for block in blocks:
        try:
            ipaddress.IPv4Network(block)
        except ValueError:
            raise ConfigError(
                "authorizedNetworks",
                f"{block!r} is not an IPv4 CIDR block (host bits must be zero)",
                "pulumi config set authorizedNetworks 10.0.0.0/8,203.0.113.0/24",
            ) from None
    return blocks


def _lws_version(raw: Mapping[str, str]) -> str:
    version = text_of(raw, "lwsVersion")
    if not re.fullmatch(r"v\d+\.\d+\.\d+", version):
        raise ConfigError("lwsVersion", f"{version!r} is not a release tag", "use a tag like v0.10.0")
    return version
