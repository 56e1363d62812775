"""The Pulumi program under mocks: resources, parents, inputs, dependencies, outputs."""

from __future__ import annotations

import pytest
import yaml
from pulumi.runtime import rpc

from components.core import manifests, tpu
from components.resources.lws_controller import release_manifest_url
from tests.stack.pulumi_harness import (
    ACCESS_TOKEN,
    EXAMPLE_STACKS,
    GCP_PROJECT,
    WORKLOAD_STACKS,
    image_digest,
    qualified,
    run_stack,
    stack_file_config,
    stack_role,
)
from tests.stack.stack_helpers import bundled_example, bundled_raw, example

NODE_POOL = "gcp:container/nodePool:NodePool"
CLUSTER = "gcp:container/cluster:Cluster"
LWS = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
SERVICE = "kubernetes:core/v1:Service"
CONFIG_FILE = "kubernetes:yaml/v2:ConfigFile"
HPA = "kubernetes:autoscaling/v2:HorizontalPodAutoscaler"
POD_MONITORING = "kubernetes:monitoring.googleapis.com/v1:PodMonitoring"
ADAPTER = "jetstream:autoscaling:MetricsAdapter"
AUTOSCALER = "jetstream:autoscaling:LeaderWorkerSetAutoscaler"
IMAGE_COMPONENT = "jetstream:images:BundledServerImage"  # serverRuntime=bundled without bundledServerImage
K8S_PROVIDER = "pulumi:providers:kubernetes"
ACCOUNT = "gcp:serviceaccount/account:Account"
PROJECT_MEMBER = "gcp:projects/iAMMember:IAMMember"
ACCOUNT_MEMBER = "gcp:serviceaccount/iAMMember:IAMMember"
BUCKET_MEMBER = "gcp:storage/bucketIAMMember:BucketIAMMember"

EXPECTED_PARENTS = {
    CLUSTER: "jetstream:gke:GkeCluster",
    NODE_POOL: "jetstream:gke:GkeCluster",
    K8S_PROVIDER: "jetstream:gke:GkeCluster",
    "gcp:storage/bucket:Bucket": "jetstream:iam:ServingIdentity",
    ACCOUNT: ("jetstream:iam:ServingIdentity", "jetstream:iam:NodeIdentity"),
    PROJECT_MEMBER: ("jetstream:iam:NodeIdentity", ADAPTER),
    BUCKET_MEMBER: "jetstream:iam:ServingIdentity",
    ACCOUNT_MEMBER: "jetstream:iam:ServingIdentity",
    CONFIG_FILE: ("jetstream:lws:LeaderWorkerSetController", ADAPTER),
    POD_MONITORING: AUTOSCALER,
    HPA: AUTOSCALER,
    "docker-build:index:Image": IMAGE_COMPONENT,
    "gcp:artifactregistry/repository:Repository": IMAGE_COMPONENT,
    "kubernetes:core/v1:Namespace": "jetstream:serving:JetStreamServer",
    "kubernetes:core/v1:ServiceAccount": "jetstream:serving:JetStreamServer",
    "kubernetes:core/v1:Secret": "jetstream:serving:JetStreamServer",
    LWS: "jetstream:serving:JetStreamServer",
    SERVICE: "jetstream:serving:JetStreamServer",
    "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicy": "jetstream:admission:StackIsolation",
    "kubernetes:admissionregistration.k8s.io/v1:ValidatingAdmissionPolicyBinding": "jetstream:admission:StackIsolation",
}
STACK_REFERENCE_OWNER = "jetstream:platform:PlatformReference"
COMPONENTS = {  # per role; plus SCALING_COMPONENTS where maxReplicas > replicas
    "all": (
        "jetstream:iam:NodeIdentity",
        "jetstream:gke:GkeCluster",
        "jetstream:admission:StackIsolation",
        "jetstream:iam:ServingIdentity",
        "jetstream:lws:LeaderWorkerSetController",
        "jetstream:serving:JetStreamServer",
    ),
    "platform": (
        "jetstream:iam:NodeIdentity",
        "jetstream:gke:GkeCluster",
        "jetstream:lws:LeaderWorkerSetController",
        ADAPTER,
    ),
    "serving": (
        STACK_REFERENCE_OWNER,
        "jetstream:iam:NodeIdentity",
        "jetstream:gke:GkeCluster",
        "jetstream:admission:StackIsolation",
        "jetstream:iam:ServingIdentity",
        "jetstream:serving:JetStreamServer",
    ),
}
SCALING_COMPONENTS = (ADAPTER, AUTOSCALER)
MINIMAL = {"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-checkpoints/m/0/items"}


@pytest.fixture(scope="module")
def recordings():
    return {stack: run_stack(stack_file_config(stack), stack) for stack in EXAMPLE_STACKS}


def _run(stack: str = "test", **raw: str):
    return run_stack({"gcp:project": GCP_PROJECT, **qualified({**MINIMAL, **raw})}, stack)


def _run_bundled(stack: str = "llama3-8b-v6e8", **overrides: str):
    raw, _ = bundled_raw(stack)
    return run_stack({"gcp:project": "my-gcp-project", **qualified({**raw, **overrides})}, stack)


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_every_resource_has_its_component_parent(recordings, stack):
    recording = recordings[stack]
    role = stack_role(stack)
    scaled = role != "platform" and example(stack)[0].scaling.enabled
    # A serving stack's HPA reads its metrics through the platform's adapter.
    scaling = (AUTOSCALER,) if scaled and role == "serving" else SCALING_COMPONENTS if scaled else ()
    image = (IMAGE_COMPONENT,) if role != "platform" and example(stack)[0].builds_server_image else ()
    components = tuple(dict.fromkeys((*COMPONENTS[role], *scaling, *image)))
    for component in components:
        assert recording.one(component).parent_type == "pulumi:pulumi:Stack"
    assert all(recording.of_type(component) == [] for component in set(SCALING_COMPONENTS) - set(components))
    for resource in recording.resources:
        if resource.type not in components:
            assert resource.parent_type in EXPECTED_PARENTS[resource.type], resource.name


@pytest.mark.parametrize("stack", WORKLOAD_STACKS)
def test_example_stack_resources(recordings, stack):
    recording = recordings[stack]
    cfg, plan = example(stack)
    scaled, owns_cluster = cfg.scaling.enabled, not cfg.serving_role
    counts = {
        type_: len(recording.of_type(type_))
        for type_ in (CLUSTER, NODE_POOL, LWS, SERVICE, CONFIG_FILE, HPA, POD_MONITORING)
    }
    # The LWS release and the metrics adapter are cluster-wide: only the stack that owns the cluster installs them.
    assert counts == {
        CLUSTER: int(owns_cluster),
        NODE_POOL: int(owns_cluster) + len(cfg.slice_roles) * cfg.scaling.max_replicas,
        LWS: 1,
        SERVICE: 1,
        CONFIG_FILE: int(owns_cluster) * (2 if scaled else 1),
        HPA: int(scaled),
        POD_MONITORING: int(scaled),
    }
    pools = {pool.inputs["name"]: pool.inputs for pool in recording.of_type(NODE_POOL)}
    assert set(pools) == {*(["system"] if owns_cluster else []), *plan.node_pools}
    fixed = set(plan.node_pools[: len(cfg.slice_roles) * cfg.scaling.replicas])  # replicas that always run
    for name in plan.node_pools:
        if name in fixed:
            assert pools[name]["nodeCount"] == cfg.tpu_slice.hosts and "autoscaling" not in pools[name]
        else:  # created empty; the cluster autoscaler grows the whole slice when the HPA adds a replica
            assert "nodeCount" not in pools[name] and pools[name]["initialNodeCount"] == 0
            assert pools[name]["autoscaling"] == {"minNodeCount": 0, "maxNodeCount": cfg.tpu_slice.hosts}
        assert pools[name]["nodeConfig"]["machineType"] == cfg.tpu_slice.machine_type
        assert pools[name]["nodeConfig"]["labels"]["jetstream-tpu/deployment"] == f"jetstream-{stack}"


# The LWS of a stack that builds its image runs the pushed digest:
# test_bundled_server_image_is_built_pushed_and_run_by_digest.
@pytest.mark.parametrize("stack", [stack for stack in WORKLOAD_STACKS if not example(stack)[0].builds_server_image])
def test_lws_resource_is_the_rendered_manifest(recordings, stack):
    cfg, plan = example(stack)
    expected = manifests.leader_worker_set(cfg, plan).to_dict()
    lws = recordings[stack].one(LWS).inputs
    assert (lws["apiVersion"], lws["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert lws["spec"] == expected["spec"]
    assert lws["metadata"] == expected["metadata"]
    service = recordings[stack].one(SERVICE).inputs
    assert service["spec"] == manifests.service(cfg).to_dict()["spec"]
    assert service["metadata"] == manifests.service(cfg).to_dict()["metadata"]


@pytest.mark.parametrize("stack", WORKLOAD_STACKS)
def test_namespace_and_service_account_are_the_rendered_manifests(recordings, stack):
    """JetStreamServer and the offline render build them with the same functions."""
    cfg, _ = example(stack)
    recording = recordings[stack]
    (namespace,) = recording.of_type("kubernetes:core/v1:Namespace")
    assert namespace.inputs["metadata"] == manifests.namespace(cfg).to_dict()["metadata"]
    ksa = recording.one("kubernetes:core/v1:ServiceAccount").inputs
    # Bound (bundled server) to the Google account the stack created, whose email GCP (here the mocks) assigns.
    bound = manifests.service_account(cfg, recording.outputs["serviceAccountEmail"])
    assert ksa["metadata"] == bound.to_dict()["metadata"]


def test_bundled_stack_deploys_the_bundled_layout():
    recording = _run_bundled("llama3-405b-v6e16")
    cfg, plan = bundled_example("llama3-405b-v6e16")
    lws = recording.one(LWS).inputs
    assert lws["spec"] == manifests.leader_worker_set(cfg, plan).to_dict()["spec"]
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 4
    assert [pool.inputs["nodeCount"] for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"] == [4]


def test_disaggregated_stack_has_prefill_and_generate_pools(recordings):
    pools = [
        pool.inputs for pool in recordings["llama2-70b-disagg"].of_type(NODE_POOL) if pool.inputs["name"] != "system"
    ]
    assert sorted(pool["name"] for pool in pools) == [
        "v6e-8-generate-llama2-70b-disagg",
        "v6e-8-prefill-llama2-70b-disagg",
    ]
    for pool in pools:
        assert pool["nodeCount"] == 2 and pool["placementPolicy"] == {"type": "COMPACT", "tpuTopology": "2x4"}


def _dependency_types(recording, resource) -> set[str]:
    return {recording.by_urn(urn).type for urn in resource.dependencies}


def test_lws_waits_for_controller_node_pools_and_identity(recordings):
    recording = recordings["llama3-405b-v6e16"]
    # Pulumi expands a component in depends_on into its children.
    assert {
        CONFIG_FILE,
        NODE_POOL,
        BUCKET_MEMBER,
        "kubernetes:core/v1:ServiceAccount",
        "kubernetes:core/v1:Namespace",
    } <= _dependency_types(recording, recording.one(LWS))
    pools = {
        recording.by_urn(urn).inputs["name"]
        for urn in recording.one(LWS).dependencies
        if recording.by_urn(urn).type == NODE_POOL
    }
    assert pools == {"v6e-16-serving-llama3-405b-v6e16"}


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
    assert (
        install["file"]
        == release_manifest_url("v0.10.0")
        == "https://github.com/kubernetes-sigs/lws/releases/download/v0.10.0/manifests.yaml"
    )


def test_new_cluster_settings(recordings):
    cluster = recordings["llama3-405b-v6e16"].one(CLUSTER).inputs
    assert cluster["name"] == "jetstream-llama3-405b-v6e16"
    assert cluster["removeDefaultNodePool"] is True and cluster["deletionProtection"] is True
    assert cluster["workloadIdentityConfig"] == {"workloadPool": "my-gcp-project.svc.id.goog"}
    assert cluster["releaseChannel"] == {"channel": "UNSPECIFIED"}
    assert cluster["location"] == "us-east5"
    small = recordings["llama3-8b-v6e8"].one(CLUSTER).inputs
    assert small["deletionProtection"] is False


def test_outputs(recordings):
    recording = recordings["llama3-405b-v6e16"]
    outputs = recording.outputs
    assert outputs["headPod"] == "jetstream-pathways-0" and outputs["lwsName"] == "jetstream-pathways"
    assert outputs["namespace"] == "jetstream-llama3-405b-v6e16" and outputs["serviceName"] == "jetstream-svc"
    assert outputs["httpUrl"] == "http://jetstream-svc.jetstream-llama3-405b-v6e16.svc.cluster.local:8000"
    assert (
        outputs["portForwardCommand"]
        == "kubectl -n jetstream-llama3-405b-v6e16 port-forward pod/jetstream-pathways-0 8000:8000"
    )
    assert "localhost:8000/generate" in outputs["curlExample"]
    assert outputs["clusterName"] == "jetstream-llama3-405b-v6e16" and outputs["clusterEndpoint"] == "203.0.113.10"
    assert outputs["plan"]["hbmGiBPerChip"]["needed"] < outputs["plan"]["hbmGiBPerChip"]["usable"]
    assert "kubeconfig" in recording.secret_outputs and "headPod" not in recording.secret_outputs
    kubeconfig = yaml.safe_load(outputs["kubeconfig"])
    assert kubeconfig["users"][0]["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    assert kubeconfig["clusters"][0]["cluster"]["server"] == "https://203.0.113.10"


def _tpu_pools(raw: dict[str, str]) -> list[dict]:
    recording = _run(**{"model": "llama2-7b", **raw})
    return [pool.inputs for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"]


@pytest.mark.parametrize("row", tpu.SLICES, ids=lambda row: f"{row.topology}-{row.machine_type}")
def test_node_pool_for_every_v6e_shape(row):
    raw = {
        "topology": row.topology,
        "tpuMachineType": row.machine_type,
        "tensorParallelism": "1",
        "fsdpParallelism": "-1",
    }
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
        "consumeReservationType": "SPECIFIC_RESERVATION",
        "key": "compute.googleapis.com/reservation-name",
        "values": ["v6e-res"],
    }
    (on_demand,) = _tpu_pools({"topology": "2x2"})
    assert "spot" not in on_demand["nodeConfig"]


def test_release_channel_forces_auto_upgrade_on_multi_host_pools():
    (pool,) = _tpu_pools({"topology": "4x4", "releaseChannel": "REGULAR", "tensorParallelism": "-1"})
    assert pool["management"]["autoUpgrade"] is True


@pytest.mark.parametrize(("channel", "auto_upgrade"), [("UNSPECIFIED", False), ("RAPID", True)])
def test_pools_on_an_existing_cluster_follow_its_live_release_channel(channel, auto_upgrade):
    values = {
        **MINIMAL,
        "model": "llama2-7b",
        "topology": "4x4",
        "tensorParallelism": "-1",
        "existingClusterName": "shared-tpu",
    }
    recording = run_stack({"gcp:project": GCP_PROJECT, **qualified(values)}, release_channel=channel)
    (pool,) = recording.of_type(NODE_POOL)
    assert pool.inputs["management"]["autoUpgrade"] is auto_upgrade and pool.inputs["location"] == "us-east5"


def test_existing_cluster_is_looked_up_not_created():
    recording = _run(existingClusterName="shared-tpu", clusterLocation="us-east5")
    assert recording.of_type(CLUSTER) == []
    assert [pool.inputs["name"] for pool in recording.of_type(NODE_POOL)] == ["v6e-4-serving-test"]
    assert recording.of_type(NODE_POOL)[0].inputs["cluster"] == "shared-tpu"
    assert (
        "gcp:container/getCluster:getCluster",
        {"name": "shared-tpu", "location": "us-east5", "project": GCP_PROJECT},
    ) in recording.calls
    assert recording.outputs["clusterEndpoint"] == "198.51.100.7"


def test_default_namespace_is_not_created():
    recording = _run(namespace="default")
    assert recording.of_type("kubernetes:core/v1:Namespace") == []
    assert recording.one(LWS).inputs["metadata"]["namespace"] == "default"


# ---------------------------------------------------------------------------------------------
# The first and every later `pulumi up` on a real project.


def test_workload_identity_binding_waits_for_the_cluster_that_creates_the_pool():
    """8.1: the pool PROJECT.svc.id.goog exists once the first Workload Identity cluster does."""
    recording = _run_bundled()
    binding = recording.one(ACCOUNT_MEMBER)
    assert binding.inputs["member"] == "serviceAccount:my-gcp-project.svc.id.goog[llama3-8b/jetstream-pathways]"
    assert recording.one(CLUSTER).urn in binding.dependencies
    # On an existing cluster the pool exists already: nothing to wait for, and no cluster to wait on.
    existing = _run_bundled(existingClusterName="shared-tpu", clusterLocation="us-east5", installLwsController="never")
    assert (
        existing.of_type(CLUSTER) == []
        and existing.one(ACCOUNT_MEMBER).inputs["role"] == "roles/iam.workloadIdentityUser"
    )


def test_the_metrics_adapters_binding_waits_for_the_cluster_that_creates_the_pool(recordings):
    """8.1 for the adapter: its principal names the same pool PROJECT.svc.id.goog."""
    for stack in ("llama3-8b-autoscale", "platform"):
        recording = recordings[stack]
        adapter = recording.one(ADAPTER)
        access = next(member for member in recording.of_type(PROJECT_MEMBER) if member.parent == adapter.urn)
        assert "/workloadIdentityPools/my-gcp-project.svc.id.goog/subject/ns/custom-metrics/" in access.inputs["member"]
        assert recording.one(CLUSTER).urn in access.dependencies, stack


GLOBAL_NAMES = {  # resource type -> the input that must be unique per project (or globally)
    CLUSTER: "name",
    ACCOUNT: "accountId",
    "gcp:storage/bucket:Bucket": "name",
    "gcp:artifactregistry/repository:Repository": "repositoryId",
    "kubernetes:core/v1:Namespace": "metadata",
}


def _project_wide_names(recording) -> set[tuple[str, str]]:
    names = set()
    for type_, field in GLOBAL_NAMES.items():
        for resource in recording.of_type(type_):
            value = resource.inputs[field]
            names.add((type_, value["name"] if isinstance(value, dict) else value))
    # Two stacks on one cluster: node pool names must differ too.
    names |= {
        (NODE_POOL, pool.inputs["name"]) for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"
    }
    return names


def test_two_stacks_in_one_project_share_no_name():
    """8.2: every name that must be unique in a project (or a cluster) is derived from the stack."""
    raw, _ = bundled_raw("llama3-8b-v6e8")
    raw = {key: value for key, value in raw.items() if key != "namespace"} | {"bundledServerImage": ""}
    first = run_stack({"gcp:project": GCP_PROJECT, **qualified(raw)}, "team-a")
    second = run_stack({"gcp:project": GCP_PROJECT, **qualified(raw)}, "team-b")
    first_names, second_names = _project_wide_names(first), _project_wide_names(second)
    assert {type_ for type_, _ in first_names} == {*GLOBAL_NAMES, NODE_POOL}
    assert first_names.isdisjoint(second_names)


def test_lws_controller_is_installed_only_where_the_stack_owns_the_cluster():
    """8.3: installLwsController (default auto) installs the cluster-wide release on a cluster the
    stack creates; never does not, and neither does the default on an existing cluster (its owner's).
    The LeaderWorkerSet then waits for the node pools and the identity only."""
    assert len(_run().of_type(CONFIG_FILE)) == 1
    for without in (
        _run(installLwsController="never"),
        _run(existingClusterName="shared-tpu", clusterLocation="us-east5"),
    ):
        assert without.of_type(CONFIG_FILE) == [] and without.of_type("jetstream:lws:LeaderWorkerSetController") == []
        assert NODE_POOL in _dependency_types(without, without.one(LWS))


def test_lws_is_replaced_not_patched_where_the_webhook_refuses_updates(recordings):
    """8.4: changes under the immutable paths replace the LWS, deleting the old one first."""
    for stack in WORKLOAD_STACKS:
        lws = recordings[stack].one(LWS)
        assert set(lws.replace_on_changes) == {"spec.leaderWorkerTemplate.subGroupPolicy", "spec.networkConfig"}
        assert lws.delete_before_replace is True


@pytest.mark.parametrize("stack", WORKLOAD_STACKS)
def test_a_replaced_tpu_pool_is_deleted_before_its_successor_is_created(recordings, stack):
    """A topology change changes the TPU pools' GKE names (so replaces them); creating the new slice
    before deleting the old one would need twice the TPU capacity, which a reservation or a tight quota refuses."""
    recording = recordings[stack]
    tpu_pools = [pool for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"]
    assert tpu_pools and all(pool.delete_before_replace for pool in tpu_pools)
    assert all(
        not pool.delete_before_replace for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] == "system"
    )


def test_service_never_waits_for_endpoints_and_the_lws_waits_only_when_asked():
    """8.5: the Service skips pulumi-kubernetes' 10-minute endpoint wait; waitForReady=true waits for
    the LeaderWorkerSet's Available condition, with a timeout derived from the startup delay."""
    default = _run()
    assert default.one(SERVICE).inputs["metadata"]["annotations"] == {"pulumi.com/skipAwait": "true"}
    assert (
        "pulumi.com/waitFor" not in default.one(LWS).inputs["metadata"]["annotations"]
        and default.one(LWS).custom_timeouts == {}
    )
    waiting = _run(waitForReady="true", startupProbeDelaySeconds="600")
    lws = waiting.one(LWS)
    assert lws.inputs["metadata"]["annotations"]["pulumi.com/waitFor"] == "condition=Available"
    # 30 minutes for nodes, pulls and reconcile, then twice the 600 s restore estimate.
    assert lws.custom_timeouts == {"create": "3000s", "update": "3000s"}
    assert waiting.one(SERVICE).inputs["metadata"]["annotations"] == {"pulumi.com/skipAwait": "true"}


def test_every_node_pool_runs_as_the_least_privilege_node_account(recordings):
    """8.6: no pool (nor the cluster's initial node) runs as the Compute Engine default account."""
    recording = recordings["llama2-70b-disagg"]
    accounts = {account.inputs["accountId"]: account for account in recording.of_type(ACCOUNT)}
    email = f"js-nodes-llama2-70b-disagg@{GCP_PROJECT}.iam.gserviceaccount.com"
    assert "js-nodes-llama2-70b-disagg" in accounts
    roles = {member.inputs["role"]: member.inputs for member in recording.of_type(PROJECT_MEMBER)}
    assert set(roles) == {
        "roles/logging.logWriter",
        "roles/monitoring.metricWriter",
        "roles/monitoring.viewer",
        "roles/stackdriver.resourceMetadata.writer",
        "roles/artifactregistry.reader",
    }
    assert {(member["project"], member["member"]) for member in roles.values()} == {
        ("my-gcp-project", f"serviceAccount:{email}")
    }
    for pool in recording.of_type(NODE_POOL):
        assert pool.inputs["nodeConfig"]["serviceAccount"] == email, pool.name
        assert pool.inputs["nodeConfig"]["oauthScopes"] == ["https://www.googleapis.com/auth/cloud-platform"]
        assert PROJECT_MEMBER in _dependency_types(recording, pool)  # roles before nodes
    assert recording.one(CLUSTER).inputs["nodeConfig"]["serviceAccount"] == email


def test_pathways_pools_run_without_workload_identity_and_their_identity_gets_exactly_the_bucket_grants(recordings):
    """8.7: Pathways TPU pools use GCE_METADATA (Google's tutorial); the pods then act as the
    node account, which gets scratch read/write and checkpoint read on those buckets only."""
    recording = recordings["llama3-405b-v6e16"]
    cfg, _ = example("llama3-405b-v6e16")
    node_member = f"serviceAccount:js-nodes-llama3-405b-v6e16@{GCP_PROJECT}.iam.gserviceaccount.com"
    modes = {
        pool.inputs["name"]: pool.inputs["nodeConfig"]["workloadMetadataConfig"]["mode"]
        for pool in recording.of_type(NODE_POOL)
    }
    assert modes == {"system": "GKE_METADATA", "v6e-16-serving-llama3-405b-v6e16": "GCE_METADATA"}
    grants = {
        (member.inputs["bucket"], member.inputs["role"], member.inputs["member"])
        for member in recording.of_type(BUCKET_MEMBER)
    }
    assert grants == {
        (cfg.scratch_bucket, "roles/storage.objectUser", node_member),
        ("my-gcp-project-checkpoints", "roles/storage.objectViewer", node_member),
    }
    assert recording.of_type(ACCOUNT_MEMBER) == [] and len(recording.of_type(ACCOUNT)) == 1  # no workload GSA to bind
    assert "annotations" not in recording.one("kubernetes:core/v1:ServiceAccount").inputs["metadata"]
    assert recording.outputs["serviceAccountEmail"] == node_member.removeprefix("serviceAccount:")
    bucket = recording.one("gcp:storage/bucket:Bucket").inputs
    assert bucket["name"] == cfg.scratch_bucket and bucket["publicAccessPrevention"] == "enforced"


def test_bundled_pods_keep_workload_identity_with_the_same_bucket_grants():
    recording = _run_bundled()
    workload_member = f"serviceAccount:js-pods-llama3-8b-v6e8@{GCP_PROJECT}.iam.gserviceaccount.com"
    modes = {pool.inputs["nodeConfig"]["workloadMetadataConfig"]["mode"] for pool in recording.of_type(NODE_POOL)}
    assert modes == {"GKE_METADATA"}
    assert {member.inputs["member"] for member in recording.of_type(BUCKET_MEMBER)} == {workload_member}
    ksa = recording.one("kubernetes:core/v1:ServiceAccount").inputs
    assert ksa["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": workload_member.removeprefix("serviceAccount:")
    }


IMAGE = "docker-build:index:Image"
SECRET_SIGNATURE_KEY, SECRET_SIGNATURE = rpc._special_sig_key, rpc._special_secret_sig  # how a secret input travels
REPOSITORY = "gcp:artifactregistry/repository:Repository"


def test_bundled_server_image_is_built_pushed_and_run_by_digest():
    """8.12: no bundledServerImage: the stack builds serving/Dockerfile into its own Artifact
    Registry repository and the LeaderWorkerSet runs the pushed digest."""
    recording = _run_bundled(bundledServerImage="")
    repository = recording.one(REPOSITORY).inputs
    assert (repository["repositoryId"], repository["location"], repository["format"]) == (
        "jetstream-llama3-8b-v6e8",
        "us-east5",
        "DOCKER",
    )
    image = recording.one(IMAGE)
    built = "us-east5-docker.pkg.dev/my-gcp-project/jetstream-llama3-8b-v6e8/jetstream-jax"
    assert image.inputs["dockerfile"] == {"location": "serving/Dockerfile"} and image.inputs["context"] == {
        "location": "."
    }
    assert image.inputs["buildArgs"] == {"JAX_EXTRA": "tpu"} and image.inputs["platforms"] == ["linux/amd64"]
    assert image.inputs["push"] is True and image.inputs["tags"] == [f"{built}:stack-build"]
    registries = image.inputs["registries"]  # secret as a whole: it carries the access token
    assert registries[SECRET_SIGNATURE_KEY] == SECRET_SIGNATURE
    assert registries["value"] == [
        {"address": "us-east5-docker.pkg.dev", "username": "oauth2accesstoken", "password": ACCESS_TOKEN}
    ]
    assert recording.one(REPOSITORY).urn in image.dependencies
    servers = [
        container
        for template in ("leaderTemplate", "workerTemplate")
        for container in recording.one(LWS).inputs["spec"]["leaderWorkerTemplate"][template]["spec"]["containers"]
    ]
    assert {container["image"] for container in servers} == {f"{built}@{image_digest(image.inputs)}"}
    assert IMAGE in _dependency_types(recording, recording.one(LWS))
    # The nodes pull it with the node account's Artifact Registry reader role, project-wide.
    assert "roles/artifactregistry.reader" in {member.inputs["role"] for member in recording.of_type(PROJECT_MEMBER)}


def test_an_unchanged_tree_gives_the_same_lws_and_a_given_image_is_not_built():
    first, second = _run_bundled(bundledServerImage=""), _run_bundled(bundledServerImage="")
    assert first.one(LWS).inputs == second.one(LWS).inputs
    given = _run_bundled()
    assert given.of_type(IMAGE) == [] and given.of_type(REPOSITORY) == []
    images = {
        container["image"]
        for container in given.one(LWS).inputs["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"]
    }
    assert images == {"registry.example/jetstream-jax:0.1.0-tpu"}


# ---------------------------------------------------------------------------------------------
# Replicas and autoscaling.


def test_an_autoscaled_stack_has_exactly_one_hpa_targeting_the_lws_by_name(recordings):
    recording = recordings["llama3-8b-autoscale"]
    lws, hpa = recording.one(LWS), recording.one(HPA)
    assert hpa.inputs["spec"]["scaleTargetRef"] == {
        "apiVersion": lws.inputs["apiVersion"],
        "kind": lws.inputs["kind"],
        "name": lws.inputs["metadata"]["name"],
    }
    assert hpa.inputs["metadata"]["namespace"] == lws.inputs["metadata"]["namespace"] == "llama3-8b-autoscale"
    assert (hpa.inputs["spec"]["minReplicas"], hpa.inputs["spec"]["maxReplicas"], lws.inputs["spec"]["replicas"]) == (
        1,
        3,
        1,
    )
    assert (
        recordings["llama3-405b-v6e16"].of_type(HPA) == []
        and recordings["llama3-405b-v6e16"].of_type(POD_MONITORING) == []
    )


def test_the_hpa_owns_the_replicas_once_the_lws_exists(recordings):
    """Server-side apply would hand spec.replicas back to Pulumi on every update (or conflict with the HPA)."""
    assert recordings["llama3-8b-autoscale"].one(LWS).ignore_changes == ["spec.replicas"]
    for stack in ("llama3-405b-v6e16", "llama2-70b-disagg", "llama3-8b-v6e8"):
        assert recordings[stack].one(LWS).ignore_changes == [], stack


def test_turning_autoscaling_off_applies_the_replicas_with_force():
    """maxReplicas back to replicas: ignoreChanges goes, so spec.replicas is applied again while the
    HPA's field manager (kube-controller-manager, scale subresource) still owns it; without force
    that apply fails with a field conflict. Force is on either way: while autoscaling, ignoreChanges
    keeps spec.replicas out of the apply, so it never undoes the HPA."""
    scaled = stack_file_config("llama3-8b-autoscale")
    unscaled = {
        key: value
        for key, value in scaled.items()
        if key not in ("jetstream-tpu:autoscalingMetric", "jetstream-tpu:autoscalingTarget")
    }
    off = run_stack({**unscaled, "jetstream-tpu:maxReplicas": "1"}, "llama3-8b-autoscale")
    on = run_stack(scaled, "llama3-8b-autoscale")
    assert off.of_type(HPA) == [] and off.one(LWS).ignore_changes == [] and off.one(LWS).inputs["spec"]["replicas"] == 1
    for recording in (on, off):
        assert recording.one(LWS).inputs["metadata"]["annotations"]["pulumi.com/patchForce"] == "true"
    assert on.one(LWS).ignore_changes == ["spec.replicas"]


def test_the_hpa_and_pod_monitoring_wait_for_the_workload_and_the_metrics_adapter(recordings):
    recording = recordings["llama3-8b-autoscale"]
    adapter = recording.one(ADAPTER)
    adapter_install = next(config for config in recording.of_type(CONFIG_FILE) if config.parent == adapter.urn)
    adapter_access = next(member for member in recording.of_type(PROJECT_MEMBER) if member.parent == adapter.urn)
    for type_ in (HPA, POD_MONITORING):
        dependencies = set(recording.one(type_).dependencies)
        assert {recording.one(LWS).urn, adapter_install.urn, adapter_access.urn} <= dependencies, type_
    assert adapter_access.inputs["role"] == "roles/monitoring.viewer"
    assert ("gcp:organizations/getProject:getProject", {"projectId": "my-gcp-project"}) in recording.calls


def test_jetstream_serves_the_metrics_the_pod_monitoring_scrapes(recordings):
    recording = recordings["llama3-8b-autoscale"]
    leader = recording.one(LWS).inputs["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    server = next(container for container in leader["containers"] if container["name"] == "jax-tpu")
    assert "prometheus_port=9090" in server["args"]
    assert recording.one(POD_MONITORING).inputs["spec"]["endpoints"] == [{"port": 9090, "path": "/", "interval": "15s"}]
    unscaled = recordings["llama3-8b-v6e8"].one(LWS).inputs["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    assert not any(
        arg.startswith("prometheus_port") for container in unscaled["containers"] for arg in container.get("args", [])
    )


def test_a_stack_on_an_existing_cluster_autoscales_through_the_adapter_of_the_clusters_owner():
    """The adapter is cluster-wide (its namespace, APIServices, ClusterRoles): destroying a stack that
    installed it on a shared cluster would break every custom-metrics HPA there."""
    recording = _run(
        existingClusterName="shared-tpu", clusterLocation="us-east5", installLwsController="never", maxReplicas="2"
    )
    assert recording.of_type(ADAPTER) == [] and recording.of_type(CONFIG_FILE) == []
    assert not any(
        member.inputs["role"] == "roles/monitoring.viewer" and member.inputs["member"].startswith("principal://")
        for member in recording.of_type(PROJECT_MEMBER)
    )
    hpa = recording.one(HPA)
    assert recording.one(LWS).urn in hpa.dependencies and hpa.inputs["spec"]["maxReplicas"] == 2
    assert len(_run(maxReplicas="2").of_type(ADAPTER)) == 1  # on a cluster the stack creates, it installs it


def test_fixed_replicas_get_a_slice_each_and_the_service_balances_over_their_leaders():
    recording = _run(replicas="3", topology="4x4", model="llama2-7b", tensorParallelism="-1")
    pools = sorted(pool.inputs["name"] for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system")
    assert pools == ["v6e-16-serving-r1-test", "v6e-16-serving-r2-test", "v6e-16-serving-test"]
    assert all(
        pool.inputs["nodeCount"] == 4 for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"
    )
    lws = recording.one(LWS)
    assert lws.inputs["spec"]["replicas"] == 3 and lws.ignore_changes == [] and recording.of_type(HPA) == []
    # The Service selects the app label, which every group's leader carries and no worker does.
    template = lws.inputs["spec"]["leaderWorkerTemplate"]
    selector = recording.one(SERVICE).inputs["spec"]["selector"]
    assert selector.items() <= template["leaderTemplate"]["metadata"]["labels"].items()
    assert "metadata" not in template["workerTemplate"]
