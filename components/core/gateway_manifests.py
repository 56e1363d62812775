"""The objects of one serving stack's GKE Inference Gateway, as dicts.

Built from a `RoutedPool` (what the stack routes to; `manifests.routed_pool` derives it from the
config) and the shared declarations of `gateway.py`, nothing else: the InferencePool, the endpoint
picker (ServiceAccount, Role, RoleBinding, ConfigMap, Deployment, Service), GKE's health-check and
backend policies, the Gateway and the HTTPRoute, in the fields the extension's `inferencepool`
chart renders with `provider.name=gke` (see `gateway.py` for how a request travels through them).
`manifests.gateway_manifests` adds them to the stack's objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import yaml

from components.core.gateway import ADDRESS_PATH, EXTENSION_VERSION, PICKER_IMAGE, PICKER_SCORERS, ModelServerProtocol

LISTENER_PORT = 80
POOL_API_VERSION = "inference.networking.k8s.io/v1"
POOL_GROUP = POOL_API_VERSION.split("/")[0]
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
GKE_POLICY_API_VERSION = "networking.gke.io/v1"
# The picker's ports, as the chart declares them.
EXT_PROC_PORT = 9002
PICKER_HEALTH_PORT = 9003
PICKER_METRICS_PORT = 9090
PICKER_CONFIG_FILE = "default-plugins.yaml"
# The chart's GKE policies: a 2 s health check (fast failover) and a 5-minute backend timeout.
HEALTH_CHECK_SECONDS = 2
BACKEND_TIMEOUT_SECONDS = 300
# The chart keeps the picker alive as long as the longest grace period of the pool's pods.
PICKER_GRACE_SECONDS = 130
WAIT_FOR = "pulumi.com/waitFor"  # pulumi-kubernetes waits until the object has a value at this jsonpath


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


def all_gateway_manifests(pool: RoutedPool) -> list[dict]:
    """Everything one serving stack applies for its gateway, in apply order."""
    return [
        *picker_manifests(pool),
        inference_pool(pool),
        health_check_policy(pool),
        backend_policy(pool),
        gateway(pool),
        http_route(pool),
    ]
