"""GKE Inference Gateway: the `gateway` keys, and every object the stack renders for it, checked
against the upstream CRD schemas (tests/stack/schemas/gateway-crds.source.md) and against the
workload it routes to."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components import render
from components.core import gateway, gateway_manifests, manifests
from components.core.config import PlatformConfig, parse_stack_config
from components.core.config_gateway import DEFAULT_PROXY_SUBNET_RANGE
from components.core.config_roles import CLUSTER_KEYS
from components.core.errors import ConfigError
from components.core.planner import plan_deployment
from tests.stack.stack_helpers import GATEWAY_SCHEMAS, ROOT, config, crd_validator

K8S_VERSION = "1.33.0"
BUNDLED = {"serverRuntime": "bundled", "checkpointPath": "gs://test-checkpoints/llama3.1-8b.npz"}


def bundled(**raw: str):
    return config(**BUNDLED, **raw)


def by_kind(documents: list[dict]) -> dict[str, dict]:
    kinds = [document["kind"] for document in documents]
    assert len(set(kinds)) == len(kinds), kinds
    return {document["kind"]: document for document in documents}


# -- config -----------------------------------------------------------------------------------
def test_off_by_default_and_nothing_changes():
    cfg = bundled()
    assert cfg.gateway == gateway.OFF and not cfg.gateway.enabled
    assert manifests.gateway_manifests(cfg) == []
    assert manifests.all_manifests(cfg, plan_deployment(cfg)) == manifests.all_manifests(
        bundled(gateway="none"), plan_deployment(cfg)
    )


@pytest.mark.parametrize(
    "mode,gateway_class", [("internal", "gke-l7-rilb"), ("external", "gke-l7-regional-external-managed")]
)
def test_each_mode_has_its_gke_class(mode, gateway_class):
    cfg = bundled(gateway=mode)
    assert by_kind(manifests.gateway_manifests(cfg))["Gateway"]["spec"]["gatewayClassName"] == gateway_class


def test_an_unknown_mode_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"`gateway`: 'public' is not one of none, internal, external"):
        bundled(gateway="public")


def test_upstream_jetstream_is_refused_naming_gateway_and_server_runtime():
    with pytest.raises(ConfigError) as caught:
        config(gateway="internal")
    assert caught.value.keys == ("gateway", "serverRuntime")
    assert "serverRuntime=jetstream" in str(caught.value) and "bundled" in caught.value.suggestion


def test_the_runtime_check_is_data():
    """A runtime that speaks the protocol is one row of PROTOCOL_RUNTIMES (the stack reads no other list)."""
    assert set(gateway.PROTOCOL_RUNTIMES) == {"bundled", "vllm"}
    assert bundled(gateway="internal").gateway.enabled
    assert vllm(gateway="internal").gateway.enabled


VLLM = {
    "serverRuntime": "vllm",
    "model": "llama3.1-8b",
    "topology": "2x4",
    "tpuMachineType": "ct6e-standard-8t",
    "quantization": "bf16",
    "quantizeKvCache": "false",
    "checkpointPath": "hf://meta-llama/Llama-3.1-8B",
}


def vllm(**raw: str):
    return config(**VLLM, **raw)


@pytest.mark.parametrize("text", ["10.0.0.0/27", "8.8.8.0/23", "10.0.0.0", "fd00::/64", "a range"])
def test_a_bad_proxy_subnet_range_is_refused(text):
    with pytest.raises(ConfigError, match="`gatewayProxySubnetRange`"):
        bundled(gateway="internal", gatewayProxySubnetRange=text)


def test_proxy_subnet_range_default_and_existing():
    assert bundled(gateway="internal").gateway.proxy_subnet_range == DEFAULT_PROXY_SUBNET_RANGE
    existing = bundled(gateway="internal", gatewayProxySubnetRange="").gateway
    assert existing.enabled and not existing.creates_proxy_subnet


def test_a_range_without_a_gateway_is_a_forgotten_gateway():
    with pytest.raises(ConfigError, match="`gatewayProxySubnetRange`, `gateway`: is set but gateway is none"):
        bundled(gatewayProxySubnetRange="10.126.0.0/23")


def test_platform_prepares_the_cluster_for_gateways():
    raw = {"role": "platform", "gateway": "internal", "gatewayProxySubnetRange": "10.126.0.0/23"}
    platform = parse_stack_config(raw, project="p", stack="platform")
    assert isinstance(platform, PlatformConfig)
    assert platform.gateway.creates_proxy_subnet and platform.gateway.proxy_subnet_range == "10.126.0.0/23"


def test_a_stack_on_an_existing_cluster_owns_no_subnet():
    with pytest.raises(ConfigError, match="`gatewayProxySubnetRange`, `existingClusterName`"):
        bundled(gateway="internal", existingClusterName="shared", gatewayProxySubnetRange="10.126.0.0/23")
    assert bundled(gateway="internal", existingClusterName="shared").gateway.enabled


def test_a_serving_stack_owns_no_subnet():
    """The proxy-only subnet is the cluster owner's: a serving stack refuses the range key."""
    assert "gatewayProxySubnetRange" in CLUSTER_KEYS
    serving = {"role": "serving", "clusterStack": "org/jetstream-tpu/platform", **BUNDLED}
    with pytest.raises(ConfigError, match="`gatewayProxySubnetRange`, `role`"):
        config(**serving, gateway="internal", gatewayProxySubnetRange="10.126.0.0/23")
    assert config(**serving, gateway="internal").gateway.enabled


# -- the objects --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["internal", "external"])
def test_every_custom_object_validates_against_its_upstream_crd(mode):
    documents = manifests.gateway_manifests(bundled(gateway=mode))
    custom = [document for document in documents if document["kind"] in GATEWAY_SCHEMAS]
    assert sorted(document["kind"] for document in custom) == sorted(GATEWAY_SCHEMAS)
    for document in custom:
        crd_validator(document["kind"]).validate(document)


def test_every_core_object_validates_with_kubernetes_validate():
    documents = manifests.gateway_manifests(bundled(gateway="internal"))
    core = [document for document in documents if document["kind"] not in GATEWAY_SCHEMAS]
    assert {document["kind"] for document in core} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
    }
    for document in core:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "kind,path,value",
    [
        ("InferencePool", ("spec", "targetPorts"), []),  # at least one port
        ("InferencePool", ("spec", "selector", "matchLabels"), {}),  # a pool must select
        ("HTTPRoute", ("spec", "rules", 0, "backendRefs", 0, "weight"), -1),
        ("Gateway", ("spec", "listeners", 0, "protocol"), "http!"),
        ("HealthCheckPolicy", ("spec", "default", "checkIntervalSec"), 0),
        ("GCPBackendPolicy", ("spec", "default", "timeoutSec"), 0),
        ("GCPBackendPolicy", ("spec", "default", "timeout"), 300),  # unknown field
    ],
)
def test_the_schemas_catch_a_broken_object(kind, path, value):
    broken = copy.deepcopy(by_kind(manifests.gateway_manifests(bundled(gateway="internal")))[kind])
    node = broken
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(kind).validate(broken)


@pytest.mark.parametrize("make", [bundled, vllm], ids=["bundled", "vllm"])
def test_the_pool_selects_the_services_leader_pods_on_the_http_port(make):
    cfg = make(gateway="internal")
    objects = by_kind(manifests.gateway_manifests(cfg))
    service = manifests.service(cfg).to_dict()
    pool = objects["InferencePool"]["spec"]
    assert pool["selector"]["matchLabels"] == service["spec"]["selector"]
    http_port = next(
        port["targetPort"] for port in service["spec"]["ports"] if port["name"] == manifests.HTTP_PORT_NAME
    )
    assert pool["targetPorts"] == [{"number": http_port}]
    lws = manifests.leader_worker_set(cfg, plan_deployment(cfg)).to_dict()
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    assert leader["metadata"]["labels"].items() >= pool["selector"]["matchLabels"].items()
    # GKE health-checks what the server's readiness probe reads
    probe = leader["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    check = objects["HealthCheckPolicy"]["spec"]["default"]["config"]["httpHealthCheck"]
    assert (check["requestPath"], check["port"]) == (probe["path"], probe["port"])


def test_route_pool_picker_and_policies_refer_to_each_other():
    objects = by_kind(manifests.gateway_manifests(bundled(gateway="internal")))
    gateway_name, pool_name = objects["Gateway"]["metadata"]["name"], objects["InferencePool"]["metadata"]["name"]
    route = objects["HTTPRoute"]["spec"]
    assert [parent["name"] for parent in route["parentRefs"]] == [gateway_name]
    assert route["rules"][0]["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool_name}
    ]
    for policy in ("HealthCheckPolicy", "GCPBackendPolicy"):
        assert objects[policy]["spec"]["targetRef"] == {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": pool_name,
        }
    picker = objects["InferencePool"]["spec"]["endpointPickerRef"]
    service = objects["Service"]
    assert picker["name"] == service["metadata"]["name"]
    assert picker["port"]["number"] in {port["port"] for port in service["spec"]["ports"]}
    deployment = objects["Deployment"]["spec"]
    assert (
        service["spec"]["selector"]
        == deployment["selector"]["matchLabels"]
        == deployment["template"]["metadata"]["labels"]
    )
    # the picker is never one of the pool's pods
    assert (
        not deployment["template"]["metadata"]["labels"].items()
        & objects["InferencePool"]["spec"]["selector"]["matchLabels"].items()
    )
    container = deployment["template"]["spec"]["containers"][0]
    args = dict(zip(container["args"][:-1:2], container["args"][1::2], strict=False))
    assert (args["--pool-name"], args["--pool-namespace"]) == (
        pool_name,
        objects["InferencePool"]["metadata"]["namespace"],
    )
    assert deployment["template"]["spec"]["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert objects["RoleBinding"]["roleRef"]["name"] == objects["Role"]["metadata"]["name"]


def test_the_picker_is_pinned_and_reads_the_bundled_servers_protocol():
    objects = by_kind(manifests.gateway_manifests(bundled(gateway="internal")))
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"registry.k8s.io/gateway-api-inference-extension/epp:{gateway.EXTENSION_VERSION}"
    # the vLLM metric names are the picker's defaults; the two the bundled server lacks are turned off
    assert [
        container["args"][i + 1]
        for i, arg in enumerate(container["args"])
        if arg in ("--lora-info-metric", "--cache-info-metric")
    ] == ["", ""]
    plugins = yaml.safe_load(objects["ConfigMap"]["data"][gateway_manifests.PICKER_CONFIG_FILE])
    assert plugins["schedulingProfiles"] == [
        {
            "name": "default",
            "plugins": [
                {"pluginRef": "queue-scorer", "weight": 2},
                {"pluginRef": "kv-cache-utilization-scorer", "weight": 2},
                {"pluginRef": "prefix-cache-scorer", "weight": 3},
            ],
        }
    ]


def test_clients_reach_http_through_the_gateway_and_grpc_through_the_service():
    service = manifests.client_endpoints(
        "svc.ns.svc.cluster.local", {"jetstream-http": 8000, "jetstream-grpc": 9000}, openai=True
    )
    routed = manifests.through_gateway(service, gateway.gateway_url("10.1.2.3"))
    assert routed == {
        "httpUrl": "http://10.1.2.3",
        "grpcTarget": "svc.ns.svc.cluster.local:9000",
        "openaiBaseUrl": "http://10.1.2.3/v1",
    }
    assert gateway.gateway_address({"addresses": [{"type": "IPAddress", "value": "10.1.2.3"}]}) == "10.1.2.3"
    with pytest.raises(ValueError, match="no address yet"):
        gateway.gateway_address({})


# -- the render -----------------------------------------------------------------------------------
def test_a_rendered_stack_with_an_internal_gateway_prints_every_object_and_they_validate(tmp_path):
    stack_file = yaml.safe_load((ROOT / "Pulumi.llama3-8b-v6e8.yaml").read_text())
    stack_file["config"].update(
        {f"jetstream-tpu:{key}": value for key, value in {**BUNDLED, "gateway": "internal"}.items()}
    )
    (tmp_path / "Pulumi.routed.yaml").write_text(yaml.safe_dump(stack_file))
    text = render.render("routed", tmp_path)
    documents = [document for document in yaml.safe_load_all(text) if document]
    kinds = [document["kind"] for document in documents]
    assert {"Gateway", "HTTPRoute", "InferencePool", "Deployment", "HealthCheckPolicy", "GCPBackendPolicy"} <= set(
        kinds
    )
    for document in documents:
        if document["kind"] in GATEWAY_SCHEMAS:
            crd_validator(document["kind"]).validate(document)
    summary = yaml.safe_load("\n".join(line.removeprefix("# ") for line in text.split("\n---\n")[0].splitlines()))[
        "plan"
    ]
    assert summary["gateway"]["class"] == "gke-l7-rilb"
    assert summary["gateway"]["endpointPicker"] == gateway.PICKER_IMAGE


def test_a_rendered_platform_says_what_it_creates_for_gateways(tmp_path):
    stack_file = yaml.safe_load((ROOT / "Pulumi.platform.yaml").read_text())
    stack_file["config"]["jetstream-tpu:gateway"] = "internal"
    (tmp_path / "Pulumi.platform.yaml").write_text(yaml.safe_dump(stack_file))
    plan = yaml.safe_load(
        "\n".join(line.removeprefix("# ") for line in render.render("platform", tmp_path).splitlines())
    )["plan"]
    assert plan["gateway"] == {
        "proxyOnlySubnet": f"jetstream-proxy-platform {DEFAULT_PROXY_SUBNET_RANGE}",
        "gatewayApi": "CHANNEL_STANDARD",
        "inferencePoolCrd": gateway.CRD_MANIFEST_URL,
    }
    assert (
        "gateway"
        not in yaml.safe_load("\n".join(line.removeprefix("# ") for line in render.render("platform").splitlines()))[
            "plan"
        ]
    )
