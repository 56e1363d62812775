"""GKE Inference Gateway in front of the replicas: config keys, and the objects as data.

Pure, no Pulumi: `parse_gateway` reads the `gateway` keys, `RoutedPool` describes what one
serving stack routes, and `gateway_manifests` builds its objects as dicts, the last step before
they are applied (`components.resources.gateway`) or printed (`components.render`).

How a request travels, as GKE documents it (https://cloud.google.com/kubernetes-engine/docs/concepts/about-gke-inference-gateway)
and the Gateway API Inference Extension implements it (kubernetes-sigs/gateway-api-inference-extension):
  1. a GKE `Gateway` (class `gke-l7-rilb`: an internal regional Application Load Balancer, or
     `gke-l7-regional-external-managed`: a regional external one) listens on port 80; its proxies
     run in the region's proxy-only subnet;
  2. an `HTTPRoute` sends every path to an `InferencePool` (inference.networking.k8s.io/v1) that
     selects the replicas' leader pods (the Service's selector) on the HTTP port;
  3. for each request the load balancer asks the pool's endpoint picker (EPP, an ext-proc gRPC
     service) which pod to use; the picker scores every pod from the metrics it scrapes from the
     pods' /metrics under vLLM's names (the model-server protocol): queue length, KV-cache use and
     the prompt prefixes it has sent there before (`PICKER_SCORERS`);
  4. GKE health-checks the pool's pods as its `HealthCheckPolicy` says and applies the backend
     timeout of its `GCPBackendPolicy`.
The picker and the policies are what the extension's `inferencepool` Helm chart renders with
`provider.name=gke` at EXTENSION_VERSION (config/charts/inferencepool), written out here as data so
that `pulumi preview` diffs them and the tests validate them: no chart values to keep in sync.

Who owns what: the proxy-only subnet, the Gateway API on the cluster and the InferencePool CRD are
cluster-wide (one per region and VPC, one per cluster), so the stack that creates the cluster
creates them (role=all, role=platform); each stack that serves owns its Gateway, HTTPRoute, pool,
picker and policies, in its namespace, so stacks never route to each other's pods.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping

import yaml

from components.core.config_keys import ConfigKey, is_set, read_choice, read_text
from components.core.errors import ConfigError

NONE, INTERNAL, EXTERNAL = "none", "internal", "external"
MODES = (NONE, INTERNAL, EXTERNAL)
# GKE's GatewayClasses of the regional Application Load Balancers (both use the proxy-only subnet).
GATEWAY_CLASSES = {INTERNAL: "gke-l7-rilb", EXTERNAL: "gke-l7-regional-external-managed"}
LISTENER_PORT = 80
GATEWAY_API_CHANNEL = "CHANNEL_STANDARD"  # GKE's Gateway API install on the cluster (gcloud --gateway-api=standard)

# The extension release whose chart, picker image and CRDs this module follows.
EXTENSION_VERSION = "v1.3.0"
PICKER_IMAGE = f"registry.k8s.io/gateway-api-inference-extension/epp:{EXTENSION_VERSION}"
CRD_MANIFEST_URL = (
    f"https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/download/"
    f"{EXTENSION_VERSION}/manifests.yaml"
)
POOL_API_VERSION = "inference.networking.k8s.io/v1"
POOL_GROUP = POOL_API_VERSION.split("/")[0]
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
GKE_POLICY_API_VERSION = "networking.gke.io/v1"
# The picker's ports, as the chart declares them.
EXT_PROC_PORT = 9002
PICKER_HEALTH_PORT = 9003
PICKER_METRICS_PORT = 9090
PICKER_CONFIG_FILE = "default-plugins.yaml"
# The chart's default scheduling profile: each scorer's weight in the picker's sum.
PICKER_SCORERS = {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}
# The chart's GKE policies: a 2 s health check (fast failover) and a 5-minute backend timeout.
HEALTH_CHECK_SECONDS = 2
BACKEND_TIMEOUT_SECONDS = 300
# The chart keeps the picker alive as long as the longest grace period of the pool's pods.
PICKER_GRACE_SECONDS = 130
ADDRESS_PATH = "{.status.addresses[0].value}"  # where the Gateway reports its IP
WAIT_FOR = "pulumi.com/waitFor"
# One /23 is what Google's examples give the proxy-only subnet; outside the 10.128.0.0/9 block
# that auto-mode VPCs (the default network) carve their regional subnets from.
DEFAULT_PROXY_SUBNET_RANGE = "10.127.0.0/23"
EXISTING_SUBNET = ""  # gatewayProxySubnetRange "": the VPC already has the region's proxy-only subnet


@dataclasses.dataclass(frozen=True)
class ModelServerProtocol:
    """How a server runtime speaks the extension's model-server protocol: the picker's flags that
    differ from its defaults (the metric names are vLLM's unless a flag names the runtime's own)."""

    picker_flags: tuple[tuple[str, str], ...] = ()


# The server runtimes a gateway can route to (an OpenAI API and the protocol's metrics). The
# bundled server exports the vLLM names itself (serving/server/metrics.py); it has no LoRA
# adapters and no block cache to describe, so the picker is told not to scrape those two metrics.
PROTOCOL_RUNTIMES: dict[str, ModelServerProtocol] = {
    "bundled": ModelServerProtocol(picker_flags=(("lora-info-metric", ""), ("cache-info-metric", ""))),
    "vllm": ModelServerProtocol(),  # exports the protocol's metrics under their own names
}

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        name="gateway",
        type="string",
        default=NONE,
        description="GKE Inference Gateway in front of the replicas: none (the Service only), internal (an "
        "internal regional Application Load Balancer, gke-l7-rilb) or external (a regional external one). Needs "
        "serverRuntime=bundled. On role=platform, any value but none prepares the cluster (proxy-only subnet, "
        "Gateway API, InferencePool CRD).",
    ),
    ConfigKey(
        name="gatewayProxySubnetRange",
        type="string",
        default=DEFAULT_PROXY_SUBNET_RANGE,
        description="With gateway on a cluster the stack creates: the CIDR range of the region's proxy-only "
        "subnet it creates (/26 or larger, free in the VPC); empty = the VPC already has one in the cluster's region.",
    ),
)
KEYS_BY_NAME = {key.name: key for key in CONFIG_KEYS}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    """The `gateway` keys, typed."""

    mode: str  # none | internal | external
    proxy_subnet_range: str  # EXISTING_SUBNET: the VPC has one

    @property
    def enabled(self) -> bool:
        return self.mode != NONE

    @property
    def gateway_class(self) -> str:
        return GATEWAY_CLASSES[self.mode]

    @property
    def creates_proxy_subnet(self) -> bool:
        return self.enabled and self.proxy_subnet_range != EXISTING_SUBNET


OFF = GatewaySettings(mode=NONE, proxy_subnet_range=EXISTING_SUBNET)


def _mode(raw: Mapping[str, str]) -> str:
    suggestion = "pulumi config set gateway internal (reachable from the VPC) or none (the Service only)"
    return read_choice(raw, KEYS_BY_NAME["gateway"], MODES, suggestion)


def _proxy_subnet_range(raw: Mapping[str, str]) -> str:
    text = read_text(raw, KEYS_BY_NAME["gatewayProxySubnetRange"])
    if text == EXISTING_SUBNET:
        return text
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        network = None
    # Google requires a private IPv4 range of at least /26 for a proxy-only subnet.
    if network is None or network.version != 4 or network.prefixlen > 26 or not network.is_private:
        raise ConfigError(
            "gatewayProxySubnetRange",
            f"{text!r} is not a private IPv4 CIDR range of /26 or larger",
            f"pulumi config set gatewayProxySubnetRange {DEFAULT_PROXY_SUBNET_RANGE}, or empty if the VPC has one",
        )
    return str(network)


def parse_gateway(
    raw: Mapping[str, str], *, server_runtime: str | None, creates_cluster: bool = True
) -> GatewaySettings:
    """The gateway settings; `server_runtime` None for a platform stack (it serves nothing).

    A stack that serves needs a runtime of PROTOCOL_RUNTIMES. The subnet range is refused where it
    cannot be used: without a gateway (a forgotten `gateway`), and on a cluster the stack does not
    create (the subnet is that cluster owner's)."""
    if not creates_cluster and is_set(raw, KEYS_BY_NAME["gatewayProxySubnetRange"]):
        raise ConfigError(
            ("gatewayProxySubnetRange", "existingClusterName"),
            "is set, but the stack does not create its cluster: the proxy-only subnet is the cluster owner's",
            "remove gatewayProxySubnetRange; the VPC of the existing cluster needs a proxy-only subnet in its region",
        )
    mode = _mode(raw)
    if mode == NONE:
        if is_set(raw, KEYS_BY_NAME["gatewayProxySubnetRange"]):
            raise ConfigError(
                ("gatewayProxySubnetRange", "gateway"),
                "is set but gateway is none",
                "pulumi config set gateway internal, or remove gatewayProxySubnetRange",
            )
        return OFF
    if server_runtime is not None and server_runtime not in PROTOCOL_RUNTIMES:
        raise ConfigError(
            ("gateway", "serverRuntime"),
            f"serverRuntime={server_runtime} cannot sit behind GKE Inference Gateway: its endpoint picker routes "
            f"OpenAI API requests on metrics of the model-server protocol, and {server_runtime}'s HTTP front end "
            "serves /generate only and exports neither vllm:num_requests_waiting nor a KV-cache fraction",
            f"pulumi config set serverRuntime {' or '.join(PROTOCOL_RUNTIMES)}, or gateway none",
        )
    return GatewaySettings(mode=mode, proxy_subnet_range=_proxy_subnet_range(raw))


# ---------------------------------------------------------------------------------------------
# The objects of one serving stack.


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutedPool:
    """What one serving stack puts behind its gateway."""

    name: str  # the pool, its Gateway, HTTPRoute and policies (the picker's objects: `picker_name`)
    namespace: str
    selector: Mapping[str, str]  # the leader pods: the Service's selector
    target_port: int  # the pods' HTTP port (OpenAI API and /metrics)
    health_path: str
    gateway_class: str
    protocol: ModelServerProtocol

    @property
    def picker_name(self) -> str:
        return f"{self.name}-epp"  # the chart's name: <release>-epp

    @property
    def picker_labels(self) -> dict[str, str]:
        """The chart's selector labels of the picker (never the pool's, so it is not routed to)."""
        return {"inferencepool": self.picker_name}


def _metadata(pool: RoutedPool, name: str, **extra) -> dict:
    labels = {"app.kubernetes.io/name": pool.picker_name, "app.kubernetes.io/version": EXTENSION_VERSION}
    return {"name": name, "namespace": pool.namespace, "labels": labels, **extra}


def gateway(pool: RoutedPool) -> dict:
    """The load balancer; Pulumi waits until GKE has given it an address (the client outputs use it)."""
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": _metadata(pool, pool.name, annotations={WAIT_FOR: f"jsonpath={ADDRESS_PATH}"}),
        "spec": {
            "gatewayClassName": pool.gateway_class,
            "listeners": [{"name": "http", "protocol": "HTTP", "port": LISTENER_PORT}],
        },
    }


def http_route(pool: RoutedPool) -> dict:
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": _metadata(pool, pool.name),
        "spec": {
            "parentRefs": [{"group": GATEWAY_API_VERSION.split("/")[0], "kind": "Gateway", "name": pool.name}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"group": POOL_GROUP, "kind": "InferencePool", "name": pool.name}],
                }
            ],
        },
    }


def inference_pool(pool: RoutedPool) -> dict:
    return {
        "apiVersion": POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": _metadata(pool, pool.name),
        "spec": {
            "targetPorts": [{"number": pool.target_port}],
            "selector": {"matchLabels": dict(pool.selector)},
            "endpointPickerRef": {"name": pool.picker_name, "port": {"number": EXT_PROC_PORT}},
        },
    }


def _policy_target(pool: RoutedPool) -> dict:
    return {"group": POOL_GROUP, "kind": "InferencePool", "name": pool.name}


def health_check_policy(pool: RoutedPool) -> dict:
    return {
        "apiVersion": GKE_POLICY_API_VERSION,
        "kind": "HealthCheckPolicy",
        "metadata": _metadata(pool, pool.name),
        "spec": {
            "targetRef": _policy_target(pool),
            "default": {
                "timeoutSec": HEALTH_CHECK_SECONDS,
                "checkIntervalSec": HEALTH_CHECK_SECONDS,
                "config": {
                    "type": "HTTP",
                    "httpHealthCheck": {"requestPath": pool.health_path, "port": pool.target_port},
                },
            },
        },
    }


def backend_policy(pool: RoutedPool) -> dict:
    return {
        "apiVersion": GKE_POLICY_API_VERSION,
        "kind": "GCPBackendPolicy",
        "metadata": _metadata(pool, pool.name),
        "spec": {
            "targetRef": _policy_target(pool),
            "default": {"timeoutSec": BACKEND_TIMEOUT_SECONDS, "logging": {"enabled": True}},
        },
    }


def picker_config() -> str:
    """The picker's plugin file: the chart's default profile (PICKER_SCORERS)."""
    return yaml.safe_dump(
        {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
            "kind": "EndpointPickerConfig",
            "plugins": [{"type": scorer} for scorer in PICKER_SCORERS],
            "schedulingProfiles": [
                {
                    "name": "default",
                    "plugins": [{"pluginRef": scorer, "weight": weight} for scorer, weight in PICKER_SCORERS.items()],
                }
            ],
        },
        sort_keys=False,
    )


def picker_args(pool: RoutedPool) -> list[str]:
    """The chart's command line of the picker, then the runtime's protocol flags."""
    flags = [
        ("pool-name", pool.name),
        ("pool-namespace", pool.namespace),
        ("pool-group", POOL_GROUP),
        ("zap-encoder", "json"),
        ("config-file", f"/config/{PICKER_CONFIG_FILE}"),
        ("v", "1"),
        *pool.protocol.picker_flags,
    ]
    return [*(part for flag, value in flags for part in (f"--{flag}", value)), "--tracing=false"]


def _grpc_probe(**timing) -> dict:
    return {"grpc": {"port": PICKER_HEALTH_PORT, "service": "inference-extension"}, **timing}


def picker_deployment(pool: RoutedPool) -> dict:
    """One picker replica, replaced (not rolled) on change, as the chart runs it: its prefix
    scorer's memory of which pod saw which prompt lives in that one process."""
    field = {"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    container = {
        "name": "epp",
        "image": PICKER_IMAGE,
        "imagePullPolicy": "IfNotPresent",  # pinned by tag
        "args": picker_args(pool),
        "ports": [
            {"name": "grpc", "containerPort": EXT_PROC_PORT},
            {"name": "grpc-health", "containerPort": PICKER_HEALTH_PORT},
            {"name": "metrics", "containerPort": PICKER_METRICS_PORT},
        ],
        "livenessProbe": _grpc_probe(initialDelaySeconds=5, periodSeconds=10),
        "readinessProbe": _grpc_probe(periodSeconds=2),
        "env": [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}} for name, path in field.items()],
        "volumeMounts": [{"name": "plugins-config-volume", "mountPath": "/config"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(pool, pool.picker_name),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": pool.picker_labels},
            "template": {
                "metadata": {"labels": pool.picker_labels},
                "spec": {
                    "serviceAccountName": pool.picker_name,
                    "terminationGracePeriodSeconds": PICKER_GRACE_SECONDS,
                    "containers": [container],
                    "volumes": [{"name": "plugins-config-volume", "configMap": {"name": pool.picker_name}}],
                },
            },
        },
    }


def picker_service(pool: RoutedPool) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, pool.picker_name),
        "spec": {
            "type": "ClusterIP",
            "selector": pool.picker_labels,
            "ports": [
                {"name": "grpc-ext-proc", "protocol": "TCP", "port": EXT_PROC_PORT},
                {"name": "http-metrics", "protocol": "TCP", "port": PICKER_METRICS_PORT},
            ],
        },
    }


def picker_access(pool: RoutedPool) -> list[dict]:
    """The picker's ServiceAccount and what it may read in the namespace: the pool, the pods (whose
    metrics it scrapes) and the extension's objectives and rewrites (the chart's Role)."""
    rules = [
        {
            "apiGroups": ["inference.networking.x-k8s.io"],
            "resources": ["inferenceobjectives", "inferencemodelrewrites"],
            "verbs": ["get", "watch", "list"],
        },
        {"apiGroups": [POOL_GROUP], "resources": ["inferencepools"], "verbs": ["get", "watch", "list"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "watch", "list"]},
    ]
    subject = {"kind": "ServiceAccount", "name": pool.picker_name, "namespace": pool.namespace}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(pool, pool.picker_name)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(pool, pool.picker_name),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(pool, pool.picker_name),
            "subjects": [subject],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": pool.picker_name},
        },
    ]


def picker_config_map(pool: RoutedPool) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(pool, pool.picker_name),
        "data": {PICKER_CONFIG_FILE: picker_config()},
    }


def picker_manifests(pool: RoutedPool) -> list[dict]:
    """The endpoint picker, in apply order: access, config, then the Deployment and its Service."""
    return [*picker_access(pool), picker_config_map(pool), picker_deployment(pool), picker_service(pool)]


def gateway_manifests(pool: RoutedPool) -> list[dict]:
    """Everything one serving stack applies for its gateway, in apply order."""
    return [
        *picker_manifests(pool),
        inference_pool(pool),
        health_check_policy(pool),
        backend_policy(pool),
        gateway(pool),
        http_route(pool),
    ]


def gateway_url(address: str) -> str:
    """Where clients reach the Gateway's listener (port 80, HTTP's default: no port in the URL)."""
    return f"http://{address}"


def gateway_address(status: Mapping | None) -> str:
    """The first address a live Gateway reports; ValueError while it has none."""
    addresses = (status or {}).get("addresses") or []
    if not addresses:
        raise ValueError("the Gateway has no address yet (status.addresses is empty)")
    return addresses[0]["value"]
