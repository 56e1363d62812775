"""GKE Inference Gateway in the Pulumi program, under mocks: who creates what in each role, what
the objects wait for, and the outputs clients use."""

from __future__ import annotations

import functools

from components.core import gateway
from components.core.config_gateway import DEFAULT_PROXY_SUBNET_RANGE
from components.core.config_roles import PLATFORM_OUTPUTS
from tests.stack.pulumi_harness import GATEWAY, GATEWAY_IP, GCP_PROJECT, qualified, run_stack
from tests.stack.stack_helpers import GATEWAY_SCHEMAS, crd_validator

CLUSTER = "gcp:container/cluster:Cluster"
SUBNET = "gcp:compute/subnetwork:Subnetwork"
CONFIG_FILE = "kubernetes:yaml/v2:ConfigFile"
CLUSTER_PARTS = "jetstream:gateway:GatewayClusterParts"
INFERENCE_GATEWAY = "jetstream:gateway:InferenceGateway"
SERVER = "jetstream:serving:JetStreamServer"
K8S_PROVIDER = "pulumi:providers:kubernetes"
PLATFORM_STACK = "org/jetstream-tpu/platform"
BUNDLED = {
    "model": "llama3.1-8b",
    "topology": "2x2",
    "checkpointPath": "gs://test-checkpoints/llama3.1-8b.npz",
    "serverRuntime": "bundled",
    "bundledServerImage": "registry.example/jetstream-jax:0.1.0",
}


def stack_config(**raw: str) -> dict[str, str]:
    return {**qualified({**BUNDLED, **raw}), "gcp:project": GCP_PROJECT}


@functools.cache
def recorded(role: str = "all", mode: str = "internal", **raw: str):
    if role == "platform":
        config = {**qualified({"role": "platform", "gateway": mode, **raw}), "gcp:project": GCP_PROJECT}
    elif role == "serving":
        config = stack_config(role="serving", clusterStack=PLATFORM_STACK, gateway=mode, **raw)
    else:
        config = stack_config(gateway=mode, **raw)
    return run_stack(config, role if role != "all" else "routed")


def objects_of(recording) -> list:
    return [resource for resource in recording.resources if resource.parent_type == INFERENCE_GATEWAY]


def test_role_all_creates_the_cluster_parts_and_the_stacks_gateway():
    recording = recorded()
    assert recording.one(CLUSTER).inputs["gatewayApiConfig"] == {"channel": "CHANNEL_STANDARD"}
    subnet = recording.one(SUBNET).inputs
    assert (subnet["purpose"], subnet["role"], subnet["ipCidrRange"], subnet["region"]) == (
        "REGIONAL_MANAGED_PROXY",
        "ACTIVE",
        DEFAULT_PROXY_SUBNET_RANGE,
        "us-east5",
    )
    assert subnet["network"] == f"projects/{GCP_PROJECT}/global/networks/default"  # the created cluster's VPC
    crds = [resource for resource in recording.of_type(CONFIG_FILE) if resource.parent_type == CLUSTER_PARTS]
    assert [resource.inputs["file"] for resource in crds] == [gateway.CRD_MANIFEST_URL]
    kinds = sorted(resource.type.rsplit(":", 1)[-1] for resource in objects_of(recording))
    assert kinds == sorted(
        ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service", *GATEWAY_SCHEMAS]
    )


def test_the_recorded_objects_are_the_rendered_ones_and_validate():
    for resource in objects_of(recorded()):
        kind = resource.type.rsplit(":", 1)[-1]
        assert resource.inputs["kind"] == kind
        if kind in GATEWAY_SCHEMAS:
            crd_validator(kind).validate(resource.inputs)


def waits_for(recording, resource) -> set[str]:
    """The types of what a resource waits for, and of the components those belong to (a dependency
    on a component reaches the engine as one on each of its children)."""
    found = (recording.by_urn(urn) for urn in resource.dependencies)
    return {kind for dependency in found for kind in (dependency.type, dependency.parent_type)}


def test_every_object_waits_for_the_workload_and_the_cluster_parts_and_uses_the_clusters_provider():
    recording = recorded()
    provider = recording.one(K8S_PROVIDER)
    for resource in objects_of(recording):
        assert resource.provider.startswith(provider.urn)
        assert {SERVER, CLUSTER_PARTS} <= waits_for(recording, resource), resource.name
    # the picker's identity, permissions and config exist before its Deployment
    deployment = next(resource for resource in objects_of(recording) if resource.type.endswith(":Deployment"))
    first = {kind.rsplit(":", 1)[-1] for kind in waits_for(recording, deployment)}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap"} <= first


def test_clients_go_through_the_gateway():
    outputs = recorded().outputs
    assert outputs["gatewayUrl"] == outputs["httpUrl"] == f"http://{GATEWAY_IP}"
    assert outputs["openaiBaseUrl"] == f"http://{GATEWAY_IP}/v1"
    assert outputs["grpcTarget"] == "jetstream-svc.jetstream-routed.svc.cluster.local:9000"  # gRPC stays on the Service


def test_off_changes_nothing():
    off, default = recorded(mode="none"), run_stack(stack_config(), "routed")
    assert "gatewayUrl" not in off.outputs and off.outputs == default.outputs
    assert {(r.type, r.name): r.inputs for r in off.resources} == {
        (r.type, r.name): r.inputs for r in default.resources
    }
    assert (
        not off.of_type(SUBNET)
        and not off.of_type(INFERENCE_GATEWAY)
        and "gatewayApiConfig" not in off.one(CLUSTER).inputs
    )


def test_an_existing_proxy_subnet_is_used():
    recording = recorded(gatewayProxySubnetRange="")
    assert not recording.of_type(SUBNET) and recording.one(CLUSTER_PARTS) and recording.one(INFERENCE_GATEWAY)


def test_the_platform_prepares_its_cluster_and_exports_the_same_outputs():
    recording = recorded("platform", gatewayProxySubnetRange="10.126.0.0/23")
    assert recording.one(CLUSTER).inputs["gatewayApiConfig"] == {"channel": "CHANNEL_STANDARD"}
    assert recording.one(SUBNET).inputs["ipCidrRange"] == "10.126.0.0/23"
    assert recording.one(CLUSTER_PARTS) and not recording.of_type(INFERENCE_GATEWAY) and not recording.of_type(GATEWAY)
    assert set(recording.outputs) == set(PLATFORM_OUTPUTS)


def test_a_serving_stack_owns_its_gateway_and_nothing_cluster_wide():
    recording = recorded("serving")
    assert not recording.of_type(CLUSTER) and not recording.of_type(SUBNET) and not recording.of_type(CLUSTER_PARTS)
    assert recording.one(GATEWAY).inputs["metadata"]["namespace"] == "jetstream-serving"
    assert recording.outputs["httpUrl"] == recording.outputs["gatewayUrl"] == f"http://{GATEWAY_IP}"


def test_an_existing_clusters_gateway_parts_are_its_owners():
    recording = recorded(existingClusterName="shared")
    assert not recording.of_type(SUBNET) and not recording.of_type(CLUSTER_PARTS)
    assert recording.one(GATEWAY)


def test_preview_refuses_a_gateway_for_upstream_jetstream():
    config = {
        **qualified(
            {
                "model": "llama3.1-8b",
                "topology": "2x2",
                "checkpointPath": "gs://test-checkpoints/m/0/items",
                "serverRuntime": "jetstream",
                "gateway": "internal",
            }
        ),
        "gcp:project": GCP_PROJECT,
    }
    recording = run_stack(config, "routed", expect_error=True)
    assert "`gateway`, `serverRuntime`" in str(recording.error)
    assert not recording.resources  # stopped before any resource
