"""Stacks sharing a cluster: each stack's TPU nodes carry its own taint, only its pods tolerate it, and
its ValidatingAdmissionPolicy refuses any other namespace's pod that tolerates or selects them.

The policy's CEL is evaluated here with cel-python against admission requests, as the API server
would evaluate it (matchConditions, then variables, then validations), and the objects are validated
against the Kubernetes OpenAPI schema (admissionregistration.k8s.io/v1).
"""

from __future__ import annotations

import celpy
import kubernetes_validate
import pytest

from components.core import admission, scheduling
from components.core.node_pools import STACK_TAINT_KEY, gke_node_taints, tpu_node_pools
from components.core.planner import plan_deployment
from tests.stack.pulumi_harness import run_stack, stack_file_config
from tests.stack.stack_helpers import config, example

K8S_VERSION = "1.33.0"
NODE_POOL = "gcp:container/nodePool:NodePool"
POLICY = "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicy"
BINDING = "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicyBinding"


def _evaluate(expression: str, activation: dict):
    environment = celpy.Environment()
    return environment.program(environment.compile(expression)).evaluate(activation)


def refusals(policy: dict, namespace: str, pod_spec: dict) -> list[str]:
    """The messages the policy denies a pod with with `pod_spec` in `namespace` (empty: admitted)."""
    activation = {
        "request": celpy.json_to_cel({"namespace": namespace, "operation": "CREATE"}),
        "object": celpy.json_to_cel({"metadata": {"namespace": namespace}, "spec": pod_spec}),
    }
    spec = policy["spec"]
    if not all(_evaluate(condition["expression"], activation) for condition in spec["matchConditions"]):
        return []
    variables = {variable["name"]: _evaluate(variable["expression"], activation) for variable in spec["variables"]}
    activation["variables"] = celpy.celtypes.MapType(
        {celpy.celtypes.StringType(name): value for name, value in variables.items()}
    )
    return [
        validation["message"]
        for validation in spec["validations"]
        if not _evaluate(validation["expression"], activation)
    ]


@pytest.fixture(scope="module")
def prod():
    return example("prod")[0]


def _stack_pod(cfg) -> dict:
    """The pod spec the stack's own LeaderWorkerSet leader runs."""
    from components.core import manifests

    lws = manifests.leader_worker_set(cfg, plan_deployment(cfg), None).to_dict()
    return lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]


def test_every_tpu_node_of_a_stack_carries_its_own_taint_and_only_its_pods_tolerate_it(prod):
    dev = example("dev")[0]
    for cfg in (prod, dev):
        for spec in tpu_node_pools(cfg):
            assert {"key": STACK_TAINT_KEY, "value": cfg.deployment_id, "effect": "NoSchedule"} in gke_node_taints(spec)
    # The scheduling check (taints and tolerations as the scheduler reads them) still places each stack's pods.
    scheduling.check_deployment(prod, plan_deployment(prod))
    tolerations = _stack_pod(prod)["tolerations"]
    assert {
        "key": STACK_TAINT_KEY,
        "operator": "Equal",
        "value": prod.deployment_id,
        "effect": "NoSchedule",
    } in tolerations
    assert not any(toleration.get("value") == dev.deployment_id for toleration in tolerations)


def test_the_node_pools_are_tainted_through_the_provider():
    recording = run_stack(stack_file_config("prod"), "prod")
    for pool in recording.of_type(NODE_POOL):
        assert pool.inputs["nodeConfig"]["taints"] == [
            {"key": STACK_TAINT_KEY, "value": "jetstream-prod", "effect": "NO_SCHEDULE"}
        ]
    policy, binding = recording.one(POLICY), recording.one(BINDING)
    assert policy.parent_type == binding.parent_type == "jetstream:admission:StackIsolation"
    assert (
        policy.urn in binding.dependencies and binding.inputs["spec"]["policyName"] == policy.inputs["metadata"]["name"]
    )


def test_the_policy_and_binding_are_valid_admissionregistration_v1_objects(prod):
    for document in (admission.isolation_policy(prod), admission.isolation_binding(prod)):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    for validation in admission.isolation_policy(prod)["spec"]["validations"]:  # every expression compiles
        celpy.Environment().compile(validation["expression"])


def test_the_stacks_own_pods_and_unrelated_pods_are_admitted(prod):
    policy = admission.isolation_policy(prod)
    assert refusals(policy, prod.names.namespace, _stack_pod(prod)) == []
    assert refusals(policy, "jetstream-dev", _stack_pod(example("dev")[0])) == []  # another stack's own pods
    assert refusals(policy, "web", {"containers": [{"name": "app", "image": "nginx:1.27.0"}]}) == []
    # The cluster's own DaemonSets tolerate every taint by design.
    for system in ("kube-system", "gke-managed-system", "gmp-system"):
        assert refusals(policy, system, {"tolerations": [{"operator": "Exists"}]}) == []


@pytest.mark.parametrize(
    ("what", "pod_spec"),
    [
        (
            "its taint by value",
            {
                "tolerations": [
                    {"key": STACK_TAINT_KEY, "operator": "Equal", "value": "jetstream-prod", "effect": "NoSchedule"}
                ]
            },
        ),
        ("its taint key with Exists", {"tolerations": [{"key": STACK_TAINT_KEY, "operator": "Exists"}]}),
        ("every taint", {"tolerations": [{"operator": "Exists"}]}),
        ("its nodes by label", {"nodeSelector": {"jetstream-tpu/deployment": "jetstream-prod"}}),
        (
            "its nodes by affinity",
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {
                                            "key": "jetstream-tpu/deployment",
                                            "operator": "In",
                                            "values": ["jetstream-prod"],
                                        }
                                    ]
                                }
                            ]
                        }
                    }
                }
            },
        ),
    ],
)
def test_a_pod_of_another_namespace_that_tolerates_or_selects_the_stacks_nodes_is_refused(prod, what, pod_spec):
    [message] = refusals(admission.isolation_policy(prod), "jetstream-dev", pod_spec)
    assert "reserved to namespace jetstream-prod" in message


def test_each_stack_has_its_own_policy():
    names = {
        admission.policy_name(
            config(stack=stack, model="llama3.1-8b", topology="2x2", checkpointPath="gs://test-checkpoints/m/0/items")
        )
        for stack in ("dev", "prod")
    }
    assert names == {"tpu-nodes-jetstream-dev", "tpu-nodes-jetstream-prod"}
