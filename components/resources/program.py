"""The stack program: config in, components wired, outputs out. `__main__.py` calls `load()` then `build()`.

Order matters only through explicit dependencies: the LeaderWorkerSet depends on the LWS
controller (CRD), the TPU node pools and the identity; everything Kubernetes goes through the
cluster's explicit provider (no ambient kubeconfig).
"""

from __future__ import annotations

from typing import Any, Mapping

import pulumi

from components.core import manifests
from components.core.config import PROJECT, StackConfig, parse_stack_config
from components.core.errors import ConfigError
from components.resources.gke import GkeCluster
from components.resources.identity import ServingIdentity
from components.resources.jetstream import JetStreamServer
from components.resources.lws_controller import LeaderWorkerSetController
from components.core.planner import Plan, plan_deployment


def project_config_values() -> dict[str, str]:
    """This project's config values with the `<project>:` namespace stripped."""
    merged: Mapping[str, Any] = {**pulumi.runtime.config.get_config_env(), **pulumi.runtime.config.CONFIG.get()}
    prefix = f"{PROJECT}:"
    return {key.removeprefix(prefix): value for key, value in merged.items() if key.startswith(prefix)}


def load() -> tuple[StackConfig, Plan]:
    """Parse and plan, before any resource exists; a bad config stops the program here."""
    try:
        cfg = parse_stack_config(project_config_values(), project=pulumi.Config("gcp").get("project"), stack=pulumi.get_stack())
        return cfg, plan_deployment(cfg)
    except ConfigError as error:
        raise pulumi.RunError(str(error)) from None


def build(cfg: StackConfig, plan: Plan) -> dict[str, Any]:
    """Create the components; return the stack outputs."""
    identity = ServingIdentity("identity", cfg)
    cluster = GkeCluster("gke", cfg)
    controller = LeaderWorkerSetController("lws", cfg.lws_version, cluster.provider)
    JetStreamServer(
        "jetstream", cfg, plan,
        provider=cluster.provider,
        service_account_email=identity.service_account_email,
        depends_on=[controller, *cluster.node_pools, identity],
    )
    return {
        "clusterName": cluster.cluster_name,
        "clusterEndpoint": cluster.endpoint,
        "kubeconfig": cluster.kubeconfig,
        "namespace": cfg.namespace,
        "lwsName": cfg.app_name,
        "lwsVersion": cfg.lws_version,
        "headPod": manifests.head_pod(cfg),
        "serviceName": cfg.service_name,
        "serviceUrl": manifests.service_url(cfg),
        "portForwardCommand": manifests.port_forward_command(cfg),
        "curlExample": manifests.curl_example(),
        "scratchBucket": identity.scratch_bucket.name,
        "serviceAccountEmail": identity.service_account_email,
        "plan": plan.summary(),
    }

