"""GKE Inference Gateway as Pulumi components; what is created and why is in `components.core.gateway`.

GatewayClusterParts, once per cluster, by the stack that creates the cluster (role=all, role=platform):
  * the region's proxy-only subnet (purpose REGIONAL_MANAGED_PROXY, role ACTIVE) in the cluster's
    VPC, where the regional load balancers' Envoy proxies run; skipped when the VPC has one
    (gatewayProxySubnetRange ""), since a region and VPC hold only one active proxy-only subnet;
  * the extension's CRDs (InferencePool) from its release manifest, pinned, as GKE documents
    (`kubernetes.yaml.v2.ConfigFile`, so whatever `depends_on` it waits for the CRDs).
The Gateway API itself is a cluster setting (`GkeClusterArgs.gateway_api`).

InferenceGateway, per serving stack, from the dicts `components.core.manifests.gateway_manifests`
builds (the ones the offline render prints): the endpoint picker's ServiceAccount, Role,
RoleBinding, ConfigMap, Deployment and Service, then the InferencePool, the GKE policies, the
Gateway and the HTTPRoute. Each object is registered under its own Kubernetes type token, so
`pulumi preview` and the policy pack see a Gateway as a Gateway. The Gateway carries a waitFor
annotation: `pulumi up` waits for GKE to give it an address, which `url` reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s

from components.core import gateway
from components.resources.options import child_after

# Objects every other object of the picker needs first (its identity, permissions and config).
PICKER_PREREQUISITES = ("ServiceAccount", "Role", "RoleBinding", "ConfigMap")


def type_token(api_version: str, kind: str) -> str:
    """The Pulumi Kubernetes type of an object: the core group is spelled `core`."""
    return f"kubernetes:{'core/v1' if api_version == 'v1' else api_version}:{kind}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatewayClusterPartsArgs:
    project: pulumi.Input[str]
    region: str
    network: pulumi.Input[str]  # the cluster's VPC
    subnet_name: str
    subnet_range: str | None  # None: the VPC already has the region's proxy-only subnet


class GatewayClusterParts(pulumi.ComponentResource):
    """What every gateway on the cluster needs; pass the cluster's provider in `opts.provider` and,
    in `opts.depends_on`, the cluster."""

    subnet: gcp.compute.Subnetwork | None
    crds: k8s.yaml.v2.ConfigFile

    def __init__(self, name: str, args: GatewayClusterPartsArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:gateway:GatewayClusterParts", name, None, opts)
        child = child_after(self, opts)
        self.subnet = None
        if args.subnet_range is not None:
            self.subnet = gcp.compute.Subnetwork(
                f"{name}-proxy-subnet",
                gcp.compute.SubnetworkArgs(
                    name=args.subnet_name,
                    project=args.project,
                    region=args.region,
                    network=args.network,
                    ip_cidr_range=args.subnet_range,
                    purpose="REGIONAL_MANAGED_PROXY",
                    role="ACTIVE",
                ),
                opts=child,
            )
        self.crds = k8s.yaml.v2.ConfigFile(f"{name}-crds", file=gateway.CRD_MANIFEST_URL, opts=child)
        self.register_outputs({"crdManifestUrl": gateway.CRD_MANIFEST_URL})


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceGatewayArgs:
    manifests: Sequence[Mapping[str, Any]]  # manifests.gateway_manifests, in apply order


class InferenceGateway(pulumi.ComponentResource):
    """One stack's gateway; pass the cluster's provider and, in `opts.depends_on`, the workload
    (its namespace) and the cluster-wide parts where this stack creates them."""

    address: pulumi.Output[str]
    url: pulumi.Output[str]

    def __init__(self, name: str, args: InferenceGatewayArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:gateway:InferenceGateway", name, None, opts)
        first = [document for document in args.manifests if document["kind"] in PICKER_PREREQUISITES]
        rest = [document for document in args.manifests if document["kind"] not in PICKER_PREREQUISITES]
        prerequisites = [_apply(name, document, child_after(self, opts)) for document in first]
        after = pulumi.ResourceOptions.merge(child_after(self, opts), pulumi.ResourceOptions(depends_on=prerequisites))
        applied = {document["kind"]: _apply(name, document, after) for document in rest}
        self.address = applied["Gateway"].status.apply(gateway.gateway_address)
        self.url = self.address.apply(gateway.gateway_url)
        self.register_outputs({"address": self.address, "url": self.url})


def _apply(name: str, document: Mapping[str, Any], opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
    """One object under its own type token; `status` is declared so the live one can be read."""
    props = {**document, "status": None}
    return pulumi.CustomResource(
        type_token(document["apiVersion"], document["kind"]), f"{name}-{document['kind'].lower()}", props, opts
    )
