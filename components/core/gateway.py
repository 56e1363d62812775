"""GKE Inference Gateway in front of the replicas: what its layers share.

The feature is split by layer like the rest of the core: this module holds the gateway modes and
their GatewayClasses, the pinned extension release (picker image, CRD manifest, the picker's
scoring profile), the runtimes that speak the model-server protocol, the typed `GatewaySettings`
and how a live Gateway reports its address. The keys are parsed in `config_gateway.py`; the
objects of one serving stack are built as dicts in `gateway_manifests.py` (from the `RoutedPool`
that `manifests.routed_pool` derives from the config), the last step before they are applied
(`components.resources.gateway`) or printed (`components.render`). Pure, no Pulumi.

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
`provider.name=gke` at EXTENSION_VERSION (config/charts/inferencepool), written out as data in
`gateway_manifests.py` so that `pulumi preview` diffs them and the tests validate them: no chart
values to keep in sync.

Who owns what: the proxy-only subnet, the Gateway API on the cluster and the InferencePool CRD are
cluster-wide (one per region and VPC, one per cluster), so the stack that creates the cluster
creates them (role=all, role=platform); each stack that serves owns its Gateway, HTTPRoute, pool,
picker and policies, in its namespace, so stacks never route to each other's pods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

NONE, INTERNAL, EXTERNAL = "none", "internal", "external"
MODES = (NONE, INTERNAL, EXTERNAL)
# GKE's GatewayClasses of the regional Application Load Balancers (both use the proxy-only subnet).
GATEWAY_CLASSES = {INTERNAL: "gke-l7-rilb", EXTERNAL: "gke-l7-regional-external-managed"}
GATEWAY_API_CHANNEL = "CHANNEL_STANDARD"  # GKE's Gateway API install on the cluster (gcloud --gateway-api=standard)

# The extension release whose chart, picker image and CRDs this feature follows.
EXTENSION_VERSION = "v1.3.0"
PICKER_IMAGE = f"registry.k8s.io/gateway-api-inference-extension/epp:{EXTENSION_VERSION}"
CRD_MANIFEST_URL = (
    f"https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/download/"
    f"{EXTENSION_VERSION}/manifests.yaml"
)
# The chart's default scheduling profile: each scorer's weight in the picker's sum.
PICKER_SCORERS = {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}
ADDRESS_PATH = "{.status.addresses[0].value}"  # where the Gateway reports its IP
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


def gateway_url(address: str) -> str:
    """Where clients reach the Gateway's listener (port 80, HTTP's default: no port in the URL)."""
    return f"http://{address}"


def gateway_address(status: Mapping | None) -> str:
    """The first address a live Gateway reports; ValueError while it has none."""
    addresses = (status or {}).get("addresses") or []
    if not addresses:
        raise ValueError("the Gateway has no address yet (status.addresses is empty)")
    return addresses[0]["value"]
