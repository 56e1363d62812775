"""Offline render: `python -m components.render --stack <name>`, like `helm template`.

Reads `Pulumi.<stack>.yaml`, runs the same parsing, planning and scheduling check as `pulumi
preview`, prints the plan summary (as YAML comments) and the Kubernetes objects as multi-document
YAML that `kubectl apply -f -` accepts on a cluster with the LWS controller: the Namespace (unless
`default`), the ServiceAccount the pods run as, the LeaderWorkerSet and the Service, and with
autoscaling the PodMonitoring and the HorizontalPodAutoscaler, built by the same functions the
components use. No cloud, no Pulumi CLI, no Pulumi SDK. A bad config prints
the same error as preview on stderr and exits 2. The plan says whether the stack installs the
cluster-wide pieces (`lwsController`, and with autoscaling `metricsAdapter`) or who does. With
`gateway` set it prints the Gateway, HTTPRoute, InferencePool, endpoint picker and GKE policies
too, and the plan says who creates the gateway's cluster-wide parts (`gateway`).

Roles: a platform stack (role=platform) has no workload: the render prints its plan only (the
cluster, the system pool, the node service account, the cluster-wide installs and the outputs it
exports). A serving stack (role=serving) renders like any stack; its cluster is the platform's,
which only a StackReference can read, so the plan names it as a placeholder.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from components.core import gateway, manifests, scheduling, server_secrets
from components.core.autoscaling import ADAPTER_MANIFEST_URL
from components.core.config import PlatformConfig, StackConfig, parse_stack_config
from components.core.config_roles import PLATFORM_OUTPUTS
from components.core.config_table import PROJECT
from components.core.errors import ConfigError
from components.core.naming import proxy_subnet_name
from components.core.node_pools import node_pool_summary, system_node_pool, tpu_node_pools
from components.core.planner import plan_deployment

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _as_config_text(value: Any) -> str:
    """A stack-file value as Pulumi hands it to the program: strings, JSON for structures."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def read_stack_file(path: pathlib.Path) -> tuple[dict[str, str], str | None]:
    """(this project's values without namespace, gcp:project) from a Pulumi.<stack>.yaml."""
    document = yaml.safe_load(path.read_text()) or {}
    values: Mapping[str, Any] = document.get("config") or {}
    prefix = f"{PROJECT}:"
    raw = {key.removeprefix(prefix): _as_config_text(value) for key, value in values.items() if key.startswith(prefix)}
    project = values.get("gcp:project")
    return raw, None if project is None else str(project)


def _as_comments(summary: dict) -> str:
    return "\n".join(f"# {line}" for line in yaml.safe_dump({"plan": summary}, sort_keys=False).splitlines())


def platform_summary(cfg: PlatformConfig) -> dict:
    """What a platform stack creates and exports (it has no workload to render)."""
    return {
        "role": cfg.role,
        "clusterName": cfg.cluster.name,
        "clusterLocation": cfg.cluster.location,
        "releaseChannel": cfg.cluster.release_channel,
        "deletionProtection": cfg.cluster.deletion_protection,
        "nodeServiceAccount": f"{cfg.node_service_account_id}@{cfg.project}.iam.gserviceaccount.com",
        "systemPool": node_pool_summary(system_node_pool(cfg)),
        "lwsController": lws_controller_summary(cfg),
        "metricsAdapter": ADAPTER_MANIFEST_URL,
        **({"gateway": gateway_cluster_summary(cfg)} if cfg.gateway.enabled else {}),
        "outputs": list(PLATFORM_OUTPUTS),
    }


def gateway_cluster_summary(cfg: StackConfig | PlatformConfig) -> dict | str:
    """The gateway's cluster-wide parts the stack creates, or who does (the cluster's owner)."""
    owner = _owner_installs(cfg)
    if owner is not None:
        return f"{owner} (proxy-only subnet, Gateway API, InferencePool CRD)"
    subnet = (
        f"{proxy_subnet_name(cfg.stack)} {cfg.gateway.proxy_subnet_range}"
        if cfg.gateway.creates_proxy_subnet
        else "the VPC's existing one"
    )
    return {
        "proxyOnlySubnet": subnet,
        "gatewayApi": gateway.GATEWAY_API_CHANNEL,
        "inferencePoolCrd": gateway.CRD_MANIFEST_URL,
    }


def _owner_installs(cfg: StackConfig | PlatformConfig) -> str | None:
    """Who installs a cluster-wide piece on a cluster the stack does not own; None if it owns it."""
    if isinstance(cfg, StackConfig) and cfg.serving_role:
        return f"not installed: the platform stack {cfg.cluster_stack} installs it"
    if cfg.cluster.existing:
        return "not installed: the existing cluster's owner installs it"
    return None


def lws_controller_summary(cfg: StackConfig | PlatformConfig) -> str:
    """The LWS release the stack installs, or why it installs none (a cluster-wide install is the cluster owner's)."""
    if cfg.cluster.install_lws_controller:
        return cfg.cluster.lws_version
    return _owner_installs(cfg) or "not installed (installLwsController=never)"


def metrics_adapter_summary(cfg: StackConfig) -> str:
    """The adapter an autoscaled stack installs (only on a cluster it creates), or who provides it."""
    return ADAPTER_MANIFEST_URL if cfg.installs_metrics_adapter else _owner_installs(cfg)


def serving_summary(cfg: StackConfig, plan) -> dict:
    summary = {
        **plan.summary(),
        "nodePoolSpecs": [node_pool_summary(spec) for spec in tpu_node_pools(cfg)],
        "scratchLocation": cfg.scratch_location,
        "headPod": manifests.head_pod(cfg),
        "serviceUrl": manifests.service_url(cfg),
        "portForwardCommand": manifests.port_forward_command(cfg),
        "lwsController": lws_controller_summary(cfg),
    }
    if cfg.scaling.enabled:
        summary["metricsAdapter"] = metrics_adapter_summary(cfg)
    secrets = cfg.runtime.secret_envs(cfg)  # read from Secret Manager at deploy time; offline, where they come from
    if secrets:
        summary["secrets"] = [server_secrets.summary(secret, cfg.names.namespace) for secret in secrets]
    if cfg.gateway.enabled:
        summary["gateway"] = {
            "mode": cfg.gateway.mode,
            "class": cfg.gateway.gateway_class,
            "endpointPicker": gateway.PICKER_IMAGE,
            "cluster": gateway_cluster_summary(cfg),
        }
    if cfg.serving_role:  # read through a StackReference at deploy time; offline, a placeholder
        summary |= {"clusterStack": cfg.cluster_stack, "cluster": f"<clusterName output of stack {cfg.cluster_stack}>"}
    return summary


def render(stack: str, root: pathlib.Path = ROOT) -> str:
    """The YAML text for a stack; raises ConfigError on a bad config."""
    raw, project = read_stack_file(root / f"Pulumi.{stack}.yaml")
    cfg = parse_stack_config(raw, project=project, stack=stack)
    if isinstance(cfg, PlatformConfig):
        return f"{_as_comments(platform_summary(cfg))}\n"
    plan = plan_deployment(cfg)
    scheduling.check_deployment(cfg, plan)
    documents = yaml.safe_dump_all(manifests.all_manifests(cfg, plan), sort_keys=False)
    return f"{_as_comments(serving_summary(cfg, plan))}\n---\n{documents}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.render", description=__doc__.splitlines()[0])
    parser.add_argument("--stack", required=True, help="stack name: reads Pulumi.<stack>.yaml")
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help="project directory (default: this repository)")
    args = parser.parse_args(argv)
    stack_file = args.root / f"Pulumi.{args.stack}.yaml"
    if not stack_file.exists():
        print(f"error: {stack_file} does not exist", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(render(args.stack, args.root))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
