"""Environments (one platform stack, serving stacks on its cluster), the Service's two ports
and type, and the outputs clients use; the Pulumi program under mocks with a mocked StackReference."""

from __future__ import annotations

import pytest
import yaml
from pulumi.runtime import rpc

from components.core import manifests
from components.core.config import PlatformConfig, parse_stack_config
from components.core.config_roles import PLATFORM_OUTPUTS, check_same_project
from components.core.errors import ConfigError
from components.core.node_pools import node_pool_summary, tpu_node_pools
from components.render import read_stack_file, render
from tests.stack.pulumi_harness import (
    GCP_PROJECT,
    LOAD_BALANCER_IP,
    PLATFORM_KUBECONFIG,
    ROOT,
    WORKLOAD_STACKS,
    platform_outputs,
    run_stack,
    stack_file_config,
    stack_role,
)
from tests.stack.stack_helpers import config, example

CLUSTER = "gcp:container/cluster:Cluster"
NODE_POOL = "gcp:container/nodePool:NodePool"
ACCOUNT = "gcp:serviceaccount/account:Account"
PROJECT_MEMBER = "gcp:projects/iAMMember:IAMMember"
BUCKET_MEMBER = "gcp:storage/bucketIAMMember:BucketIAMMember"
LWS = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
SERVICE = "kubernetes:core/v1:Service"
CONFIG_FILE = "kubernetes:yaml/v2:ConfigFile"
K8S_PROVIDER = "pulumi:providers:kubernetes"
LWS_CONTROLLER = "jetstream:lws:LeaderWorkerSetController"
ADAPTER = "jetstream:autoscaling:MetricsAdapter"
HPA = "kubernetes:autoscaling/v2:HorizontalPodAutoscaler"
PLATFORM_STACK = "my-org/jetstream-tpu/platform"  # what the example serving stacks name in clusterStack
EXAMPLE_PROJECT = "my-gcp-project"  # gcp:project of the example stacks (the mocked platform answers the same)
SECRET_SIGNATURE_KEY, SECRET_SIGNATURE = rpc._special_sig_key, rpc._special_secret_sig  # how a secret input travels
CLIENT_OUTPUTS = {"httpUrl", "grpcTarget", "openaiBaseUrl"}
SERVING_OUTPUTS = CLIENT_OUTPUTS | {
    "clusterName",
    "namespace",
    "lwsName",
    "headPod",
    "serviceName",
    "portForwardCommand",
    "curlExample",
    "scratchBucket",
    "serviceAccountEmail",
    "plan",
}
ALL_OUTPUTS = SERVING_OUTPUTS | {"clusterEndpoint", "kubeconfig", "lwsVersion"}  # role=all also owns its cluster


@pytest.fixture(scope="module")
def recordings():
    return {
        stack: run_stack(stack_file_config(stack), stack) for stack in ("platform", "dev", "prod", "llama3-8b-v6e8")
    }


def _tpu_pools(recording) -> list[dict]:
    return [pool.inputs for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"]


# ---------------------------------------------------------------------------------------------
# The platform stack.


def test_platform_stack_creates_the_cluster_and_what_serving_stacks_share(recordings):
    platform = recordings["platform"]
    cluster = platform.one(CLUSTER).inputs
    assert (cluster["name"], cluster["location"], cluster["deletionProtection"]) == (
        "jetstream-platform",
        "us-east5",
        True,
    )
    assert [pool.inputs["name"] for pool in platform.of_type(NODE_POOL)] == ["system"]
    assert [account.inputs["accountId"] for account in platform.of_type(ACCOUNT)] == ["js-nodes-platform"]
    assert len(platform.of_type(LWS_CONTROLLER)) == 1 and len(platform.of_type(ADAPTER)) == 1


def test_platform_stack_creates_no_tpu_pool_and_no_workload(recordings):
    platform = recordings["platform"]
    assert _tpu_pools(platform) == []
    kubernetes = {resource.type for resource in platform.resources if resource.type.startswith("kubernetes:")}
    assert kubernetes == {CONFIG_FILE}  # the LWS release and the metrics adapter, nothing of a workload
    assert not {LWS, SERVICE, "kubernetes:core/v1:Namespace", "gcp:storage/bucket:Bucket"} & {
        resource.type for resource in platform.resources
    }


def test_platform_stack_exports_exactly_the_cluster_outputs(recordings):
    platform = recordings["platform"]
    assert set(platform.outputs) == set(PLATFORM_OUTPUTS) == {"clusterName", "clusterLocation", "project", "kubeconfig"}
    assert (platform.outputs["clusterName"], platform.outputs["clusterLocation"], platform.outputs["project"]) == (
        "jetstream-platform",
        "us-east5",
        "my-gcp-project",
    )
    assert platform.secret_outputs == {"kubeconfig"}
    assert (
        yaml.safe_load(platform.outputs["kubeconfig"])["users"][0]["user"]["exec"]["command"]
        == "gke-gcloud-auth-plugin"
    )


def test_platform_config_is_the_cluster_only():
    raw, project = read_stack_file(ROOT / "Pulumi.platform.yaml")
    cfg = parse_stack_config(raw, project=project, stack="platform")
    assert isinstance(cfg, PlatformConfig)
    assert (
        cfg.cluster.name,
        cfg.cluster.location,
        cfg.cluster.install_lws_controller,
        cfg.node_service_account_id,
    ) == (
        "jetstream-platform",
        "us-east5",
        True,
        "js-nodes-platform",
    )


# ---------------------------------------------------------------------------------------------
# The serving stacks.


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_a_serving_stack_creates_no_cluster_and_never_installs_lws(recordings, stack):
    recording = recordings[stack]
    assert recording.stack_references == [PLATFORM_STACK]
    assert (
        recording.of_type(CLUSTER) == []
        and recording.of_type(LWS_CONTROLLER) == []
        and recording.of_type(ADAPTER) == []
    )
    assert recording.of_type(CONFIG_FILE) == []  # neither the LWS release nor any other cluster-wide install
    # The LeaderWorkerSet waits for the stack's own TPU pools on that cluster.
    pools = {pool.urn for pool in recording.of_type(NODE_POOL)}
    assert pools and pools <= set(recording.one(LWS).dependencies)


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_a_serving_stacks_tpu_pools_are_on_the_referenced_cluster_and_run_as_its_own_node_account(recordings, stack):
    recording = recordings[stack]
    pools = _tpu_pools(recording)
    cfg, plan = example(stack)
    assert sorted(pool["name"] for pool in pools) == sorted(plan.node_pools) and pools
    node_account = (
        f"js-nodes-{stack}@{GCP_PROJECT}.iam.gserviceaccount.com"  # the stack's own (email as the mocks make it)
    )
    roles = {
        member.inputs["role"]
        for member in recording.of_type(PROJECT_MEMBER)
        if member.inputs["member"] == f"serviceAccount:{node_account}"
    }
    assert roles == {
        "roles/logging.logWriter",
        "roles/monitoring.metricWriter",
        "roles/monitoring.viewer",
        "roles/stackdriver.resourceMetadata.writer",
        "roles/artifactregistry.reader",
    }
    for pool in recording.of_type(NODE_POOL):
        assert (pool.inputs["cluster"], pool.inputs["location"], pool.inputs["project"]) == (
            "jetstream-platform",
            "us-east5",
            EXAMPLE_PROJECT,
        )
        assert pool.inputs["nodeConfig"]["serviceAccount"] == node_account
        assert {member.urn for member in recording.of_type(PROJECT_MEMBER)} <= set(
            pool.dependencies
        )  # roles before nodes
    assert not any("js-nodes-platform" in str(resource.inputs) for resource in recording.resources)


def test_pathways_pods_of_a_serving_stack_act_as_its_own_node_account_with_only_its_buckets(recordings):
    """serverRuntime=jetstream: Pathways pools run without Workload Identity, so the pods act as the
    pools' account, which gets this stack's scratch bucket and its checkpoint bucket only."""
    prod = recordings["prod"]
    cfg, _ = example("prod")
    member = f"serviceAccount:js-nodes-prod@{GCP_PROJECT}.iam.gserviceaccount.com"
    grants = {
        (grant.inputs["bucket"], grant.inputs["role"], grant.inputs["member"]) for grant in prod.of_type(BUCKET_MEMBER)
    }
    assert grants == {
        (cfg.scratch_bucket, "roles/storage.objectUser", member),
        (cfg.checkpoint_bucket, "roles/storage.objectViewer", member),
    }
    assert prod.outputs["serviceAccountEmail"] == member.removeprefix("serviceAccount:")


def test_a_serving_stack_talks_to_the_cluster_with_the_platforms_kubeconfig(recordings):
    dev = recordings["dev"]
    kubeconfig = dev.one(K8S_PROVIDER).inputs["kubeconfig"]
    assert kubeconfig == {SECRET_SIGNATURE_KEY: SECRET_SIGNATURE, "value": PLATFORM_KUBECONFIG}
    for resource in dev.resources:
        if resource.type.startswith("kubernetes:"):
            assert resource.provider.startswith(dev.one(K8S_PROVIDER).urn + "::"), resource.name


def test_dev_and_prod_share_no_pool_and_no_kubernetes_object(recordings):
    def names(recording):
        pools = {("pool", pool["name"]) for pool in _tpu_pools(recording)}
        # Where each Kubernetes object lives: its namespace (for the Namespace itself, its name).
        namespaced = {
            (resource.type, resource.inputs["metadata"].get("namespace") or resource.inputs["metadata"]["name"])
            for resource in recording.resources
            if resource.type.startswith("kubernetes:")
        }
        labels = {("label", pool["nodeConfig"]["labels"]["jetstream-tpu/deployment"]) for pool in _tpu_pools(recording)}
        buckets = {("bucket", bucket.inputs["name"]) for bucket in recording.of_type("gcp:storage/bucket:Bucket")}
        accounts = {("account", account.inputs["accountId"]) for account in recording.of_type(ACCOUNT)}
        # Identical grants in two stacks would collide: the first destroy would remove both.
        grants = {
            (
                "grant",
                (
                    grant.type,
                    grant.inputs.get("bucket") or grant.inputs.get("project"),
                    grant.inputs["role"],
                    grant.inputs["member"],
                ),
            )
            for grant in recording.of_type(PROJECT_MEMBER) + recording.of_type(BUCKET_MEMBER)
        }
        return pools | namespaced | labels | buckets | accounts | grants

    dev, prod = names(recordings["dev"]), names(recordings["prod"])
    assert dev and prod and dev.isdisjoint(prod)
    # Namespaced objects live in the stack's namespace; its cluster-scoped admission policy carries the stack's name.
    cluster_scoped = ("kubernetes:admissionregistration.k8s.io/",)
    assert {
        namespace
        for type_, namespace in dev
        if type_.startswith("kubernetes:") and not type_.startswith(cluster_scoped)
    } == {"jetstream-dev"}
    assert {name for type_, name in dev if type_.startswith(cluster_scoped)} == {"tpu-nodes-jetstream-dev"}


def test_a_serving_stack_in_another_project_than_its_platform_is_refused():
    other = {PLATFORM_STACK: platform_outputs(PLATFORM_STACK, project="platform-project")}
    recording = run_stack(stack_file_config("dev"), "dev", expect_error=True, stack_outputs=other)
    assert recording.error is not None
    message = str(recording.error)
    assert "`gcp:project`, `clusterStack`" in message and "platform-project" in message
    assert check_same_project("p", "p", PLATFORM_STACK) == "p"


GET_CLUSTER = "gcp:container/getCluster:getCluster"


@pytest.mark.parametrize(("channel", "auto_upgrade"), [("UNSPECIFIED", False), ("REGULAR", True), ("STABLE", True)])
def test_a_serving_stacks_multi_host_pools_follow_the_live_clusters_release_channel(channel, auto_upgrade):
    """GKE refuses auto_upgrade=false on a multi-host pool of a cluster enrolled in a channel, and
    only the live cluster knows its channel: the serving stack reads it at preview."""
    recording = run_stack(stack_file_config("prod"), "prod", release_channel=channel)
    assert (
        GET_CLUSTER,
        {"name": "jetstream-platform", "location": "us-east5", "project": EXAMPLE_PROJECT},
    ) in recording.calls
    pools = _tpu_pools(recording)
    assert len(pools) == 2 and all(
        pool["management"] == {"autoRepair": True, "autoUpgrade": auto_upgrade} for pool in pools
    )


def test_a_serving_stack_in_a_zone_outside_the_platforms_cluster_is_refused_before_any_pool():
    values = {**stack_file_config("dev"), "jetstream-tpu:zone": "us-central1-a"}
    recording = run_stack(values, "dev", expect_error=True)
    assert recording.error is not None
    message = str(recording.error)
    assert (
        "`zone`" in message
        and "the cluster jetstream-platform (us-east5)" in message
        and "a zone of us-east5" in message
    )
    assert recording.of_type(NODE_POOL) == []
    # A zonal platform cluster takes pools in every zone of its region.
    zonal = {PLATFORM_STACK: {**platform_outputs(PLATFORM_STACK, EXAMPLE_PROJECT), "clusterLocation": "us-east5-a"}}
    assert [
        pool["nodeLocations"] for pool in _tpu_pools(run_stack(stack_file_config("dev"), "dev", stack_outputs=zonal))
    ] == [["us-east5-b"]]


def test_a_serving_stack_takes_the_release_channel_from_its_cluster_not_from_config():
    with pytest.raises(ConfigError) as refused:
        parse_stack_config(
            {**read_stack_file(ROOT / "Pulumi.dev.yaml")[0], "releaseChannel": "REGULAR"},
            project=EXAMPLE_PROJECT,
            stack="dev",
        )
    assert refused.value.keys == ("releaseChannel", "role")
    cfg, _ = example("prod")
    assert {node_pool_summary(spec)["auto_upgrade"] for spec in tpu_node_pools(cfg)} == {
        "the cluster's release channel decides at deploy time"
    }
    single_host, _ = example("dev")  # auto-upgrade stays on for single-host slices in any channel
    assert [spec.auto_upgrade for spec in tpu_node_pools(single_host)] == [True]
    assert all(
        pool["management"]["autoUpgrade"] is True for pool in _tpu_pools(run_stack(stack_file_config("dev"), "dev"))
    )


def test_a_serving_stacks_hpa_uses_the_platforms_metrics_adapter():
    values = {**stack_file_config("dev"), "jetstream-tpu:maxReplicas": "2"}
    recording = run_stack(values, "dev")
    assert recording.of_type(ADAPTER) == [] and recording.of_type(CONFIG_FILE) == []
    assert recording.one(LWS).urn in recording.one(HPA).dependencies and recording.one(LWS).ignore_changes == [
        "spec.replicas"
    ]


# ---------------------------------------------------------------------------------------------
# Service and outputs.


@pytest.mark.parametrize("stack", ["dev", "prod", "llama3-8b-v6e8"])
def test_outputs_of_a_stack_that_serves_are_exactly_these(recordings, stack):
    recording = recordings[stack]
    assert set(recording.outputs) == (SERVING_OUTPUTS if stack_role(stack) == "serving" else ALL_OUTPUTS)
    assert recording.outputs["clusterName"] == (
        "jetstream-platform" if stack_role(stack) == "serving" else "jetstream-llama3-8b-v6e8"
    )


def test_cluster_ip_outputs_are_the_live_services_dns_name(recordings):
    dev = recordings["dev"].outputs
    host = "jetstream-svc.jetstream-dev.svc.cluster.local"
    assert (dev["httpUrl"], dev["grpcTarget"], dev["openaiBaseUrl"]) == (
        f"http://{host}:8000",
        f"{host}:9000",
        f"http://{host}:8000/v1",
    )
    jetstream = recordings["llama3-8b-v6e8"].outputs
    # JetStream's jetstream-http front end serves /generate only: no OpenAI API behind the Service.
    assert (
        jetstream["httpUrl"] == "http://jetstream-svc.llama3-8b.svc.cluster.local:8000"
        and jetstream["openaiBaseUrl"] == ""
    )


def test_internal_load_balancer_outputs_are_its_assigned_ip(recordings):
    prod = recordings["prod"]
    assert (prod.outputs["httpUrl"], prod.outputs["grpcTarget"]) == (
        f"http://{LOAD_BALANCER_IP}:8000",
        f"{LOAD_BALANCER_IP}:9000",
    )
    service = prod.one(SERVICE).inputs
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == {
        "networking.gke.io/load-balancer-type": "Internal",
        "pulumi.com/waitFor": "jsonpath={.status.loadBalancer.ingress[0].ip}",
    }


def test_the_outputs_follow_the_live_service_not_the_config():
    """The endpoints are read from the Service the cluster reports (its status, name and ports)."""
    bundled = {**stack_file_config("dev"), "jetstream-tpu:serviceType": "InternalLoadBalancer"}
    recording = run_stack(bundled, "dev")
    assert recording.outputs["openaiBaseUrl"] == f"http://{LOAD_BALANCER_IP}:8000/v1"
    with pytest.raises(ValueError, match="no load balancer IP yet"):
        manifests.service_host(service_type="LoadBalancer", name="svc", namespace="ns", load_balancer_ip=None)
    assert manifests.client_endpoints("h", {"jetstream-http": 18000, "jetstream-grpc": 19000}, openai=True) == {
        "httpUrl": "http://h:18000",
        "grpcTarget": "h:19000",
        "openaiBaseUrl": "http://h:18000/v1",
    }


@pytest.mark.parametrize("stack", WORKLOAD_STACKS)
def test_the_service_exposes_http_and_grpc_on_ports_the_leader_serves(stack):
    cfg, plan = example(stack)
    service = manifests.service(cfg).to_dict()
    ports = {port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]}
    # gRPC where the runtime serves JetStream's Orchestrator service (not vLLM): no port to nothing.
    grpc = {"jetstream-grpc": (9000, 9000)} if cfg.runtime.serves_grpc else {}
    assert ports == {"jetstream-http": (8000, 8000), **grpc}
    leader = manifests.leader_worker_set(cfg, plan).to_dict()["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"][
        "containers"
    ]
    served = {port["containerPort"] for container in leader for port in container.get("ports", [])}
    assert {target for _, target in ports.values()} <= served


def test_service_type_internal_load_balancer_is_never_public():
    internal = manifests.service(config(serviceType="InternalLoadBalancer")).to_dict()
    assert internal["spec"]["type"] == "LoadBalancer"
    assert internal["metadata"]["annotations"]["networking.gke.io/load-balancer-type"] == "Internal"
    default = manifests.service(config()).to_dict()
    assert default["spec"]["type"] == "ClusterIP" and default["metadata"]["annotations"] == {
        "pulumi.com/skipAwait": "true"
    }
    with pytest.raises(ConfigError) as refused:
        config(serviceType="LoadBalancer")
    assert refused.value.keys == ("serviceType",)


# ---------------------------------------------------------------------------------------------
# Offline render.


def test_the_platform_stack_renders_its_plan_and_no_workload():
    text = render("platform")
    assert all(line.startswith("# ") for line in text.splitlines()) and "---" not in text
    plan = yaml.safe_load("\n".join(line[2:] for line in text.splitlines()))["plan"]
    assert plan["role"] == "platform" and plan["outputs"] == list(PLATFORM_OUTPUTS)
    assert plan["nodeServiceAccount"] == "js-nodes-platform@my-gcp-project.iam.gserviceaccount.com"


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_a_serving_stack_renders_offline_with_the_cluster_as_a_placeholder(stack):
    text = render(stack)
    header = yaml.safe_load("\n".join(line[2:] for line in text.split("\n---\n", 1)[0].splitlines()))["plan"]
    assert header["clusterStack"] == PLATFORM_STACK and PLATFORM_STACK in header["cluster"]
    kinds = [document["kind"] for document in yaml.safe_load_all(text.split("\n---\n", 1)[1])]
    assert kinds == ["Namespace", "ServiceAccount", "LeaderWorkerSet", "Service"]


def test_the_examples_serve_in_two_runtimes_and_two_capacities():
    dev, _ = example("dev")
    prod, prod_plan = example("prod")
    assert (dev.tpu_slice.multi_host, dev.tpu_capacity.provisioning, dev.runtime.name) == (False, "spot", "bundled")
    assert (prod.tpu_slice.multi_host, prod.tpu_capacity.provisioning, prod.service_type) == (
        True,
        "reservation",
        "InternalLoadBalancer",
    )
    assert prod_plan.node_pools == ("v6e-16-serving-prod", "v6e-16-serving-r1-prod")
