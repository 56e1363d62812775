"""GkeCluster: a new (or existing) GKE cluster, its TPU v6e node pools and a Kubernetes provider."""

from __future__ import annotations

from typing import Sequence

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s
import yaml

from components.core.config import StackConfig
from components.core.node_pools import NodePoolSpec, tpu_node_pools

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# Pods authenticate as their Kubernetes service account (Workload Identity), never as the node.
GKE_METADATA = gcp.container.NodePoolNodeConfigWorkloadMetadataConfigArgs(mode="GKE_METADATA")


def kubeconfig(cluster_name: str, endpoint: str, ca_certificate: str) -> str:
    """A kubeconfig that authenticates through gke-gcloud-auth-plugin (no static credentials)."""
    context = f"gke_{cluster_name}"
    return yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": f"https://{endpoint}", "certificate-authority-data": ca_certificate}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        "current-context": context,
        "users": [{"name": context, "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": "gke-gcloud-auth-plugin",
            "installHint": "Install gke-gcloud-auth-plugin: gcloud components install gke-gcloud-auth-plugin",
            "provideClusterInfo": True,
        }}}],
    }, sort_keys=False)


def _reservation_affinity(spec: NodePoolSpec) -> gcp.container.NodePoolNodeConfigReservationAffinityArgs | None:
    if spec.reservation is None:
        return None
    return gcp.container.NodePoolNodeConfigReservationAffinityArgs(
        consume_reservation_type="SPECIFIC_RESERVATION",
        key="compute.googleapis.com/reservation-name",
        values=[spec.reservation],
    )


def tpu_node_pool_args(spec: NodePoolSpec, cluster: pulumi.Input[str], location: str, project: str) -> gcp.container.NodePoolArgs:
    """NodePoolArgs of one TPU slice; multi-host slices get a COMPACT placement with the topology."""
    placement = gcp.container.NodePoolPlacementPolicyArgs(type="COMPACT", tpu_topology=spec.tpu_topology) if spec.tpu_topology else None
    return gcp.container.NodePoolArgs(
        name=spec.name,
        cluster=cluster,
        location=location,
        project=project,
        node_count=spec.node_count,
        node_locations=[spec.zone],
        placement_policy=placement,
        management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=spec.auto_upgrade),
        node_config=gcp.container.NodePoolNodeConfigArgs(
            machine_type=spec.machine_type,
            spot=spec.spot or None,
            reservation_affinity=_reservation_affinity(spec),
            oauth_scopes=[CLOUD_PLATFORM_SCOPE],
            workload_metadata_config=GKE_METADATA,
            labels={"jetstream-tpu/slice-role": spec.role},
        ),
    )


class GkeCluster(pulumi.ComponentResource):
    """The cluster (created, or looked up by name), its TPU node pools, kubeconfig and provider."""

    cluster_name: pulumi.Output[str]
    endpoint: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]  # secret
    provider: k8s.Provider
    node_pools: list[gcp.container.NodePool]

    def __init__(self, name: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:gke:GkeCluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        if cfg.existing_cluster:
            found = gcp.container.get_cluster_output(name=cfg.cluster_name, location=cfg.cluster_location, project=cfg.project, opts=pulumi.InvokeOptions(parent=self))
            self.cluster_name, self.endpoint = found.name, found.endpoint
            ca_certificate = found.master_auths.apply(lambda auths: auths[0].cluster_ca_certificate)
            system_pools: Sequence[pulumi.Resource] = []
        else:
            cluster = self._create_cluster(name, cfg, child)
            self.cluster_name, self.endpoint = cluster.name, cluster.endpoint
            ca_certificate = cluster.master_auth.cluster_ca_certificate
            system_pools = [self._system_pool(name, cfg, cluster)]
        self.node_pools = [
            gcp.container.NodePool(f"{name}-{spec.name}", tpu_node_pool_args(spec, self.cluster_name, cfg.cluster_location, cfg.project), opts=child)
            for spec in tpu_node_pools(cfg)
        ]
        self.kubeconfig = pulumi.Output.secret(pulumi.Output.all(self.cluster_name, self.endpoint, ca_certificate).apply(lambda parts: kubeconfig(*parts)))
        self.provider = k8s.Provider(
            f"{name}-k8s",
            # Server-side apply: the LWS CRD is too large for client-side apply's annotation.
            k8s.ProviderArgs(kubeconfig=self.kubeconfig, enable_server_side_apply=True),
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(system_pools)),
        )
        self.register_outputs({"clusterName": self.cluster_name, "endpoint": self.endpoint, "kubeconfig": self.kubeconfig})

    def _create_cluster(self, name: str, cfg: StackConfig, child: pulumi.ResourceOptions) -> gcp.container.Cluster:
        return gcp.container.Cluster(
            f"{name}-cluster",
            gcp.container.ClusterArgs(
                name=cfg.cluster_name,
                location=cfg.cluster_location,
                project=cfg.project,
                # Pools are managed as separate resources; GKE still needs one node to create.
                remove_default_node_pool=True,
                initial_node_count=1,
                workload_identity_config=gcp.container.ClusterWorkloadIdentityConfigArgs(workload_pool=f"{cfg.project}.svc.id.goog"),
                release_channel=gcp.container.ClusterReleaseChannelArgs(channel=cfg.release_channel),
                deletion_protection=cfg.deletion_protection,
            ),
            opts=child,
        )

    def _system_pool(self, name: str, cfg: StackConfig, cluster: gcp.container.Cluster) -> gcp.container.NodePool:
        """Small CPU pool for kube-system and the LWS controller (TPU nodes are tainted)."""
        return gcp.container.NodePool(
            f"{name}-system",
            gcp.container.NodePoolArgs(
                name="system",
                cluster=cluster.name,
                location=cfg.cluster_location,
                project=cfg.project,
                node_count=cfg.system_node_count,
                node_locations=[cfg.zone],
                management=gcp.container.NodePoolManagementArgs(auto_repair=True, auto_upgrade=True),
                node_config=gcp.container.NodePoolNodeConfigArgs(
                    machine_type=cfg.system_machine_type,
                    oauth_scopes=[CLOUD_PLATFORM_SCOPE],
                    workload_metadata_config=GKE_METADATA,
                ),
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
