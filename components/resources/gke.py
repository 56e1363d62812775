"""GkeCluster: a GKE cluster (created, looked up, or a platform stack's), node pools and a Kubernetes provider.

Where the cluster comes from (`GkeClusterArgs.source`):
  * CREATE (role=all, role=platform): the stack creates the cluster and its CPU system pool;
  * LOOKUP (role=all with existingClusterName): an existing cluster, read by name;
  * ATTACH (role=serving): the cluster of the platform stack, whose name, location, project and
    kubeconfig come from a StackReference (resources/platform.py); nothing but the TPU pools is created.
On a cluster the stack does not create (LOOKUP, ATTACH) it reads the live cluster
(`gcp.container.get_cluster_output`) before any pool: the pools' zone must be in the cluster's
region (refused at preview otherwise, as GKE would refuse the pools at apply), and pools whose
spec leaves auto-upgrade open take it from the cluster's release channel (GKE refuses
auto_upgrade=false on multi-host pools of a cluster enrolled in a channel).
"""

from __future__ import annotations

import dataclasses

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s
import yaml

from components.core.config_values import check_zone_in_location
from components.core.errors import ConfigError
from components.core.gateway import GATEWAY_API_CHANNEL
from components.core.node_pools import NO_RELEASE_CHANNEL, WORKLOAD_IDENTITY, NodePoolSpec, upgrades_automatically
from components.resources.options import child_after

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GKE_TAINT_EFFECTS = {"NoSchedule": "NO_SCHEDULE", "PreferNoSchedule": "PREFER_NO_SCHEDULE", "NoExecute": "NO_EXECUTE"}


def kubeconfig(cluster_name: str, endpoint: str, ca_certificate: str) -> str:
    """A kubeconfig that authenticates through gke-gcloud-auth-plugin (no static credentials)."""
    context = f"gke_{cluster_name}"
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": context,
                    "cluster": {"server": f"https://{endpoint}", "certificate-authority-data": ca_certificate},
                }
            ],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
            "users": [
                {
                    "name": context,
                    "user": {
                        "exec": {
                            "apiVersion": "client.authentication.k8s.io/v1beta1",
                            "command": "gke-gcloud-auth-plugin",
                            "installHint": (
                                "Install gke-gcloud-auth-plugin: gcloud components install gke-gcloud-auth-plugin"
                            ),
                            "provideClusterInfo": True,
                        }
                    },
                }
            ],
        },
        sort_keys=False,
    )


CREATE, LOOKUP, ATTACH = "create", "lookup", "attach"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GkeClusterArgs:
    project: pulumi.Input[str]
    location: pulumi.Input[str]  # the cluster's region or zone
    cluster_name: pulumi.Input[str]
    source: str  # CREATE | LOOKUP | ATTACH
    release_channel: str | None  # CREATE: the new cluster's; otherwise the live cluster's is read
    deletion_protection: bool
    system_pool: NodePoolSpec | None  # created with the cluster only (CREATE)
    tpu_pools: tuple[NodePoolSpec, ...]
    node_service_account: pulumi.Input[str]  # every node runs as it
    kubeconfig: pulumi.Input[str] | None = None  # ATTACH: the platform stack's (a secret)
    private_endpoint: bool = False  # CREATE: the control plane only on its private endpoint
    authorized_networks: tuple[str, ...] = ()  # CREATE: CIDR blocks allowed to reach the control plane
    gateway_api: bool = False  # CREATE: the Gateway API (standard channel) for GKE Inference Gateway


def _reservation_affinity(spec: NodePoolSpec) -> gcp.container.NodePoolNodeConfigReservationAffinityArgs | None:
    if spec.reservation is None:
        return None
    return gcp.container.NodePoolNodeConfigReservationAffinityArgs(
        consume_reservation_type="SPECIFIC_RESERVATION",
        key="compute.googleapis.com/reservation-name",
        values=[spec.reservation],
    )


def _size(spec: NodePoolSpec) -> dict:
    """A fixed node_count, or an autoscaled pool created with initial_node_count nodes (0): GKE's
    cluster autoscaler then owns the size (node_count would fight it on every update), and grows
    a multi-host slice pool from 0 to all its hosts at once."""
    if spec.autoscaling is None:
        return {"node_count": spec.node_count}
    return {
        "initial_node_count": spec.node_count,
        "autoscaling": gcp.container.NodePoolAutoscalingArgs(
            min_node_count=spec.autoscaling.min_nodes, max_node_count=spec.autoscaling.max_nodes
        ),
    }


def live_release_channel(channels) -> str:
    """The channel of a cluster as `get_cluster` reports it (no entry, or no channel: none)."""
    return (channels[0].channel if channels else None) or NO_RELEASE_CHANNEL


def node_pool_args(
    spec: NodePoolSpec,
    args: GkeClusterArgs,
    cluster: pulumi.Input[str],
    location: pulumi.Input[str],
    release_channel: pulumi.Output[str] | None = None,
) -> gcp.container.NodePoolArgs:
    """NodePoolArgs of one pool; multi-host slices get a COMPACT placement with the topology. A spec
    that leaves auto-upgrade open takes it from `release_channel`, the live cluster's."""
    placement = (
        gcp.container.NodePoolPlacementPolicyArgs(type="COMPACT", tpu_topology=spec.tpu_topology)
        if spec.compact_placement
        else None
    )
    auto_upgrade = spec.auto_upgrade
    if auto_upgrade is None:  # a multi-host slice (node_pools.upgrades_automatically)
        auto_upgrade = release_channel.apply(lambda channel: upgrades_automatically(True, channel))
    return gcp.container.NodePoolArgs(
        name=spec.name,
        cluster=cluster,
        location=location,
        project=args.project,
        **_size(spec),
        node_locations=[spec.zone],
        placement_policy=placement,
        management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=auto_upgrade),
        node_config=gcp.container.NodePoolNodeConfigArgs(
            machine_type=spec.machine_type,
            spot=spec.spot or None,
            reservation_affinity=_reservation_affinity(spec),
            service_account=args.node_service_account,
            oauth_scopes=[CLOUD_PLATFORM_SCOPE],
            workload_metadata_config=gcp.container.NodePoolNodeConfigWorkloadMetadataConfigArgs(
                mode=spec.workload_metadata
            ),
            labels=dict(spec.labels) or None,
            taints=[
                gcp.container.NodePoolNodeConfigTaintArgs(
                    key=taint["key"], value=taint["value"], effect=GKE_TAINT_EFFECTS[taint["effect"]]
                )
                for taint in spec.taints
            ]
            or None,
        ),
    )


def tpu_pool_options(component: str, spec: NodePoolSpec) -> pulumi.ResourceOptions:
    """How a TPU pool is updated without ever holding two slices of one role and replica at once.

    * Its resource name is stable (`resource_key`: role and replica), and aliases carry over the
      pools deployed under the older, slice-carrying names (`former_names`). A topology change is
      then a change of the pool's GKE name, which the provider can only do as a replace, and a
      replace deletes the old slice first (both at once need twice the TPU capacity, which a
      reservation or a tight quota refuses); its workload stops and comes back on the new slice.
      A rename of the resource would instead create the new slice before deleting the old one.
    * initial_node_count only matters at creation and the provider replaces the pool when it
      changes; it changes when `replicas` drops below a replica that keeps a pool up to
      maxReplicas (fixed size -> autoscaled from 0), so it is ignored after creation and the
      serving slice is resized in place instead (the cluster autoscaler then owns its size).
    """
    return pulumi.ResourceOptions(
        delete_before_replace=True,
        aliases=[pulumi.Alias(name=f"{component}-{former}") for former in spec.former_names],
        ignore_changes=["initialNodeCount"],
    )


def _location_of_pools(pools: tuple[NodePoolSpec, ...], cluster_name: str, location: str) -> str:
    """The live cluster's location, once every pool's zone is known to be in its region; a zone
    outside it stops the program at preview, before any pool (as check_same_project does)."""
    try:
        for zone in sorted({spec.zone for spec in pools}):
            check_zone_in_location(zone, location, cluster=f"the cluster {cluster_name}")
    except ConfigError as error:
        raise pulumi.RunError(str(error)) from None
    return location


class GkeCluster(pulumi.ComponentResource):
    """The cluster, its node pools, kubeconfig and provider."""

    cluster_name: pulumi.Output[str]
    location: pulumi.Output[str]
    project: pulumi.Output[str]
    endpoint: pulumi.Output[str] | None  # None for a platform stack's cluster (ATTACH)
    network: pulumi.Output[str] | None  # the created cluster's VPC (CREATE); None otherwise
    kubeconfig: pulumi.Output[str]  # secret
    provider: k8s.Provider
    cluster: gcp.container.Cluster | None  # None unless the stack creates it
    tpu_node_pools: list[gcp.container.NodePool]

    def __init__(self, name: str, args: GkeClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:gke:GkeCluster", name, None, opts)
        # Nodes start once the component's depends_on (the node account's roles) exist.
        child = child_after(self, opts)
        self.cluster, self.endpoint, self.network, system_pools = None, None, None, []
        self.location, self.project = pulumi.Output.from_input(args.location), pulumi.Output.from_input(args.project)
        pools_location, release_channel = args.location, None
        if args.source == CREATE:
            self.cluster = self._create_cluster(name, args, child)
            self.cluster_name, self.endpoint = self.cluster.name, self.cluster.endpoint
            self.network = self.cluster.network
            self.location, self.project = self.cluster.location, self.cluster.project
            ca_certificate = self.cluster.master_auth.cluster_ca_certificate
            system_pools = [
                gcp.container.NodePool(
                    f"{name}-{args.system_pool.name}",
                    node_pool_args(args.system_pool, args, self.cluster.name, args.location),
                    opts=child,
                )
            ]
        else:
            found = gcp.container.get_cluster_output(
                name=args.cluster_name,
                location=args.location,
                project=args.project,
                opts=pulumi.InvokeOptions(parent=self),
            )
            self.cluster_name = found.name if args.source == LOOKUP else pulumi.Output.from_input(args.cluster_name)
            pools_location = pulumi.Output.all(found.name, found.location).apply(
                lambda live: _location_of_pools(args.tpu_pools, *live)
            )
            release_channel = found.release_channels.apply(live_release_channel)
            if args.source == LOOKUP:
                self.endpoint = found.endpoint
                ca_certificate = found.master_auths.apply(lambda auths: auths[0].cluster_ca_certificate)
        self.tpu_node_pools = [
            gcp.container.NodePool(
                f"{name}-{spec.resource_key}",
                node_pool_args(spec, args, self.cluster_name, pools_location, release_channel),
                opts=pulumi.ResourceOptions.merge(child, tpu_pool_options(name, spec)),
            )
            for spec in args.tpu_pools
        ]
        if args.source == ATTACH:
            self.kubeconfig = pulumi.Output.secret(args.kubeconfig)
        else:
            self.kubeconfig = pulumi.Output.secret(
                pulumi.Output.all(self.cluster_name, self.endpoint, ca_certificate).apply(
                    lambda parts: kubeconfig(*parts)
                )
            )
        self.provider = k8s.Provider(
            f"{name}-k8s",
            # Server-side apply: the LWS CRD is too large for client-side apply's annotation.
            k8s.ProviderArgs(kubeconfig=self.kubeconfig, enable_server_side_apply=True),
            opts=pulumi.ResourceOptions(parent=self, depends_on=system_pools),
        )
        self.register_outputs(
            {
                "clusterName": self.cluster_name,
                "location": self.location,
                "endpoint": self.endpoint,
                "kubeconfig": self.kubeconfig,
            }
        )

    @staticmethod
    def _create_cluster(name: str, args: GkeClusterArgs, child: pulumi.ResourceOptions) -> gcp.container.Cluster:
        return gcp.container.Cluster(
            f"{name}-cluster",
            gcp.container.ClusterArgs(
                name=args.cluster_name,
                location=args.location,
                project=args.project,
                # Pools are managed as separate resources; GKE still creates (then removes) one
                # default node, which must not run as the Compute Engine default account either.
                remove_default_node_pool=True,
                initial_node_count=1,
                node_config=gcp.container.ClusterNodeConfigArgs(
                    service_account=args.node_service_account,
                    oauth_scopes=[CLOUD_PLATFORM_SCOPE],
                    workload_metadata_config=gcp.container.ClusterNodeConfigWorkloadMetadataConfigArgs(
                        mode=WORKLOAD_IDENTITY
                    ),
                ),
                workload_identity_config=gcp.container.ClusterWorkloadIdentityConfigArgs(
                    workload_pool=f"{args.project}.svc.id.goog"
                ),
                release_channel=gcp.container.ClusterReleaseChannelArgs(channel=args.release_channel),
                deletion_protection=args.deletion_protection,
                # Explicit, not GKE's default: the HPA's metrics reach Cloud Monitoring through it.
                monitoring_config=gcp.container.ClusterMonitoringConfigArgs(
                    managed_prometheus=gcp.container.ClusterMonitoringConfigManagedPrometheusArgs(enabled=True)
                ),
                # The bundled and vLLM runtimes mount checkpoints and caches from buckets through it.
                addons_config=gcp.container.ClusterAddonsConfigArgs(
                    gcs_fuse_csi_driver_config=gcp.container.ClusterAddonsConfigGcsFuseCsiDriverConfigArgs(enabled=True)
                ),
                gateway_api_config=(
                    gcp.container.ClusterGatewayApiConfigArgs(channel=GATEWAY_API_CHANNEL) if args.gateway_api else None
                ),
                **_control_plane_access(args),
            ),
            # node_config is the default pool's, which GKE removes: the API then reports another
            # pool's config or none, and the provider (where the whole block is ForceNew) would
            # replace the cluster on the next update. Only its creation matters.
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(ignore_changes=["nodeConfig"])),
        )


def _control_plane_access(args: GkeClusterArgs) -> dict:
    """privateEndpoint (which needs private nodes) and authorizedNetworks of a created cluster."""
    access = {}
    if args.private_endpoint:
        access["private_cluster_config"] = gcp.container.ClusterPrivateClusterConfigArgs(
            enable_private_nodes=True, enable_private_endpoint=True
        )
    if args.authorized_networks:
        access["master_authorized_networks_config"] = gcp.container.ClusterMasterAuthorizedNetworksConfigArgs(
            cidr_blocks=[
                gcp.container.ClusterMasterAuthorizedNetworksConfigCidrBlockArgs(cidr_block=block)
                for block in args.authorized_networks
            ]
        )
    return access
