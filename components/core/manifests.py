"""Kubernetes manifests as pure functions: (config, plan) -> objects.

The workload's objects are typed: the LeaderWorkerSet (`lws_model`), its Namespace, ServiceAccount
and Service (`kube_model`); they become dicts only at the last step, as the documents
`all_manifests` hands the renderer or as the Pulumi arguments `JetStreamServer` builds. The
scheduling check reads the typed LeaderWorkerSet too. What runs in the LeaderWorkerSet's pods comes
from the config's server runtime (`cfg.runtime.pod_layout`, components/core/runtimes/):
JetStream + MaxText on Pathways (the reference YAMLs' layout, `runtimes/pathways.py`), this
repository's server (`runtimes/bundled.py`) or vLLM (`runtimes/vllm.py`). Where the pods run is
the same for every runtime and built here (`_pod_spec`): the slice's node selector plus the
stack's deployment label (its own TPU pools only), the TPU toleration, the service account.

Disaggregated mode (Pathways only) puts each slice in its own LWS subgroup of `hosts` pods with
`subgroup-exclusive-topology` on the node pool. The Pathways leader holds no TPU, so it is
excluded from the subgroups (`subGroupPolicyType: LeaderExcluded`): with LWS's default policy
the leader is subgroup 0 and, on single-host slices (subGroupSize 1), the two workers become
subgroups 1 and 2, three exclusive subgroups for two node pools (components/core/scheduling.py
proves placements like this before any resource exists).

The Service selects the leader pods only, through the `app` label that only the leader template
carries (as in the reference): one leader per LeaderWorkerSet replica (`replicas`), so it balances
over every replica. With autoscaling on, the PodMonitoring and the HPA (built here from the
settings and metrics of components/core/autoscaling.py) come after the workload, and with `gateway`
set the objects `gateway_manifests.py` builds from `routed_pool` come last. The Namespace and
the ServiceAccount the pods run as are built here too, so `components.render` prints everything
`kubectl apply -f -` needs and `JetStreamServer` wraps the same objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from components.core import kube_model as kube
from components.core import lws_model as lws
from components.core import tpu
from components.core.autoscaling import Autoscaling, MetricsEndpoint
from components.core.config import StackConfig
from components.core.config_table import INTERNAL_LOAD_BALANCER
from components.core.gateway import PROTOCOL_RUNTIMES
from components.core.gateway_manifests import RoutedPool, all_gateway_manifests
from components.core.hpa import scale_down_stabilization_seconds
from components.core.node_pools import DEPLOYMENT_LABEL, NODE_POOL_LABEL, stack_toleration
from components.core.planner import Plan
from components.core.runtimes.base import PodContent
from serving.protocol import GRPC_PORT, HTTP_PORT

GSA_ANNOTATION = "iam.gke.io/gcp-service-account"  # Workload Identity: KSA -> GSA

# pulumi-kubernetes await annotations. A Service's await waits up to 10 minutes for endpoints,
# and the leader pod exists only once the TPU slice, the LWS controller and the LWS are up, so
# the Service never waits for them; with waitForReady the LeaderWorkerSet waits for its Available
# condition instead (provider/pkg/await: pulumi.com/skipAwait, pulumi.com/waitFor).
SKIP_AWAIT = "pulumi.com/skipAwait"
WAIT_FOR = "pulumi.com/waitFor"
# pulumi-kubernetes applies server-side; with this annotation an apply that meets another field
# manager's field takes it instead of failing. The LeaderWorkerSet needs it for spec.replicas: an
# HPA writes it through the scale subresource (field manager kube-controller-manager), so once
# autoscaling is turned off (maxReplicas back to replicas, ignoreChanges on spec.replicas gone) the
# next apply of spec.replicas would otherwise fail with a field conflict. While autoscaling is on,
# ignoreChanges keeps spec.replicas out of the apply (the provider drops an ignored field another
# manager owns; provider/pkg/await/await.go, handleSSAIgnoreFields), so forcing never undoes the
# HPA. Always set: the stack cannot know whether an earlier update had autoscaling on.
PATCH_FORCE = "pulumi.com/patchForce"
# serviceType=InternalLoadBalancer: a LoadBalancer Service with GKE's internal annotation gets an
# internal passthrough Network Load Balancer (an IP in the VPC, never a public one). Its IP is what
# clients need, so instead of skipping the await the Service waits for that IP only: a waitFor
# annotation replaces the Service's default await (pulumi-kubernetes >= 4.18.4), so `pulumi up`
# waits the minute or two GKE takes to create the forwarding rule, not for the pods.
INTERNAL_LB_ANNOTATION = "networking.gke.io/load-balancer-type"
LOAD_BALANCER_IP_PATH = "{.status.loadBalancer.ingress[0].ip}"
HTTP_PORT_NAME = "jetstream-http"
GRPC_PORT_NAME = "jetstream-grpc"
OPENAI_PATH = "/v1"
CLIENT_OUTPUTS = ("httpUrl", "grpcTarget", "openaiBaseUrl")  # the stack outputs of client_endpoints
# waitForReady timeout: the slice's nodes joining, multi-GB image pulls and the LWS controller's
# reconcile before the startup delay even starts, then the restore at up to twice the preset's
# estimate.
READY_MARGIN_SECONDS = 30 * 60
READY_RESTORE_FACTOR = 2


def app_labels(cfg: StackConfig) -> dict[str, str]:
    """The one label set: on the leader pod template and as the Service selector."""
    return {"app": cfg.names.app_name}


def ready_timeout_seconds(cfg: StackConfig) -> int:
    """How long `pulumi up` waits for the LeaderWorkerSet to become Available (waitForReady)."""
    return READY_MARGIN_SECONDS + READY_RESTORE_FACTOR * cfg.startup_probe_delay_seconds


# ---------------------------------------------------------------------------------------------
# Objects.

TPU_TOLERATION = lws.Toleration(key=tpu.TPU_RESOURCE, operator="Exists", effect="NoSchedule")


def node_selector(cfg: StackConfig) -> dict[str, str]:
    """The slice's accelerator and topology, on this stack's own TPU pools only."""
    return {**cfg.tpu_slice.node_selector, DEPLOYMENT_LABEL: cfg.deployment_id}


def _pod_template(cfg: StackConfig, content: PodContent, labels: dict[str, str] | None = None) -> lws.PodTemplateSpec:
    """The runtime's pod content on this stack's TPU nodes, running as the stack's Kubernetes service account."""
    metadata = lws.ObjectMeta(labels=labels, annotations=content.annotations) if labels or content.annotations else None
    return lws.PodTemplateSpec(
        metadata=metadata,
        spec=lws.PodSpec(
            node_selector=node_selector(cfg),
            tolerations=(TPU_TOLERATION, stack_toleration(cfg.deployment_id)),
            service_account_name=cfg.names.kubernetes_service_account,
            containers=content.containers,
            init_containers=content.init_containers,
            volumes=content.volumes,
        ),
    )


def _sub_group_policy(cfg: StackConfig, plan: Plan) -> lws.SubGroupPolicy | None:
    """One subgroup per slice in disaggregated mode (Pathways only, the other runtimes refuse it);
    the leader holds no TPU, so it belongs to none of them."""
    if cfg.mode != "disaggregated":
        return None
    return lws.SubGroupPolicy(sub_group_policy_type=lws.LEADER_EXCLUDED, sub_group_size=plan.hosts_per_slice)


def _lws_annotations(cfg: StackConfig) -> dict[str, str]:
    # One LWS group per node pool (slice); in disaggregated mode one subgroup per slice.
    exclusivity = lws.SUBGROUP_EXCLUSIVE_TOPOLOGY if cfg.mode == "disaggregated" else lws.EXCLUSIVE_TOPOLOGY
    await_available = {WAIT_FOR: f"condition={lws.AVAILABLE}"} if cfg.wait_for_ready else {}
    return {exclusivity: NODE_POOL_LABEL, PATCH_FORCE: "true", **await_available}


def leader_worker_set(cfg: StackConfig, plan: Plan, image: Any = None) -> lws.LeaderWorkerSet:
    """The LeaderWorkerSet; `image` replaces the bundled server's image (the stack's own build,
    by digest, an Output under Pulumi)."""
    layout = cfg.runtime.pod_layout(cfg, plan, image)
    return lws.LeaderWorkerSet(
        metadata=lws.ObjectMeta(
            name=cfg.names.app_name, namespace=cfg.names.namespace, annotations=_lws_annotations(cfg)
        ),
        spec=lws.LeaderWorkerSetSpec(
            replicas=cfg.scaling.replicas,  # the HPA changes it when autoscaling (JetStreamServer ignores that drift)
            leader_worker_template=lws.LeaderWorkerTemplate(
                sub_group_policy=_sub_group_policy(cfg, plan),
                # The app label only on the leader: the Service reaches the leader pod only.
                leader_template=_pod_template(cfg, layout.leader, app_labels(cfg)),
                size=layout.size,
                worker_template=_pod_template(cfg, layout.worker),
            ),
        ),
    )


def _service_ports(cfg: StackConfig) -> tuple[kube.ServicePort, ...]:
    """HTTP always; gRPC where the runtime serves JetStream's Orchestrator service: MaxText's
    maxengine_server starts it on 9000 in jax-tpu, and the bundled server is started with
    --grpc-port 9000 (runtimes/bundled.py). vLLM has no gRPC front end."""
    http = kube.ServicePort(protocol="TCP", name=HTTP_PORT_NAME, port=HTTP_PORT, target_port=HTTP_PORT)
    grpc = kube.ServicePort(protocol="TCP", name=GRPC_PORT_NAME, port=GRPC_PORT, target_port=GRPC_PORT)
    return (http, grpc) if cfg.runtime.serves_grpc else (http,)


def service(cfg: StackConfig) -> kube.Service:
    """Every replica's leader: HTTP (JetStream's /generate, the OpenAI API of the bundled server
    and of vLLM) and, where the runtime has it, gRPC."""
    internal = cfg.service_type == INTERNAL_LOAD_BALANCER
    annotations = (
        {WAIT_FOR: f"jsonpath={LOAD_BALANCER_IP_PATH}", INTERNAL_LB_ANNOTATION: "Internal"}
        if internal
        else {SKIP_AWAIT: "true"}
    )
    return kube.Service(
        metadata=lws.ObjectMeta(name=cfg.names.service_name, namespace=cfg.names.namespace, annotations=annotations),
        spec=kube.ServiceSpec(
            type="LoadBalancer" if internal else "ClusterIP", selector=app_labels(cfg), ports=_service_ports(cfg)
        ),
    )


def service_host(*, service_type: str, name: str, namespace: str, load_balancer_ip: str | None) -> str:
    """Where clients reach the live Service: the internal load balancer's IP, or the cluster DNS name."""
    if service_type == "LoadBalancer":
        if not load_balancer_ip:
            raise ValueError(
                f"Service {namespace}/{name} has no load balancer IP yet (status.loadBalancer.ingress is empty)"
            )
        return load_balancer_ip
    return f"{name}.{namespace}.svc.cluster.local"


def client_endpoints(host: str, ports: Mapping[str, int], *, openai: bool) -> dict[str, str]:
    """The stack outputs clients use, from the live Service's host and its ports by name.

    `openai`: the server behind the HTTP port serves the OpenAI API (the bundled server and vLLM
    do; JetStream's jetstream-http front end serves /generate only, so its openaiBaseUrl is "").
    A Service without a gRPC port (vLLM) has grpcTarget "".
    """
    http = f"http://{host}:{ports[HTTP_PORT_NAME]}"
    grpc = f"{host}:{ports[GRPC_PORT_NAME]}" if GRPC_PORT_NAME in ports else ""
    return dict(zip(CLIENT_OUTPUTS, (http, grpc, f"{http}{OPENAI_PATH}" if openai else ""), strict=False))


def namespace(cfg: StackConfig) -> kube.Namespace | None:
    """The stack's Namespace, or None for `default` (which every cluster has)."""
    if cfg.names.namespace == "default":
        return None
    return kube.Namespace(metadata=lws.ObjectMeta(name=cfg.names.namespace))


def service_account(cfg: StackConfig, gsa_email: Any = None) -> kube.ServiceAccount:
    """The Kubernetes service account of the pods.

    With Workload Identity (the bundled server, vLLM) it is bound to the workload GSA: `gsa_email`
    defaults to the email GCP derives for it; `JetStreamServer` passes the created account's email
    (a Pulumi Output, so the KSA waits for the GSA). Pathways pods act as the node service account
    (node_pools.py), so their KSA carries no binding.
    """
    binding = None
    if cfg.pods_use_workload_identity:
        binding = {GSA_ANNOTATION: cfg.workload_service_account_email if gsa_email is None else gsa_email}
    return kube.ServiceAccount(
        metadata=lws.ObjectMeta(
            name=cfg.names.kubernetes_service_account, namespace=cfg.names.namespace, annotations=binding
        )
    )


def serving_manifests(cfg: StackConfig, plan: Plan) -> list[dict]:
    """The workload objects as documents, in apply order."""
    return [leader_worker_set(cfg, plan).to_dict(), service(cfg).to_dict()]


def scaling_manifests(cfg: StackConfig) -> list[dict]:
    """The PodMonitoring and the HPA of the LeaderWorkerSet; nothing unless autoscaling."""
    if not cfg.scaling.enabled:
        return []
    return autoscaling_manifests(
        cfg.scaling,
        namespace=cfg.names.namespace,
        lws_name=cfg.names.app_name,
        endpoint=cfg.runtime.metrics_endpoint(cfg),
        startup_delay_seconds=cfg.startup_probe_delay_seconds,
    )


# ---------------------------------------------------------------------------------------------
# Autoscaling: Managed Prometheus scrapes the leaders, the HPA scales the LeaderWorkerSet on their average.

POD_MONITORING_API_VERSION = "monitoring.googleapis.com/v1"
SCRAPE_INTERVAL = "15s"  # GKE's JetStream example; also the HPA's default sync period
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"


def leader_pod_labels(lws_name: str) -> dict[str, str]:
    """The labels LWS puts on every group's leader: the pods its hpaPodSelector selects."""
    return {LWS_NAME_LABEL: lws_name, LWS_WORKER_INDEX_LABEL: "0"}


def pod_monitoring(*, namespace: str, lws_name: str, endpoint: MetricsEndpoint) -> dict:
    """Managed Prometheus scrapes each replica's leader, the only pod that serves (and counts)."""
    return {
        "apiVersion": POD_MONITORING_API_VERSION,
        "kind": "PodMonitoring",
        "metadata": {"name": lws_name, "namespace": namespace},
        # targetLabels left at the CRD default, which includes `pod`: the adapter matches series to pods by it.
        "spec": {
            "selector": {"matchLabels": leader_pod_labels(lws_name)},
            "endpoints": [{"port": endpoint.port, "path": endpoint.path, "interval": SCRAPE_INTERVAL}],
        },
    }


def horizontal_pod_autoscaler(
    scaling: Autoscaling, *, namespace: str, lws_name: str, startup_delay_seconds: int
) -> dict:
    """The one HPA: the LeaderWorkerSet by name, between replicas and maxReplicas, on the leaders' average."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": lws_name, "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": lws.API_VERSION, "kind": lws.KIND, "name": lws_name},
            "minReplicas": scaling.replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": scaling.metric.adapter_metric},
                        "target": {"type": "AverageValue", "averageValue": scaling.target_quantity},
                    },
                }
            ],
            "behavior": {
                "scaleDown": {"stabilizationWindowSeconds": scale_down_stabilization_seconds(startup_delay_seconds)}
            },
        },
    }


def autoscaling_manifests(
    scaling: Autoscaling, *, namespace: str, lws_name: str, endpoint: MetricsEndpoint, startup_delay_seconds: int
) -> list[dict]:
    """The PodMonitoring and the HPA in apply order; nothing when autoscaling is off."""
    if not scaling.enabled:
        return []
    return [
        pod_monitoring(namespace=namespace, lws_name=lws_name, endpoint=endpoint),
        horizontal_pod_autoscaler(
            scaling, namespace=namespace, lws_name=lws_name, startup_delay_seconds=startup_delay_seconds
        ),
    ]


def routed_pool(cfg: StackConfig) -> RoutedPool:
    """What the stack's gateway routes to: the Service's leader pods on the HTTP port."""
    return RoutedPool(
        name=cfg.names.app_name,
        namespace=cfg.names.namespace,
        selector=app_labels(cfg),
        target_port=HTTP_PORT,
        health_path=cfg.runtime.health_path,
        gateway_class=cfg.gateway.gateway_class,
        protocol=PROTOCOL_RUNTIMES[cfg.runtime.name],
    )


def gateway_manifests(cfg: StackConfig) -> list[dict]:
    """The Gateway, HTTPRoute, InferencePool, endpoint picker and GKE policies; nothing with gateway=none."""
    return all_gateway_manifests(routed_pool(cfg)) if cfg.gateway.enabled else []


def through_gateway(endpoints: Mapping[str, str], gateway_url: str) -> dict[str, str]:
    """The client endpoints with HTTP and the OpenAI API through the gateway; gRPC stays on the
    Service (the HTTPRoute carries HTTP only)."""
    return {**endpoints, "httpUrl": gateway_url, "openaiBaseUrl": f"{gateway_url}{OPENAI_PATH}"}


def all_manifests(cfg: StackConfig, plan: Plan) -> list[dict]:
    """Everything a fresh cluster (with the LWS controller) needs, in apply order (the metrics
    adapter that autoscaling also needs is installed from its own manifest, see autoscaling.py's ADAPTER_MANIFEST_URL;
    the gateway's cluster-wide parts, components/core/gateway.py, come with the cluster)."""
    prerequisites = [obj.to_dict() for obj in (namespace(cfg), service_account(cfg)) if obj is not None]
    return [*prerequisites, *serving_manifests(cfg, plan), *scaling_manifests(cfg), *gateway_manifests(cfg)]


def head_pod(cfg: StackConfig) -> str:
    """Name of the leader pod of the first LWS group (replica 0)."""
    return f"{cfg.names.app_name}-0"


def service_url(cfg: StackConfig) -> str:
    return f"http://{cfg.names.service_name}.{cfg.names.namespace}.svc.cluster.local:{HTTP_PORT}"


def port_forward_command(cfg: StackConfig) -> str:
    return f"kubectl -n {cfg.names.namespace} port-forward pod/{head_pod(cfg)} {HTTP_PORT}:{HTTP_PORT}"


def curl_example(cfg: StackConfig) -> str:
    return cfg.runtime.example_request(cfg, HTTP_PORT)
