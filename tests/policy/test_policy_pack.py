"""The policy pack from the main suite: its own tests in its virtualenv, every policy on every
example stack's own resources (one stack's together, for the stack policy), recorded under Pulumi
mocks (tests/stack/pulumi_harness.py), and on the children of the pinned manifests the stack applies
through ConfigFiles (tests/policy/manifests)."""

from __future__ import annotations

import copy
import functools
import pathlib

import pytest
import yaml

from components.core import autoscaling
from components.core.config_table import KEYS_BY_NAME
from tests.policy.pack_runner import analysis_of, run_in_pack_venv, violations_of
from tests.stack.pulumi_harness import EXAMPLE_STACKS, Recording, run_stack, stack_file_config

LWS = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
NODE_POOL = "gcp:container/nodePool:NodePool"
CLUSTER = "gcp:container/cluster:Cluster"
GATEWAY = "kubernetes:gateway.networking.k8s.io/v1:Gateway"
SERVICE = "kubernetes:core/v1:Service"
API_KEY_POLICY = "internal-endpoints-api-key"
# The example stacks that can route through GKE Inference Gateway (a bundled server's, and its
# platform's), run with `gateway: internal` too, so the pack also sees every gateway object.
ROUTED_STACKS = ("dev", "platform")


def test_the_packs_own_tests_pass_in_its_virtualenv():
    result = run_in_pack_venv("-m", "pytest", "-q", "-p", "no:cacheprovider", "policy/tests")
    assert result.returncode == 0, result.stdout + result.stderr


@functools.cache
def recording(stack: str) -> Recording:
    return run_stack(stack_file_config(stack), stack)


@functools.cache
def routed_recording(stack: str) -> Recording:
    return run_stack({**stack_file_config(stack), "jetstream-tpu:gateway": "internal"}, stack)


def as_sent_to_the_pack(recorded: Recording) -> list[dict]:
    return [
        {"type": resource.type, "name": resource.name, "urn": resource.urn, "inputs": resource.inputs}
        for resource in recorded.resources
    ]


def described(violations: list[dict]) -> str:
    return "\n".join(f"{v['policy']}: {v['urn']}\n  {v['message']}" for v in violations)


def warned(resources: list[dict], type_: str) -> list[tuple[str, str, bool]]:
    """What the pack says about the stack: no mandatory violation, and (policy, urn, False) per warning,
    each on the stack's only resource of `type_`."""
    violations = violations_of(resources)
    assert [v for v in violations if v["mandatory"]] == [], described(violations)
    [exposure] = [resource["urn"] for resource in resources if resource["type"] == type_]
    assert {v["urn"] for v in violations} <= {exposure}
    return [(v["policy"], v["urn"], v["mandatory"]) for v in violations]


def api_key_warning(resources: list[dict], type_: str) -> list[tuple[str, str, bool]]:
    """The key warning the pack gives a stack that exposes servers without a key through its only `type_`."""
    return [(API_KEY_POLICY, next(resource["urn"] for resource in resources if resource["type"] == type_), False)]


# The example stacks that expose servers to the VPC without a key: prod's JetStream + Pathways server
# (behind an internal load balancer) checks none. The dev stack routed through a Gateway sets no apiKeySecret.
KEYLESS_EXPOSURES = {"prod": SERVICE}


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_every_policy_passes_on_the_example_stacks_own_resources(stack):
    resources = as_sent_to_the_pack(recording(stack))
    violations = violations_of(resources)
    if stack not in KEYLESS_EXPOSURES:
        assert violations == [], described(violations)
    else:
        exposure = KEYLESS_EXPOSURES[stack]
        assert warned(resources, exposure) == api_key_warning(resources, exposure)


@pytest.mark.parametrize("stack", ROUTED_STACKS)
def test_every_policy_passes_on_the_routed_example_stacks_own_resources(stack):
    resources = as_sent_to_the_pack(routed_recording(stack))
    violations = violations_of(resources)
    if stack == "platform":  # the platform's Gateway; the servers it routes to are other stacks'
        assert violations == [], described(violations)
    else:
        assert warned(resources, GATEWAY) == api_key_warning(resources, GATEWAY)


def test_every_policy_judges_some_resource_of_the_example_stacks():
    """Else the tests above would pass for that policy without checking anything."""
    recordings = [
        *(recording(stack) for stack in EXAMPLE_STACKS),
        *(routed_recording(stack) for stack in ROUTED_STACKS),
    ]
    analyses = [analysis_of(as_sent_to_the_pack(recorded)) for recorded in recordings]
    judged = {
        policy
        for analysis in analyses
        for policy in (
            *analysis["stack"]["applicable"],
            *(name for resource in analysis["resources"] for name in resource["applicable"]),
        )
    }
    assert judged == set(analyses[0]["policies"])


def test_the_pack_catches_a_stacks_gateway_made_external():
    resources = copy.deepcopy(as_sent_to_the_pack(routed_recording("dev")))
    gateway = next(resource for resource in resources if resource["type"] == GATEWAY)
    gateway["inputs"]["spec"]["gatewayClassName"] = "gke-l7-regional-external-managed"
    caught = [
        (violation["policy"], violation["urn"]) for violation in violations_of(resources) if violation["mandatory"]
    ]
    assert caught == [("gateways-internal", gateway["urn"])]


@pytest.mark.parametrize("stack", ["dev", "llama3-8b-vllm"])  # the bundled server (--api-key-env), vLLM (VLLM_API_KEY)
@pytest.mark.parametrize("api_key_secret", ["", "serving-api-key"])
def test_an_internal_load_balancer_without_an_api_key_is_a_warning(stack, api_key_secret):
    """An example stack behind an internal load balancer: its pods carry the key exactly when
    apiKeySecret is set, and the pack warns (never fails) when they do not."""
    config = {
        **stack_file_config(stack),
        "jetstream-tpu:serviceType": "InternalLoadBalancer",
        "jetstream-tpu:apiKeySecret": api_key_secret,
    }
    resources = as_sent_to_the_pack(run_stack(config, stack))
    expected = [] if api_key_secret else api_key_warning(resources, SERVICE)
    assert warned(resources, SERVICE) == expected
    assert API_KEY_POLICY in analysis_of(resources)["stack"]["applicable"]


def test_the_pack_catches_a_stack_resource_made_non_compliant():
    stack = EXAMPLE_STACKS[0]
    resources = copy.deepcopy(as_sent_to_the_pack(recording(stack)))
    lws = next(resource for resource in resources if resource["type"] == LWS)
    leader = lws["inputs"]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    leader["image"] = "us-docker.pkg.dev/cloud-tpu-images/inference/jetstream-pathways:latest"
    pool = next(resource for resource in resources if resource["type"] == NODE_POOL)
    pool["inputs"]["nodeConfig"]["serviceAccount"] = "123456789012-compute@developer.gserviceaccount.com"
    caught = {(violation["policy"], violation["urn"]) for violation in violations_of(resources)}
    assert ("container-images-pinned", lws["urn"]) in caught
    assert ("node-pools-not-default-service-account", pool["urn"]) in caught


def test_the_platform_stacks_cluster_keeps_deletion_protection():
    """In the shipped layout the only cluster is the platform stack's: every environment runs on it."""
    resources = copy.deepcopy(as_sent_to_the_pack(recording("platform")))
    cluster = next(resource for resource in resources if resource["type"] == CLUSTER)
    assert cluster["inputs"]["deletionProtection"] is True
    cluster["inputs"]["deletionProtection"] = False
    caught = [(violation["policy"], violation["urn"], violation["mandatory"]) for violation in violations_of(resources)]
    assert caught == [("prod-cluster-deletion-protection", cluster["urn"], True)]


MANIFESTS = pathlib.Path(__file__).resolve().parent / "manifests"


def config_file_children(manifest: pathlib.Path, component: str) -> list[dict]:
    """The objects a `kubernetes.yaml.v2.ConfigFile` of `manifest` creates, as the engine sends them to the pack."""
    children = []
    for document in yaml.safe_load_all(manifest.read_text()):
        if not document:
            continue
        group_version, kind, name = document["apiVersion"], document["kind"], document["metadata"]["name"]
        type_ = f"kubernetes:{group_version if '/' in group_version else 'core/' + group_version}:{kind}"
        children.append(
            {
                "type": type_,
                "name": f"{component}:{name}",
                "inputs": document,
                "urn": f"urn:pulumi:platform::jetstream-tpu::{component}${type_}::{component}:{name}",
            }
        )
    return children


def test_the_pinned_metrics_adapter_manifest_passes_the_pack():
    """The ConfigFile's children are resources the pack judges too: the pinned adapter release's
    Deployment (its image) and Service (never a public load balancer)."""
    [manifest] = MANIFESTS.glob("custom-metrics-stackdriver-adapter-*.yaml")
    assert manifest.stem.rsplit("-", 1)[1] == autoscaling.ADAPTER_COMMIT in autoscaling.ADAPTER_MANIFEST_URL
    children = config_file_children(manifest, "metrics-adapter-manifests")
    assert_judged_and_compliant(children, "metrics-adapter-manifests:custom-metrics-stackdriver-adapter")
    deployment = next(child for child in children if child["inputs"]["kind"] == "Deployment")
    container = deployment["inputs"]["spec"]["template"]["spec"]["containers"][0]
    container["image"] = "gcr.io/gke-release/custom-metrics-stackdriver-adapter:main"
    assert [violation["policy"] for violation in violations_of(children)] == ["container-images-pinned"]


def test_the_lws_release_manifest_passes_the_pack():
    """The LWS controller's children (the default lwsVersion's release): its Deployment and Services."""
    manifest = MANIFESTS / f"lws-{KEYS_BY_NAME['lwsVersion'].default}-without-crds.yaml"
    children = config_file_children(manifest, "lws-manifests")
    assert_judged_and_compliant(children, "lws-manifests:lws-controller-manager")
    services = [child for child in children if child["inputs"]["kind"] == "Service"]
    assert len(services) == 2
    services[0]["inputs"]["spec"]["type"] = "LoadBalancer"
    assert [violation["policy"] for violation in violations_of(children)] == ["load-balancers-internal"]


def assert_judged_and_compliant(children: list[dict], deployment: str) -> None:
    """The pack judges the release's Deployment and finds no violation among its objects."""
    analysis = analysis_of(children)
    judged = {
        (resource["urn"].rsplit("::", 1)[1], policy)
        for resource in analysis["resources"]
        for policy in resource["applicable"]
    }
    assert (deployment, "container-images-pinned") in judged
    assert any(policy == "load-balancers-internal" for _, policy in judged)
    assert violations_of(children) == []
