"""Each policy of the pack on one compliant and at least one violating resource, through the servicer
the Pulumi engine talks to (analyzer.py): inputs as the engine sends them, camelCase, numbers as floats."""

from __future__ import annotations

import ast
import pathlib

import pytest
import yaml
from analyzer import analyze, analyze_resource, analyze_stack, urn_of
from policies import POLICIES
from pulumi.runtime.rpc import UNKNOWN
from pulumi_policy import ResourceValidationPolicy
from rules import RULES, STACK_RULES

PACK = pathlib.Path(__file__).resolve().parents[1]
LWS = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
NODE_POOL = "gcp:container/nodePool:NodePool"
CLUSTER = "gcp:container/cluster:Cluster"
SERVICE = "kubernetes:core/v1:Service"
GATEWAY = "kubernetes:gateway.networking.k8s.io/v1:Gateway"
NODE_ACCOUNT = "jetstream-nodes@my-project.iam.gserviceaccount.com"


def probe(period: float) -> dict:
    return {"httpGet": {"path": "/healthcheck", "port": 8000.0}, "periodSeconds": period}


def serving_container(drop: tuple[str, ...] = (), **changes) -> dict:
    container = {
        "name": "jax-tpu",
        "image": "us-docker.pkg.dev/cloud-tpu-images/inference/jetstream-pathways:v0.2.0",
        "ports": [{"containerPort": 9000.0}],
        "startupProbe": probe(1.0),
        "readinessProbe": probe(60.0),
        "livenessProbe": probe(60.0),
    }
    return {key: value for key, value in {**container, **changes}.items() if key not in drop}


def lws(leader_containers=None, worker_containers=None, init_containers=()) -> dict:
    leader = {
        "spec": {
            "initContainers": list(init_containers),
            "containers": leader_containers if leader_containers is not None else [serving_container()],
        }
    }
    worker = {
        "spec": {
            "containers": worker_containers
            if worker_containers is not None
            else [{"name": "worker", "image": "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/server:jax-0.5.3"}]
        }
    }
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "jetstream", "namespace": "jetstream"},
        "spec": {
            "replicas": 1.0,
            "leaderWorkerTemplate": {"size": 5.0, "leaderTemplate": leader, "workerTemplate": worker},
        },
    }


def deployment(image: str) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "lws-controller-manager"},
        "spec": {"template": {"spec": {"containers": [{"name": "manager", "image": image}]}}},
    }


def node_pool(drop: tuple[str, ...] = (), **changes) -> dict:
    pool = {
        "name": "v6e-16-serving",
        "cluster": "jetstream",
        "nodeCount": 4.0,
        "placementPolicy": {"type": "COMPACT", "tpuTopology": "4x4"},
        "nodeConfig": {
            "machineType": "ct6e-standard-4t",
            "serviceAccount": NODE_ACCOUNT,
            "oauthScopes": ["https://www.googleapis.com/auth/cloud-platform"],
        },
    }
    return {key: value for key, value in {**pool, **changes}.items() if key not in drop}


def service(service_type: str = "ClusterIP", annotations: dict | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "jetstream-svc", "annotations": annotations or {}},
        "spec": {
            "type": service_type,
            "selector": {"app": "jetstream"},
            "ports": [{"name": "jetstream-http", "port": 8000.0, "targetPort": 8000.0}],
        },
    }


def gateway(gateway_class: str) -> dict:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "jetstream"},
        "spec": {"gatewayClassName": gateway_class, "listeners": [{"name": "http", "protocol": "HTTP", "port": 80.0}]},
    }


def policies_violated(type_: str, props: dict, stack: str = "dev", config: dict | None = None) -> set[str]:
    violations = analyze(type_, "resource", props, stack=stack, config=config)
    assert all(violation.mandatory for violation in violations)
    return {violation.policy for violation in violations}


# (policy, type, compliant inputs, violating inputs, stack) - one row per policy and violating case.
CASES = [
    (
        "container-images-pinned",
        LWS,
        lws(),
        lws(leader_containers=[serving_container(image="jetstream:latest")]),
        "dev",
    ),
    (
        "container-images-pinned",
        LWS,
        lws(),
        lws(worker_containers=[{"name": "worker", "image": "registry.example:5000/pathways/server"}]),
        "dev",
    ),
    (
        "container-images-pinned",
        LWS,
        lws(
            init_containers=[
                {"name": "fetch-checkpoint", "image": "gcr.io/google.com/cloudsdktool/google-cloud-cli:530.0.0-slim"}
            ]
        ),
        lws(init_containers=[{"name": "fetch-checkpoint", "image": "gcr.io/google.com/cloudsdktool/google-cloud-cli"}]),
        "dev",
    ),
    (
        "container-images-pinned",
        "kubernetes:apps/v1:Deployment",
        deployment("registry.k8s.io/lws/lws@sha256:" + "0" * 64),
        deployment("registry.k8s.io/lws/lws:latest"),
        "dev",
    ),
    *(
        (
            "container-images-pinned",
            "kubernetes:apps/v1:Deployment",
            deployment("registry.k8s.io/lws/lws:v0.10.0"),
            deployment(f"registry.k8s.io/lws/lws:{moving}"),
            "dev",
        )
        for moving in ("main", "stable", "nightly", "v1")
    ),
    (
        "no-primitive-iam-roles",
        "gcp:projects/iAMMember:IAMMember",
        {"project": "p", "role": "roles/container.nodeServiceAccount", "member": f"serviceAccount:{NODE_ACCOUNT}"},
        {"project": "p", "role": "roles/editor", "member": f"serviceAccount:{NODE_ACCOUNT}"},
        "dev",
    ),
    (
        "no-primitive-iam-roles",
        "gcp:projects/iAMBinding:IAMBinding",
        {"project": "p", "role": "roles/logging.logWriter", "members": [f"serviceAccount:{NODE_ACCOUNT}"]},
        {"project": "p", "role": "roles/owner", "members": ["user:admin@example.com"]},
        "dev",
    ),
    (
        "no-public-iam-members",
        "gcp:storage/bucketIAMMember:BucketIAMMember",
        {"bucket": "checkpoints", "role": "roles/storage.objectViewer", "member": f"serviceAccount:{NODE_ACCOUNT}"},
        {"bucket": "checkpoints", "role": "roles/storage.objectViewer", "member": "allUsers"},
        "dev",
    ),
    (
        "no-public-iam-members",
        "gcp:storage/bucketIAMPolicy:BucketIAMPolicy",
        {
            "bucket": "b",
            "policyData": '{"bindings": [{"role": "roles/storage.objectViewer", "members": ["group:ml@example.com"]}]}',
        },
        {
            "bucket": "b",
            "policyData": (
                '{"bindings": [{"role": "roles/storage.objectViewer", "members": ["allAuthenticatedUsers"]}]}'
            ),
        },
        "dev",
    ),
    (
        "load-balancers-internal",
        SERVICE,
        service("LoadBalancer", {"networking.gke.io/load-balancer-type": "Internal"}),
        service("LoadBalancer"),
        "dev",
    ),
    (
        "load-balancers-internal",
        SERVICE,  # GKE's legacy annotation: the same internal load balancer
        service("LoadBalancer", {"cloud.google.com/load-balancer-type": "Internal"}),
        service("LoadBalancer", {"cloud.google.com/load-balancer-type": "External"}),
        "dev",
    ),
    ("gateways-internal", GATEWAY, gateway("gke-l7-rilb"), gateway("gke-l7-regional-external-managed"), "dev"),
    ("gateways-internal", GATEWAY, gateway("gke-l7-rilb"), gateway("some-new-class"), "dev"),  # unknown: not internal
    (
        "prod-cluster-deletion-protection",
        CLUSTER,
        {"name": "jetstream", "deletionProtection": True, "removeDefaultNodePool": True},
        {"name": "jetstream", "deletionProtection": False, "removeDefaultNodePool": True},
        "prod",
    ),
    # The shipped layout's only cluster is the platform stack's, which every environment runs on.
    (
        "prod-cluster-deletion-protection",
        CLUSTER,
        {"name": "jetstream-platform", "deletionProtection": True, "removeDefaultNodePool": True},
        {"name": "jetstream-platform", "deletionProtection": False, "removeDefaultNodePool": True},
        "platform",
    ),
    (
        "node-pools-not-default-service-account",
        NODE_POOL,
        node_pool(),
        node_pool(nodeConfig={"machineType": "ct6e-standard-4t"}),
        "dev",
    ),
    (
        "node-pools-not-default-service-account",
        NODE_POOL,
        node_pool(),
        node_pool(
            nodeConfig={
                "machineType": "e2-standard-4",
                "serviceAccount": "123456789012-compute@developer.gserviceaccount.com",
            }
        ),
        "dev",
    ),
    (
        "node-pools-not-default-service-account",
        CLUSTER,
        {"name": "jetstream", "removeDefaultNodePool": True},
        {"name": "jetstream", "initialNodeCount": 1.0},
        "dev",
    ),
    ("multi-host-tpu-compact-placement", NODE_POOL, node_pool(), node_pool(drop=("placementPolicy",)), "dev"),
    (
        "multi-host-tpu-compact-placement",
        NODE_POOL,
        node_pool(drop=("nodeCount",), initialNodeCount=0.0, autoscaling={"minNodeCount": 0.0, "maxNodeCount": 4.0}),
        node_pool(
            drop=("nodeCount", "placementPolicy"),
            initialNodeCount=0.0,
            autoscaling={"minNodeCount": 0.0, "maxNodeCount": 4.0},
        ),
        "dev",
    ),
    (
        "lws-serving-startup-probe",
        LWS,
        lws(),
        lws(leader_containers=[serving_container(drop=("startupProbe",))]),
        "dev",
    ),
    (
        "lws-serving-startup-probe",
        LWS,
        lws(),
        lws(leader_containers=[{"name": "jax-tpu", "image": "jetstream:v0.2.0", "ports": [{"containerPort": 9000.0}]}]),
        "dev",
    ),
]


@pytest.mark.parametrize(
    ("policy", "type_", "compliant", "violating", "stack"),
    CASES,
    ids=[f"{case[0]}-{index}" for index, case in enumerate(CASES)],
)
def test_policy_passes_its_compliant_resource_and_catches_its_violating_one(policy, type_, compliant, violating, stack):
    assert policies_violated(type_, compliant, stack) == set()
    assert policies_violated(type_, violating, stack) == {policy}


def test_every_resource_policy_has_a_compliant_and_a_violating_case():
    assert {case[0] for case in CASES} == {
        policy.name for policy in POLICIES if isinstance(policy, ResourceValidationPolicy)
    }


def applicable(type_: str, props: dict, stack: str = "dev") -> list[str]:
    return analyze_resource(type_, "resource", urn_of(stack, type_, "resource"), props).applicable


def test_each_policy_reports_the_resources_it_does_not_judge_as_not_applicable():
    for policy, type_, compliant, _, stack in CASES:
        assert policy in applicable(type_, compliant, stack)
    assert applicable("gcp:storage/bucket:Bucket", {"name": "scratch", "uniformBucketLevelAccess": True}) == []
    assert applicable("kubernetes:core/v1:ConfigMap", {"data": {"image": "x:latest"}}) == []
    cpu_pool = node_pool(
        drop=("placementPolicy",), nodeConfig={"machineType": "e2-standard-4", "serviceAccount": NODE_ACCOUNT}
    )
    assert applicable(NODE_POOL, cpu_pool) == ["node-pools-not-default-service-account"]


def test_deletion_protection_is_only_required_in_production_stacks():
    unprotected = {"name": "jetstream", "deletionProtection": False, "removeDefaultNodePool": True}
    assert policies_violated(CLUSTER, unprotected, stack="dev") == set()
    assert policies_violated(CLUSTER, unprotected, stack="prod-europe") == {"prod-cluster-deletion-protection"}
    assert policies_violated(CLUSTER, unprotected, stack="platform") == {"prod-cluster-deletion-protection"}
    # Unset is the provider's default, true.
    assert policies_violated(CLUSTER, {"name": "jetstream", "removeDefaultNodePool": True}, stack="prod") == set()


def test_the_production_stack_prefixes_are_pack_configuration():
    unprotected = {"name": "jetstream", "deletionProtection": False, "removeDefaultNodePool": True}
    live_only = {"prod-cluster-deletion-protection": {"productionStackPrefixes": ["live"]}}
    assert policies_violated(CLUSTER, unprotected, stack="live-eu", config=live_only) == {
        "prod-cluster-deletion-protection"
    }
    assert policies_violated(CLUSTER, unprotected, stack="prod", config=live_only) == set()
    assert policies_violated(CLUSTER, unprotected, stack="platform", config=live_only) == set()
    # A configuration that sets other policies' levels only keeps the defaults.
    assert policies_violated(CLUSTER, unprotected, stack="platform", config={"load-balancers-internal": {"x": 1}}) == {
        "prod-cluster-deletion-protection"
    }
    [policy] = [policy for policy in POLICIES if policy.name == "prod-cluster-deletion-protection"]
    schema = policy.config_schema.properties["productionStackPrefixes"]
    assert schema["type"] == "array" and schema["default"] == ["prod", "platform"]
    configurable = {"prod-cluster-deletion-protection", "gateways-internal"}
    assert all(other.config_schema is None for other in POLICIES if other.name not in configurable)


def test_an_external_gateway_only_in_the_stacks_the_pack_allows():
    external = gateway("gke-l7-regional-external-managed")
    allowed = {"gateways-internal": {"externalGatewayStacks": ["public-demo"]}}
    assert policies_violated(GATEWAY, external, stack="public-demo", config=allowed) == set()
    assert policies_violated(GATEWAY, external, stack="public-demo-2", config=allowed) == {"gateways-internal"}
    assert policies_violated(GATEWAY, external, stack="public-demo") == {"gateways-internal"}  # default: no stack
    [policy] = [policy for policy in POLICIES if policy.name == "gateways-internal"]
    assert policy.config_schema.properties["externalGatewayStacks"]["default"] == []
    [message] = [v.message for v in analyze(GATEWAY, "gw", external, stack="dev")]
    assert "gke-l7-regional-external-managed" in message and "externalGatewayStacks" in message


def test_single_host_tpu_pools_need_no_topology():
    one_vm = {**node_pool()["nodeConfig"], "machineType": "ct6e-standard-8t"}
    # 8-chip VMs are single-host slices only, however many; one 4-chip VM is a 2x2 slice by itself.
    assert policies_violated(NODE_POOL, node_pool(drop=("placementPolicy",), nodeCount=3.0, nodeConfig=one_vm)) == set()
    assert policies_violated(NODE_POOL, node_pool(drop=("placementPolicy",), nodeCount=1.0)) == set()
    assert policies_violated(NODE_POOL, node_pool(drop=("placementPolicy",), nodeCount=2.0)) == {
        "multi-host-tpu-compact-placement"
    }


def test_a_load_balancer_annotated_external_or_a_cluster_ip_service():
    assert policies_violated(SERVICE, service()) == set()
    assert policies_violated(
        SERVICE, service("LoadBalancer", {"networking.gke.io/load-balancer-type": "External"})
    ) == {"load-balancers-internal"}


def test_violation_messages_name_the_resource_and_the_fix():
    [violation] = analyze(LWS, "jetstream-lws", lws(leader_containers=[serving_container(image="jetstream:latest")]))
    assert "jetstream-lws: container 'jax-tpu'" in violation.message
    assert ":latest" in violation.message and "pin a version tag or an @sha256 digest" in violation.message


def test_an_image_unknown_during_preview_is_reported_as_not_yet_checkable_not_as_a_violation():
    preview = lws(leader_containers=[serving_container(image=UNKNOWN)])
    [diagnostic] = analyze(LWS, "jetstream-lws", preview)
    assert diagnostic.policy == "container-images-pinned" and not diagnostic.mandatory
    assert "can't be known during preview" in diagnostic.message


def test_an_unknown_value_elsewhere_does_not_stop_a_check():
    preview = lws(
        leader_containers=[serving_container(image="jetstream:latest", env=[{"name": "GSA", "value": UNKNOWN}])]
    )
    preview["metadata"]["annotations"] = {"owner": UNKNOWN}
    assert policies_violated(LWS, preview) == {"container-images-pinned"}


def test_the_pack_wires_every_rule_once_and_main_constructs_exactly_one_policy_pack():
    assert [policy.name for policy in POLICIES] == [rule.name for rule in (*RULES, *STACK_RULES)]
    assert len({policy.name for policy in POLICIES}) == len(POLICIES)
    tree = ast.parse((PACK / "__main__.py").read_text())
    calls = [
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "PolicyPack"
    ]
    assert len(calls) == 1


def test_pulumi_runs_the_pack_in_its_own_virtualenv():
    project = yaml.safe_load((PACK / "PulumiPolicy.yaml").read_text())
    assert project["runtime"] == {"name": "python", "options": {"virtualenv": "venv"}}


# The stack policy: servers exposed to the VPC check an API key (advisory).
KEY_SECRET = {"secretKeyRef": {"name": "jetstream-api-key", "key": "api-key"}}
BUNDLED_WITH_KEY = serving_container(
    args=["--api-key-env", "API_KEY"], env=[{"name": "API_KEY", "valueFrom": KEY_SECRET}]
)
INTERNAL = {"networking.gke.io/load-balancer-type": "Internal"}


def in_namespace(props: dict, namespace: str = "jetstream") -> dict:
    return {**props, "metadata": {**props["metadata"], "namespace": namespace}}


def stack_of(*resources: tuple[str, str, dict]) -> list[dict]:
    return [
        {"type": type_, "name": name, "urn": urn_of("dev", type_, name), "inputs": props}
        for type_, name, props in resources
    ]


def key_warnings(*resources: tuple[str, str, dict]) -> list[tuple[str, str]]:
    """(urn, message) of each of the stack policy's findings; every one a warning, never mandatory."""
    violations = analyze_stack(stack_of(*resources)).violations
    assert all(violation.policy == "internal-endpoints-api-key" and not violation.mandatory for violation in violations)
    return [(violation.urn, violation.message) for violation in violations]


@pytest.mark.parametrize(
    "leader",
    [
        BUNDLED_WITH_KEY,
        serving_container(
            command=["/bin/sh", "-c", "python -m serving --api-key-env=SERVING_KEY"],
            env=[{"name": "SERVING_KEY", "valueFrom": KEY_SECRET}],
        ),
        serving_container(env=[{"name": "VLLM_API_KEY", "valueFrom": KEY_SECRET}]),  # vLLM reads it without a flag
        serving_container(args=["--api-key", "a-literal-key"]),
    ],
    ids=["bundled-api-key-env", "shell-script-flag", "vllm-variable", "literal-flag"],
)
def test_an_internal_load_balancer_to_servers_that_check_a_key_passes(leader):
    assert (
        key_warnings(
            (SERVICE, "svc", in_namespace(service("LoadBalancer", INTERNAL))),
            (LWS, "lws", lws(leader_containers=[leader])),
        )
        == []
    )


@pytest.mark.parametrize("annotations", [INTERNAL, {"cloud.google.com/load-balancer-type": "Internal"}])
def test_an_internal_load_balancer_to_servers_without_a_key_is_a_warning(annotations):
    [(urn, message)] = key_warnings(
        (SERVICE, "svc", in_namespace(service("LoadBalancer", annotations))), (LWS, "lws", lws())
    )
    assert urn == urn_of("dev", SERVICE, "svc")
    assert "internal LoadBalancer Service 'jetstream-svc'" in message and "LeaderWorkerSet 'jetstream'" in message
    assert "apiKeySecret" in message


def test_a_gateway_to_servers_without_a_key_is_a_warning():
    [(urn, message)] = key_warnings((GATEWAY, "gw", in_namespace(gateway("gke-l7-rilb"))), (LWS, "lws", lws()))
    assert urn == urn_of("dev", GATEWAY, "gw") and "Gateway 'jetstream'" in message


def test_a_key_variable_the_server_is_not_told_to_read_or_that_is_empty_is_no_key():
    unread = serving_container(env=[{"name": "API_KEY", "valueFrom": KEY_SECRET}])  # no --api-key-env
    empty = serving_container(args=["--api-key-env", "API_KEY"], env=[{"name": "API_KEY", "value": ""}])
    for leader in (unread, empty):
        assert (
            len(
                key_warnings(
                    (SERVICE, "svc", in_namespace(service("LoadBalancer", INTERNAL))),
                    (LWS, "lws", lws(leader_containers=[leader])),
                )
            )
            == 1
        )


def test_only_servers_in_the_exposed_namespace_and_only_exposed_stacks_are_judged():
    other_namespace = in_namespace(service("LoadBalancer", INTERNAL), "elsewhere")
    assert key_warnings((SERVICE, "svc", other_namespace), (LWS, "lws", lws())) == []
    cluster_ip = stack_of((SERVICE, "svc", in_namespace(service())), (LWS, "lws", lws()))
    assert analyze_stack(cluster_ip).applicable == []  # nothing exposed: the policy does not judge the stack
    assert analyze_stack(
        stack_of((SERVICE, "svc", in_namespace(service("LoadBalancer", INTERNAL))), (LWS, "lws", lws()))
    ).applicable == ["internal-endpoints-api-key"]
