"""The stack program: config in, components wired, outputs out. `__main__.py` calls `load()` then `build()`.

`load()` reads the config through `pulumi.Config`, parses, plans and proves the pods can be
scheduled, all before any resource exists. `build()` builds each component's Args once, here,
from the config and the plan. Order comes only from explicit dependencies, and everything
Kubernetes goes through the cluster's explicit provider (no ambient kubeconfig).

role=all (one stack):
  node identity -> cluster and node pools -> serving identity (the Workload Identity binding
  needs the cluster's identity pool) -> LWS controller -> the LeaderWorkerSet, which waits for the
  controller, the TPU node pools, the identity and, with serverRuntime=bundled and no image, the
  server image the stack builds -> with autoscaling, the metrics adapter (only on a cluster the
  stack creates; its Workload Identity binding waits for the cluster too), the PodMonitoring and
  the HPA of the LeaderWorkerSet; the admission policy that reserves the stack's TPU nodes to its namespace.
  With `gateway` set: on a cluster the stack creates, the Gateway API and the gateway's
  cluster-wide parts (proxy-only subnet, InferencePool CRD); then, after the workload, its
  Gateway, HTTPRoute, InferencePool, endpoint picker and policies, and the client outputs
  (httpUrl, openaiBaseUrl, and gatewayUrl) point through the Gateway.
role=platform: node identity -> cluster and system pool -> LWS controller and metrics adapter
  (cluster-wide, shared by the serving stacks), and with `gateway` set the gateway's cluster-wide
  parts; exports exactly PLATFORM_OUTPUTS.
role=serving: the platform's outputs (PlatformReference) and the stack's own node identity ->
  TPU node pools on the platform's cluster, running as that identity -> serving identity -> the
  LeaderWorkerSet (and PodMonitoring and HPA); no cluster, no LWS install, no adapter.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi.runtime.config
import pulumi_gcp as gcp

from components.core import admission, manifests, scheduling, server_secrets
from components.core.config import PlatformConfig, StackConfig, parse_stack_config
from components.core.config_roles import PLATFORM_OUTPUTS
from components.core.config_table import PROJECT
from components.core.errors import ConfigError
from components.core.naming import proxy_subnet_name
from components.core.node_pools import NodePoolSpec, system_node_pool, tpu_node_pools
from components.core.planner import Plan, plan_deployment
from components.core.runtimes import bundled
from components.resources.admission import StackIsolation, StackIsolationArgs
from components.resources.autoscaling import (
    LeaderWorkerSetAutoscaler,
    LeaderWorkerSetAutoscalerArgs,
    MetricsAdapter,
    MetricsAdapterArgs,
)
from components.resources.gateway import (
    GatewayClusterParts,
    GatewayClusterPartsArgs,
    InferenceGateway,
    InferenceGatewayArgs,
)
from components.resources.gke import ATTACH, CREATE, LOOKUP, GkeCluster, GkeClusterArgs
from components.resources.identity import NodeIdentity, NodeIdentityArgs, ServingIdentity, ServingIdentityArgs
from components.resources.jetstream import JetStreamServer, JetStreamServerArgs
from components.resources.lws_controller import LeaderWorkerSetController, LeaderWorkerSetControllerArgs
from components.resources.platform import PlatformReference, PlatformReferenceArgs
from components.resources.server_image import BundledServerImage, BundledServerImageArgs

# The bundled server's image, as the stack builds it (serving/Dockerfile documents the build).
DOCKERFILE = "serving/Dockerfile"
BUILD_CONTEXT = "."  # the repository root: the Dockerfile copies serving/ from there
TPU_BUILD_ARGS = {"JAX_EXTRA": "tpu"}
TPU_HOST_PLATFORM = "linux/amd64"  # TPU v6e hosts are x86-64 VMs


def project_config_values() -> dict[str, str]:
    """Every value of this project's namespace the program was given, declared or not, by key.
    The CLI no longer refuses keys Pulumi.yaml does not declare, so reading only the declared
    ones would let a typo fall back to the default; parse_stack_config refuses unknown keys."""
    given = {**pulumi.runtime.config.get_config_env(), **pulumi.runtime.config.CONFIG.get()}
    prefix = f"{PROJECT}:"
    return {name.removeprefix(prefix): str(value) for name, value in given.items() if name.startswith(prefix)}


def load() -> tuple[StackConfig | PlatformConfig, Plan | None]:
    """Parse, plan and check scheduling before any resource exists; a bad config stops here.
    A platform stack has no workload, so no plan."""
    try:
        cfg = parse_stack_config(
            project_config_values(), project=pulumi.Config("gcp").get("project"), stack=pulumi.get_stack()
        )
        if isinstance(cfg, PlatformConfig):
            return cfg, None
        plan = plan_deployment(cfg)
        scheduling.check_deployment(cfg, plan)
        return cfg, plan
    except ConfigError as error:
        raise pulumi.RunError(str(error)) from None


def build(cfg: StackConfig | PlatformConfig, plan: Plan | None) -> dict[str, Any]:
    """Create the components; return the stack outputs."""
    if isinstance(cfg, PlatformConfig):
        return build_platform(cfg)
    return build_serving(cfg, plan)


def build_platform(cfg: PlatformConfig) -> dict[str, Any]:
    """The cluster and what every serving stack on it shares; exactly PLATFORM_OUTPUTS."""
    nodes = _node_identity(cfg)
    cluster = GkeCluster(
        "gke", _owned_cluster_args(cfg, nodes.email, tpu_pools=()), pulumi.ResourceOptions(depends_on=nodes.roles)
    )
    _lws_controller(cfg, cluster.provider)
    # Cluster-wide like the LWS controller, so the platform owns it and any serving stack can autoscale.
    _metrics_adapter(cfg, cluster)
    _gateway_cluster_parts(cfg, cluster)
    return dict(
        zip(
            PLATFORM_OUTPUTS,
            (cluster.cluster_name, cluster.location, cluster.project, cluster.kubeconfig),
            strict=False,
        )
    )


def build_serving(cfg: StackConfig, plan: Plan) -> dict[str, Any]:
    """The model server, on a cluster of its own (role=all) or the platform's (role=serving)."""
    cluster, node_service_account = _cluster(cfg)
    # Only this stack's namespace may use its TPU nodes (components/core/admission.py).
    isolation = StackIsolationArgs(policy=admission.isolation_policy(cfg), binding=admission.isolation_binding(cfg))
    StackIsolation("isolation", isolation, pulumi.ResourceOptions(provider=cluster.provider))
    # The Workload Identity binding needs the pool, which exists once a cluster with Workload Identity does.
    needs_pool = cfg.pods_use_workload_identity and cluster.cluster is not None
    identity = ServingIdentity(
        "identity",
        _identity_args(cfg, node_service_account),
        pulumi.ResourceOptions(depends_on=[cluster.cluster] if needs_pool else None),
    )
    lws_prerequisites: list[pulumi.Resource] = [
        *cluster.tpu_node_pools,
        identity,
        *_lws_controller(cfg, cluster.provider),
    ]
    server_image = None
    if cfg.builds_server_image:
        image = BundledServerImage("server-image", _image_args(cfg))
        server_image, lws_prerequisites = image.ref, [*lws_prerequisites, image]
    server = JetStreamServer(
        "jetstream",
        _server_args(cfg, plan, identity.service_account_email, server_image),
        pulumi.ResourceOptions(provider=cluster.provider, depends_on=lws_prerequisites),
    )
    if cfg.scaling.enabled:
        # The HPA reads the metrics through the cluster's one adapter: this stack's on a cluster it
        # creates; otherwise the platform's (role=serving) or the existing cluster owner's.
        adapter = [_metrics_adapter(cfg, cluster)] if cfg.installs_metrics_adapter else []
        pod_monitoring, hpa = manifests.scaling_manifests(cfg)
        LeaderWorkerSetAutoscaler(
            "autoscaling",
            LeaderWorkerSetAutoscalerArgs(pod_monitoring=pod_monitoring, horizontal_pod_autoscaler=hpa),
            pulumi.ResourceOptions(provider=cluster.provider, depends_on=[server, *adapter]),
        )
    client_endpoints, gateway_outputs = server.client_endpoints, {}
    if cfg.gateway.enabled:
        routed = _inference_gateway(cfg, cluster, server)
        client_endpoints = pulumi.Output.all(client_endpoints, routed.url).apply(
            lambda parts: manifests.through_gateway(*parts)
        )
        gateway_outputs = {"gatewayUrl": routed.url}
    outputs = {
        **{
            name: client_endpoints.apply(lambda endpoints, name=name: endpoints[name])
            for name in manifests.CLIENT_OUTPUTS
        },
        **gateway_outputs,
        "clusterName": cluster.cluster_name,
        "namespace": server.namespace,
        "lwsName": server.lws_name,
        "headPod": manifests.head_pod(cfg),
        "serviceName": server.service_name,
        "portForwardCommand": manifests.port_forward_command(cfg),
        "curlExample": manifests.curl_example(cfg),
        "scratchBucket": identity.scratch_bucket_name,
        "serviceAccountEmail": identity.service_account_email,
        "plan": plan.summary(),
    }
    if not cfg.serving_role:  # the cluster's own outputs; a serving stack's come from the platform stack
        outputs |= {
            "clusterEndpoint": cluster.endpoint,
            "kubeconfig": cluster.kubeconfig,
            "lwsVersion": cfg.cluster.lws_version,
        }
    return outputs


def _cluster(cfg: StackConfig) -> tuple[GkeCluster, pulumi.Output[str]]:
    """The cluster with this stack's TPU pools, and the service account the pools run as: the
    stack's own, also on a platform's cluster (its Pathways pods act as it: no stack reads
    another's buckets, and no two stacks declare the same bucket grants)."""
    nodes = _node_identity(cfg)
    after_roles = pulumi.ResourceOptions(depends_on=nodes.roles)
    if cfg.serving_role:
        platform = PlatformReference(
            "platform", PlatformReferenceArgs(cluster_stack=cfg.cluster_stack, project=cfg.project)
        )
        return GkeCluster(
            "gke",
            GkeClusterArgs(
                project=platform.project,
                location=platform.cluster_location,
                cluster_name=platform.cluster_name,
                source=ATTACH,
                kubeconfig=platform.kubeconfig,
                release_channel=None,  # the pools follow the live cluster's (GkeCluster reads it)
                deletion_protection=cfg.cluster.deletion_protection,
                system_pool=None,
                tpu_pools=tpu_node_pools(cfg),
                node_service_account=nodes.email,
            ),
            after_roles,
        ), nodes.email
    return GkeCluster(
        "gke", _owned_cluster_args(cfg, nodes.email, tpu_pools=tpu_node_pools(cfg)), after_roles
    ), nodes.email


def _node_identity(cfg: StackConfig | PlatformConfig) -> NodeIdentity:
    """The service account this stack's node pools run as (its own in every role)."""
    return NodeIdentity(
        "nodes", NodeIdentityArgs(project=cfg.project, account_id=cfg.node_service_account_id, stack=cfg.stack)
    )


def _owned_cluster_args(
    cfg: StackConfig | PlatformConfig, node_service_account: pulumi.Output[str], tpu_pools: tuple[NodePoolSpec, ...]
) -> GkeClusterArgs:
    """A cluster a role=all or platform stack creates (or, role=all, looks up)."""
    return GkeClusterArgs(
        project=cfg.project,
        location=cfg.cluster.location,
        cluster_name=cfg.cluster.name,
        source=LOOKUP if cfg.cluster.existing else CREATE,
        release_channel=None if cfg.cluster.existing else cfg.cluster.release_channel,
        deletion_protection=cfg.cluster.deletion_protection,
        system_pool=system_node_pool(cfg),
        tpu_pools=tpu_pools,
        node_service_account=node_service_account,
        private_endpoint=cfg.cluster.private_endpoint,
        authorized_networks=cfg.cluster.authorized_networks,
        gateway_api=cfg.gateway.enabled,
    )


def _lws_controller(cfg: StackConfig | PlatformConfig, provider: pulumi.ProviderResource) -> list[pulumi.Resource]:
    """The cluster-wide LWS controller, where this stack installs it (installLwsController)."""
    if not cfg.cluster.install_lws_controller:
        return []
    controller = LeaderWorkerSetControllerArgs(
        version=cfg.cluster.lws_version, keep_on_destroy=cfg.cluster.keep_lws_controller
    )
    return [LeaderWorkerSetController("lws", controller, pulumi.ResourceOptions(provider=provider))]


def _metrics_adapter(cfg: StackConfig | PlatformConfig, cluster: GkeCluster) -> MetricsAdapter:
    """The adapter, on a cluster the stack creates: its identity's binding names the cluster's
    Workload Identity pool, which exists once that cluster does."""
    return MetricsAdapter(
        "metrics-adapter",
        MetricsAdapterArgs(project=cfg.project),
        pulumi.ResourceOptions(provider=cluster.provider, depends_on=[cluster.cluster]),
    )


def _gateway_cluster_parts(cfg: StackConfig | PlatformConfig, cluster: GkeCluster) -> list[pulumi.Resource]:
    """The proxy-only subnet and the InferencePool CRD, on a cluster the stack creates (and with
    the Gateway API on, see _owned_cluster_args); on any other cluster they are its owner's."""
    if not cfg.gateway.enabled or cluster.cluster is None:
        return []
    settings = cfg.gateway
    args = GatewayClusterPartsArgs(
        project=cfg.project,
        region=cfg.cluster.region,
        network=cluster.network,
        subnet_name=proxy_subnet_name(cfg.stack),
        subnet_range=settings.proxy_subnet_range if settings.creates_proxy_subnet else None,
    )
    after_cluster = pulumi.ResourceOptions(provider=cluster.provider, depends_on=[cluster.cluster])
    return [GatewayClusterParts("gateway-cluster", args, after_cluster)]


def _inference_gateway(cfg: StackConfig, cluster: GkeCluster, server: JetStreamServer) -> InferenceGateway:
    """The stack's Gateway and what it routes through, after the workload (its namespace)."""
    cluster_parts = _gateway_cluster_parts(cfg, cluster)
    after = pulumi.ResourceOptions(provider=cluster.provider, depends_on=[server, *cluster_parts])
    return InferenceGateway("gateway", InferenceGatewayArgs(manifests=manifests.gateway_manifests(cfg)), after)


def _identity_args(cfg: StackConfig, node_service_account: pulumi.Output[str]) -> ServingIdentityArgs:
    workload = cfg.pods_use_workload_identity
    return ServingIdentityArgs(
        project=cfg.project,
        stack=cfg.stack,
        scratch_bucket=cfg.scratch_bucket,
        bucket_location=cfg.cluster.region.upper(),
        checkpoint_bucket=cfg.checkpoint_bucket,
        workload_account_id=cfg.workload_service_account_id if workload else None,
        workload_identity_member=workload_identity_member(cfg) if workload else None,
        node_service_account=None if workload else node_service_account,
    )


def workload_identity_member(cfg: StackConfig) -> str:
    return f"serviceAccount:{cfg.project}.svc.id.goog[{cfg.names.namespace}/{cfg.names.kubernetes_service_account}]"


def _image_args(cfg: StackConfig) -> BundledServerImageArgs:
    return BundledServerImageArgs(
        project=cfg.project,
        location=cfg.cluster.region,
        repository_id=cfg.artifact_repository_id,
        image=cfg.bundled_image_repository,
        tag=bundled.IMAGE_TAG,
        context=BUILD_CONTEXT,
        dockerfile=DOCKERFILE,
        build_args=TPU_BUILD_ARGS,
        platform=TPU_HOST_PLATFORM,
    )


def _server_args(
    cfg: StackConfig, plan: Plan, pods_identity: pulumi.Output[str], server_image: pulumi.Output[str] | None
) -> JetStreamServerArgs:
    return JetStreamServerArgs(
        namespace=manifests.namespace(cfg),
        # The created GSA's email (an Output), so the KSA also waits for the GSA.
        service_account=manifests.service_account(cfg, pods_identity),
        leader_worker_set=manifests.leader_worker_set(cfg, plan, server_image),
        service=manifests.service(cfg),
        secrets=_secrets(cfg),
        ready_timeout_seconds=manifests.ready_timeout_seconds(cfg) if cfg.wait_for_ready else None,
        serves_openai=cfg.runtime.serves_openai,
        autoscaled=cfg.scaling.enabled,
    )


def _secrets(cfg: StackConfig) -> tuple[dict, ...]:
    """The Kubernetes Secrets the server reads (server_secrets.py): each from its Secret Manager secret,
    read at deploy time with the deployer's credentials, so no value is ever in the stack's config."""
    return tuple(
        server_secrets.kubernetes_secret(
            secret,
            cfg.names.namespace,
            pulumi.Output.secret(
                gcp.secretmanager.get_secret_version_output(secret=secret.secret_id, project=cfg.project).secret_data
            ),
        )
        for secret in cfg.runtime.secret_envs(cfg)
    )
