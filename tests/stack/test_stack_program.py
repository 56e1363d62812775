"""The Pulumi program under mocks: resources, parents, inputs, dependencies, outputs."""

from __future__ import annotations

import pytest
import yaml

from components.core import manifests, tpu
from components.resources.lws_controller import release_manifest_url

from pulumi_harness import EXAMPLE_STACKS, GCP_PROJECT, qualified, run_stack, stack_file_config
from stack_helpers import bundled_example, bundled_raw, example

NODE_POOL = "gcp:container/nodePool:NodePool"
CLUSTER = "gcp:container/cluster:Cluster"
LWS = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
SERVICE = "kubernetes:core/v1:Service"
CONFIG_FILE = "kubernetes:yaml/v2:ConfigFile"
K8S_PROVIDER = "pulumi:providers:kubernetes"

EXPECTED_PARENTS = {
    CLUSTER: "jetstream:gke:GkeCluster",
    NODE_POOL: "jetstream:gke:GkeCluster",
    K8S_PROVIDER: "jetstream:gke:GkeCluster",
    "gcp:storage/bucket:Bucket": "jetstream:iam:ServingIdentity",
    "gcp:serviceaccount/account:Account": "jetstream:iam:ServingIdentity",
    "gcp:storage/bucketIAMMember:BucketIAMMember": "jetstream:iam:ServingIdentity",
    "gcp:serviceaccount/iAMMember:IAMMember": "jetstream:iam:ServingIdentity",
    CONFIG_FILE: "jetstream:lws:LeaderWorkerSetController",
    "kubernetes:core/v1:Namespace": "jetstream:serving:JetStreamServer",
    "kubernetes:core/v1:ServiceAccount": "jetstream:serving:JetStreamServer",
    LWS: "jetstream:serving:JetStreamServer",
    SERVICE: "jetstream:serving:JetStreamServer",
}
COMPONENTS = ("jetstream:gke:GkeCluster", "jetstream:iam:ServingIdentity", "jetstream:lws:LeaderWorkerSetController", "jetstream:serving:JetStreamServer")


@pytest.fixture(scope="module")
def recordings():
    return {stack: run_stack(stack_file_config(stack), stack) for stack in EXAMPLE_STACKS}


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_every_resource_has_its_component_parent(recordings, stack):
    recording = recordings[stack]
    for component in COMPONENTS:
        assert recording.one(component).parent_type == "pulumi:pulumi:Stack"
    for resource in recording.resources:
        if resource.type not in COMPONENTS:
            assert resource.parent_type == EXPECTED_PARENTS[resource.type], resource.name


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_example_stack_resources(recordings, stack):
    recording = recordings[stack]
    cfg, plan = example(stack)
    counts = {type_: len(recording.of_type(type_)) for type_ in (CLUSTER, NODE_POOL, LWS, SERVICE, CONFIG_FILE)}
    assert counts == {CLUSTER: 1, NODE_POOL: 1 + len(cfg.slice_roles), LWS: 1, SERVICE: 1, CONFIG_FILE: 1}
    pools = {pool.inputs["name"]: pool.inputs for pool in recording.of_type(NODE_POOL)}
    assert set(pools) == {"system", *plan.node_pools}
    for name in plan.node_pools:
        assert pools[name]["nodeCount"] == cfg.tpu_slice.hosts
        assert pools[name]["nodeConfig"]["machineType"] == cfg.tpu_slice.machine_type


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_lws_resource_is_the_rendered_manifest(recordings, stack):
    cfg, plan = example(stack)
    expected = manifests.leader_worker_set(cfg, plan)
    lws = recordings[stack].one(LWS).inputs
    assert (lws["apiVersion"], lws["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert lws["spec"] == expected["spec"]
    assert lws["metadata"] == expected["metadata"]
    service = recordings[stack].one(SERVICE).inputs
    assert service["spec"] == {**manifests.service(cfg)["spec"]}
    assert service["metadata"]["name"] == cfg.service_name


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_namespace_and_service_account_are_the_rendered_manifests(recordings, stack):
    """JetStreamServer and the offline render build them with the same functions."""
    cfg, _ = example(stack)
    recording = recordings[stack]
    (namespace,) = recording.of_type("kubernetes:core/v1:Namespace")
    assert namespace.inputs["metadata"] == manifests.namespace(cfg)["metadata"]
    ksa = recording.one("kubernetes:core/v1:ServiceAccount").inputs
    email = recording.one("gcp:serviceaccount/account:Account").inputs["accountId"] + f"@{GCP_PROJECT}.iam.gserviceaccount.com"  # the mock's email
    assert ksa["metadata"] == manifests.service_account(cfg, email)["metadata"]


def test_bundled_stack_deploys_the_bundled_layout():
    raw, _ = bundled_raw("llama3-405b-v6e16")
    recording = run_stack({"gcp:project": "my-gcp-project", **qualified(raw)}, "llama3-405b-v6e16")
    cfg, plan = bundled_example("llama3-405b-v6e16")
    lws = recording.one(LWS).inputs
    assert lws["spec"] == manifests.leader_worker_set(cfg, plan)["spec"]
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 4
    assert [pool.inputs["nodeCount"] for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"] == [4]


def test_disaggregated_stack_has_prefill_and_generate_pools(recordings):
    pools = [pool.inputs for pool in recordings["llama2-70b-disagg"].of_type(NODE_POOL) if pool.inputs["name"] != "system"]
    assert sorted(pool["name"] for pool in pools) == ["v6e-8-generate", "v6e-8-prefill"]
    for pool in pools:
        assert pool["nodeCount"] == 2 and pool["placementPolicy"] == {"type": "COMPACT", "tpuTopology": "2x4"}


def test_lws_waits_for_controller_node_pools_and_identity(recordings):
    recording = recordings["llama3-405b-v6e16"]
    # Pulumi expands a component in depends_on into its children.
    dependencies = {recording.by_urn(urn).type for urn in recording.one(LWS).dependencies}
    assert {CONFIG_FILE, NODE_POOL, "gcp:serviceaccount/iAMMember:IAMMember", "gcp:storage/bucketIAMMember:BucketIAMMember",
            "kubernetes:core/v1:ServiceAccount", "kubernetes:core/v1:Namespace"} <= dependencies
    pools = {recording.by_urn(urn).inputs["name"] for urn in recording.one(LWS).dependencies if recording.by_urn(urn).type == NODE_POOL}
    assert "v6e-16-serving" in pools


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_kubernetes_resources_use_the_clusters_explicit_provider(recordings, stack):
    recording = recordings[stack]
    provider_urn = recording.one(K8S_PROVIDER).urn
    for resource in recording.resources:
        if resource.type.startswith("kubernetes:"):
            assert resource.provider.startswith(provider_urn + "::"), resource.name
    assert recording.one(K8S_PROVIDER).inputs["enableServerSideApply"] == "true"  # provider inputs travel as strings


def test_lws_controller_installs_the_pinned_release(recordings):
    install = recordings["llama3-405b-v6e16"].one(CONFIG_FILE).inputs
    assert install["file"] == release_manifest_url("v0.10.0") == "https://github.com/kubernetes-sigs/lws/releases/download/v0.10.0/manifests.yaml"


def test_new_cluster_settings(recordings):
    cluster = recordings["llama3-405b-v6e16"].one(CLUSTER).inputs
    assert cluster["removeDefaultNodePool"] is True and cluster["deletionProtection"] is True
    assert cluster["workloadIdentityConfig"] == {"workloadPool": "my-gcp-project.svc.id.goog"}
    assert cluster["releaseChannel"] == {"channel": "UNSPECIFIED"}
    assert cluster["location"] == "us-east5"
    small = recordings["llama3-8b-v6e8"].one(CLUSTER).inputs
    assert small["deletionProtection"] is False


def test_identity_is_least_privilege(recordings):
    recording = recordings["llama3-405b-v6e16"]
    cfg, _ = example("llama3-405b-v6e16")
    grants = {(member.inputs["bucket"], member.inputs["role"]) for member in recording.of_type("gcp:storage/bucketIAMMember:BucketIAMMember")}
    assert grants == {(cfg.scratch_bucket, "roles/storage.objectUser"), ("my-gcp-project-checkpoints", "roles/storage.objectViewer")}
    binding = recording.one("gcp:serviceaccount/iAMMember:IAMMember").inputs
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["member"] == "serviceAccount:my-gcp-project.svc.id.goog[jetstream/jetstream-pathways]"
    bucket = recording.one("gcp:storage/bucket:Bucket").inputs
    assert bucket["name"] == cfg.scratch_bucket and bucket["publicAccessPrevention"] == "enforced"
    ksa = recording.one("kubernetes:core/v1:ServiceAccount").inputs
    assert ksa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith(cfg.google_service_account_id + "@")


def test_outputs(recordings):
    recording = recordings["llama3-405b-v6e16"]
    outputs = recording.outputs
    assert outputs["headPod"] == "jetstream-pathways-0" and outputs["lwsName"] == "jetstream-pathways"
    assert outputs["serviceUrl"] == "http://jetstream-svc.jetstream.svc.cluster.local:8000"
    assert outputs["portForwardCommand"] == "kubectl -n jetstream port-forward pod/jetstream-pathways-0 8000:8000"
    assert "localhost:8000/generate" in outputs["curlExample"]
    assert outputs["clusterName"] == "jetstream-tpu" and outputs["clusterEndpoint"] == "203.0.113.10"
    assert outputs["plan"]["hbmGiBPerChip"]["needed"] < outputs["plan"]["hbmGiBPerChip"]["usable"]
    assert "kubeconfig" in recording.secret_outputs and "headPod" not in recording.secret_outputs
    kubeconfig = yaml.safe_load(outputs["kubeconfig"])
    assert kubeconfig["users"][0]["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    assert kubeconfig["clusters"][0]["cluster"]["server"] == "https://203.0.113.10"


def _tpu_pools(raw: dict[str, str]) -> list[dict]:
    config = {"gcp:project": GCP_PROJECT, **qualified({"model": "llama2-7b", "checkpointPath": "gs://test-checkpoints/m/0/items", **raw})}
    recording = run_stack(config)
    return [pool.inputs for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"]


@pytest.mark.parametrize("row", tpu.SLICES, ids=lambda row: f"{row.topology}-{row.machine_type}")
def test_node_pool_for_every_v6e_shape(row):
    raw = {"topology": row.topology, "tpuMachineType": row.machine_type, "tensorParallelism": "1", "fsdpParallelism": "-1"}
    (pool,) = _tpu_pools(raw)
    assert pool["nodeConfig"]["machineType"] == row.machine_type
    assert pool["nodeCount"] == row.hosts == row.chips // row.chips_per_host
    assert pool["nodeLocations"] == ["us-east5-b"]
    if row.multi_host:
        assert pool["placementPolicy"] == {"type": "COMPACT", "tpuTopology": row.topology}
        assert pool["management"] == {"autoRepair": True, "autoUpgrade": False}
    else:
        assert "placementPolicy" not in pool and pool["management"]["autoUpgrade"] is True


def test_capacity_choices():
    (spot,) = _tpu_pools({"topology": "2x2", "tpuProvisioning": "spot"})
    assert spot["nodeConfig"]["spot"] is True and "reservationAffinity" not in spot["nodeConfig"]
    (reserved,) = _tpu_pools({"topology": "2x2", "tpuProvisioning": "reservation", "tpuReservation": "v6e-res"})
    assert reserved["nodeConfig"]["reservationAffinity"] == {
        "consumeReservationType": "SPECIFIC_RESERVATION", "key": "compute.googleapis.com/reservation-name", "values": ["v6e-res"]}
    (on_demand,) = _tpu_pools({"topology": "2x2"})
    assert "spot" not in on_demand["nodeConfig"]


def test_release_channel_forces_auto_upgrade_on_multi_host_pools():
    (pool,) = _tpu_pools({"topology": "4x4", "releaseChannel": "REGULAR", "tensorParallelism": "-1"})
    assert pool["management"]["autoUpgrade"] is True


def test_existing_cluster_is_looked_up_not_created():
    config = {"gcp:project": GCP_PROJECT, **qualified({"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-checkpoints/m/0/items",
                                                        "existingClusterName": "shared-tpu", "clusterLocation": "us-east5"})}
    recording = run_stack(config)
    assert recording.of_type(CLUSTER) == []
    assert [pool.inputs["name"] for pool in recording.of_type(NODE_POOL)] == ["v6e-4-serving"]
    assert recording.of_type(NODE_POOL)[0].inputs["cluster"] == "shared-tpu"
    assert ("gcp:container/getCluster:getCluster", {"name": "shared-tpu", "location": "us-east5", "project": GCP_PROJECT}) in recording.calls
    assert recording.outputs["clusterEndpoint"] == "198.51.100.7"


def test_default_namespace_is_not_created():
    config = {"gcp:project": GCP_PROJECT, **qualified({"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-checkpoints/m/0/items", "namespace": "default"})}
    recording = run_stack(config)
    assert recording.of_type("kubernetes:core/v1:Namespace") == []
    assert recording.one(LWS).inputs["metadata"]["namespace"] == "default"
