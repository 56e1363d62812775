"""Later `pulumi up`s: what a config change does to the cluster, the TPU slices and the cluster-wide pieces.

The provider replaces a resource when an input it marks ForceNew changes (terraform-provider-google,
google/services/container/resource_container_node_pool.go and node_config.go); Pulumi diffs the inputs
of the resource with the same URN, after putting back the old value of every ignored input. These
tests run the real program twice under mocks and compare what the engine would compare.
"""

from __future__ import annotations

import pulumi
import pytest
import yaml

from components.core import config_table
from components.core.config import parse_stack_config
from components.core.errors import ConfigError
from components.core.runtimes.pathways import DEFAULT_IMAGES
from components.resources import lws_controller
from tests.stack.pulumi_harness import GCP_PROJECT, ROOT, qualified, run_stack, stack_file_config
from tests.stack.stack_helpers import config

CLUSTER = "gcp:container/cluster:Cluster"
NODE_POOL = "gcp:container/nodePool:NodePool"
CONFIG_FILE = "kubernetes:yaml/v2:ConfigFile"
LWS_CONTROLLER = "jetstream:lws:LeaderWorkerSetController"
PROJECT_MEMBER = "gcp:projects/iAMMember:IAMMember"
ADAPTER = "jetstream:autoscaling:MetricsAdapter"
# NodePool inputs the provider replaces the pool for (ForceNew in resource_container_node_pool.go;
# under nodeConfig, node_config.go).
NODE_POOL_FORCE_NEW = ("name", "cluster", "location", "project", "initialNodeCount", "placementPolicy")
NODE_CONFIG_FORCE_NEW = ("spot", "reservationAffinity", "serviceAccount", "oauthScopes")
MINIMAL = {"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-checkpoints/m/0/items"}


def _run(stack: str = "test", **raw: str):
    return run_stack({"gcp:project": GCP_PROJECT, **qualified({**MINIMAL, **raw})}, stack)


def _prod(**overrides: str):
    return run_stack({**stack_file_config("prod"), **qualified(overrides)}, "prod")


def replaced_by(before, after) -> set[str]:
    """The ForceNew inputs whose change would replace `after` (same URN), ignored inputs excepted."""
    changed = {key for key in {*before.inputs, *after.inputs} if before.inputs.get(key) != after.inputs.get(key)}
    node_config_before, node_config_after = before.inputs.get("nodeConfig", {}), after.inputs.get("nodeConfig", {})
    changed |= {
        f"nodeConfig.{key}"
        for key in NODE_CONFIG_FORCE_NEW
        if node_config_before.get(key) != node_config_after.get(key)
    }
    force_new = {*NODE_POOL_FORCE_NEW, *(f"nodeConfig.{key}" for key in NODE_CONFIG_FORCE_NEW)}
    return (changed & force_new) - set(after.ignore_changes)


def _pools_by_urn(recording) -> dict:
    return {pool.urn: pool for pool in recording.of_type(NODE_POOL) if pool.inputs["name"] != "system"}


def test_the_cluster_is_never_replaced_by_the_node_config_gke_reports_once_the_default_pool_is_gone():
    """node_config describes the default pool, which remove_default_node_pool deletes; the provider
    then reads another pool's config or none, and its node_config block is ForceNew as a whole."""
    for recording in (_run(), run_stack(stack_file_config("platform"), "platform")):
        cluster = recording.one(CLUSTER)
        assert cluster.inputs["removeDefaultNodePool"] is True and cluster.inputs["nodeConfig"]["serviceAccount"]
        assert "nodeConfig" in cluster.ignore_changes


def test_the_cluster_enables_managed_prometheus_itself():
    """The HPA's metrics reach Cloud Monitoring through managed collection: not left to GKE's default."""
    assert _run().one(CLUSTER).inputs["monitoringConfig"] == {"managedPrometheus": {"enabled": True}}


def test_the_cluster_enables_the_cloud_storage_fuse_driver_the_pods_mount_buckets_with():
    """The bundled and vLLM runtimes mount checkpointPath and their caches through the GCS FUSE CSI driver."""
    assert _run().one(CLUSTER).inputs["addonsConfig"] == {"gcsFuseCsiDriverConfig": {"enabled": True}}


def test_a_topology_change_replaces_each_slice_in_place_old_slice_first():
    """Same URN (role and replica), a new GKE name: one replace per pool, deleting the old slice
    first; a rename would create the new slice before deleting the old one."""
    before, after = _pools_by_urn(_prod()), _pools_by_urn(_prod(topology="4x8"))
    assert set(before) == set(after) and len(after) == 2
    for urn, pool in after.items():
        assert (before[urn].inputs["name"], pool.inputs["name"]) in {
            ("v6e-16-serving-prod", "v6e-32-serving-prod"),
            ("v6e-16-serving-r1-prod", "v6e-32-serving-r1-prod"),
        }
        assert "name" in replaced_by(before[urn], pool) and pool.delete_before_replace


def test_pools_deployed_under_slice_named_resources_are_carried_over_by_aliases():
    """Pools a stack deployed when the resource name carried the slice (gke-v6e-16-serving-prod)
    keep their state: an alias names each former name, whatever slice they ran."""
    pools = {pool.name: pool for pool in _prod().of_type(NODE_POOL)}
    assert set(pools) == {"gke-serving", "gke-serving-r1"}
    assert {"gke-v6e-16-serving-prod", "gke-v6e-4-serving-prod", "gke-v6e-256-serving-prod"} <= set(
        pools["gke-serving"].aliases
    )
    assert "gke-v6e-16-serving-r1-prod" in pools["gke-serving-r1"].aliases
    assert not set(pools["gke-serving"].aliases) & set(pools["gke-serving-r1"].aliases)


def test_lowering_replicas_below_max_replicas_resizes_the_serving_slice_instead_of_replacing_it():
    """replicas 2 -> 1 with maxReplicas 3: replica 1's pool turns from a fixed size into an autoscaled
    pool created with 0 nodes, and initial_node_count (ForceNew) is only read at creation."""
    before = _pools_by_urn(_prod(maxReplicas="3", autoscalingMetric="prefill-backlog", autoscalingTarget="10"))
    after = _pools_by_urn(
        _prod(replicas="1", maxReplicas="3", autoscalingMetric="prefill-backlog", autoscalingTarget="10")
    )
    changed = [urn for urn in after if before[urn].inputs != after[urn].inputs]
    assert len(changed) == 1 and "initialNodeCount" in after[changed[0]].inputs
    assert all(replaced_by(before[urn], after[urn]) == set() for urn in after)
    # ...and raising it back is a resize too (initial_node_count 0 alone never conflicts with node_count at create).
    assert all(replaced_by(after[urn], before[urn]) == set() for urn in after)


def test_every_stack_that_installs_the_metrics_adapter_keeps_the_shared_project_binding_when_destroyed():
    """The adapter's principal is one per project (one Workload Identity pool), so every stack that
    installs an adapter declares the same binding; destroying one must not remove it for the others."""
    scaled = {"maxReplicas": "2", "autoscalingMetric": "prefill-backlog", "autoscalingTarget": "10"}
    bindings = []
    for recording in (
        _run("team-a", **scaled),
        _run("team-b", **scaled),
        run_stack(stack_file_config("platform"), "platform"),
    ):
        [binding] = [member for member in recording.of_type(PROJECT_MEMBER) if member.parent_type == ADAPTER]
        bindings.append(binding)
    assert len({(binding.inputs["role"], binding.inputs["member"]) for binding in bindings[:2]}) == 1
    assert all(binding.retain_on_delete for binding in bindings)


def test_a_misspelt_key_stops_pulumi_up_naming_it_and_the_nearest_key():
    """The CLI hands the program undeclared keys without complaint; the program refuses them."""
    recording = run_stack(
        {"gcp:project": GCP_PROJECT, **qualified({**MINIMAL, "tpuReservaton": "mine"})}, expect_error=True
    )
    assert "tpuReservaton" in str(recording.error) and "did you mean 'tpuReservation'" in str(recording.error)
    assert recording.resources == []


LWS_RELEASE = ROOT / "tests" / "policy" / "manifests" / "lws-v0.10.0-without-crds.yaml"


def test_the_first_leader_worker_set_waits_for_the_lws_webhooks_ca_bundle():
    """LWS reports ready before its certificate controller fills in the webhooks' CA bundle, and the
    webhooks fail closed: the release's two webhook configurations wait for it (pulumi.com/waitFor)."""
    annotated = {}
    for document in yaml.safe_load_all(LWS_RELEASE.read_text()):
        group_version = document["apiVersion"] if "/" in document["apiVersion"] else f"core/{document['apiVersion']}"
        args = pulumi.ResourceTransformArgs(
            custom=True,
            type_=f"kubernetes:{group_version}:{document['kind']}",
            name=document["metadata"]["name"],
            props=document,
            opts=pulumi.ResourceOptions(),
        )
        result = lws_controller.wait_for_ca_bundle(args)
        if result is not None:
            annotated[document["metadata"]["name"]] = result.props["metadata"]["annotations"]
            assert all(webhook["clientConfig"] for webhook in document["webhooks"])  # the path the wait reads
    assert set(annotated) == {"lws-mutating-webhook-configuration", "lws-validating-webhook-configuration"}
    for added in annotated.values():
        assert added["pulumi.com/waitFor"] == "jsonpath={.webhooks[0].clientConfig.caBundle}"
    assert _run().one(CONFIG_FILE).transforms == 1


def test_installLwsController_always_installs_into_an_existing_cluster_and_keeps_it_on_destroy():
    existing = {"existingClusterName": "shared-tpu", "clusterLocation": "us-east5"}
    kept = _run(installLwsController="always", **existing)
    assert kept.one(CONFIG_FILE).retain_on_delete and kept.one(CONFIG_FILE).transforms == 2
    assert kept.one(CONFIG_FILE).inputs["file"].endswith("/v0.10.0/manifests.yaml")
    assert _run(**existing).of_type(LWS_CONTROLLER) == []
    own = _run(installLwsController="always").one(CONFIG_FILE)  # its own cluster: goes with the stack
    assert not own.retain_on_delete and own.transforms == 1


def test_private_endpoint_and_authorized_networks_shape_the_created_control_plane():
    cluster = _run(privateEndpoint="true", authorizedNetworks="10.0.0.0/8, 203.0.113.0/24").one(CLUSTER)
    assert cluster.inputs["privateClusterConfig"] == {"enablePrivateEndpoint": True, "enablePrivateNodes": True}
    assert cluster.inputs["masterAuthorizedNetworksConfig"] == {
        "cidrBlocks": [{"cidrBlock": "10.0.0.0/8"}, {"cidrBlock": "203.0.113.0/24"}]
    }
    default = _run().one(CLUSTER)
    assert "privateClusterConfig" not in default.inputs and "masterAuthorizedNetworksConfig" not in default.inputs


@pytest.mark.parametrize(
    ("raw", "keys", "fragment"),
    [
        ({"authorizedNetworks": "10.0.0.1/8"}, ("authorizedNetworks",), "'10.0.0.1/8' is not an IPv4 CIDR block"),
        ({"authorizedNetworks": "office"}, ("authorizedNetworks",), "'office' is not an IPv4 CIDR block"),
        (
            {"privateEndpoint": "true", "existingClusterName": "shared"},
            ("privateEndpoint", "existingClusterName"),
            "a cluster the stack creates",
        ),
        (
            {"authorizedNetworks": "10.0.0.0/8", "existingClusterName": "shared"},
            ("authorizedNetworks", "existingClusterName"),
            "not of 'shared'",
        ),
    ],
)
def test_control_plane_keys_are_refused_where_they_cannot_apply(raw, keys, fragment):
    with pytest.raises(ConfigError) as refused:
        config(**raw)
    assert refused.value.keys == keys and fragment in str(refused.value)


def test_a_serving_stack_leaves_the_control_plane_to_its_platform():
    raw = {**stack_file_config("dev"), **qualified({"authorizedNetworks": "10.0.0.0/8"})}
    values = {key.split(":", 1)[1]: value for key, value in raw.items() if key.startswith(f"{config_table.PROJECT}:")}
    with pytest.raises(ConfigError, match="authorizedNetworks is set, but a role=serving stack does not use it"):
        parse_stack_config(values, project=GCP_PROJECT, stack="dev")


# --- the updates table (docs/stack/updates.md) ---------------------------------------------------

UPDATES_DOC = ROOT / "docs" / "stack" / "updates.md"
UPDATES_BASE = "llama3-405b-v6e16"
LWS = "kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet"
POOLS_REPLACED = "replaced, each old slice deleted before its successor is created"
POOLS_ADDED = "one pool added per new replica; running slices untouched"
POOLS_IN_PLACE = "updated in place"
FREED_SLICE = "updated in place (the freed slice is left to the cluster autoscaler)"
ROLLING = "rolling update: every group's pods are recreated"
LWS_REPLACED = "deleted and created again: every pod restarts"
UNTOUCHED = "untouched"


def _path(values: dict, dotted: str):
    for key in dotted.split("."):
        values = (values or {}).get(key)
    return values


def pools_effect(before, after) -> str:
    old, new = _pools_by_urn(before), _pools_by_urn(after)
    if any(replaced_by(old[urn], new[urn]) for urn in set(old) & set(new)):
        return POOLS_REPLACED
    if set(new) - set(old):
        return POOLS_ADDED
    changed = any(old[urn].inputs != new[urn].inputs for urn in set(old) & set(new))
    if (
        changed
        and set(old) == set(new)
        and any("autoscaling" in new[urn].inputs and "autoscaling" not in old[urn].inputs for urn in new)
    ):
        return FREED_SLICE
    return POOLS_IN_PLACE if changed else UNTOUCHED


def lws_effect(before, after) -> str:
    old, new = before.one(LWS), after.one(LWS)
    if any(_path(old.inputs, path) != _path(new.inputs, path) for path in new.replace_on_changes):
        return LWS_REPLACED
    if _path(old.inputs, "spec.leaderWorkerTemplate") != _path(new.inputs, "spec.leaderWorkerTemplate"):
        return ROLLING
    replicas = (_path(old.inputs, "spec.replicas"), _path(new.inputs, "spec.replicas"))
    if replicas[0] != replicas[1]:
        return (
            "groups added; running groups untouched"
            if replicas[1] > replicas[0]
            else "groups removed; the other groups untouched"
        )
    return UNTOUCHED


def cluster_effect(before, after) -> str:
    old, new = before.one(CLUSTER), after.one(CLUSTER)
    assert old.urn == new.urn
    return POOLS_IN_PLACE if old.inputs != new.inputs else UNTOUCHED


def _settings(cell: str) -> dict[str, str]:
    """`key=value key=value` as the table writes it; an elided image (…) is the default image's repository."""
    settings = dict(item.split("=", 1) for item in cell.strip("` ").split())
    return {
        key: value.replace("…", DEFAULT_IMAGES[key].rsplit(":", 1)[0]) if "…" in value else value
        for key, value in settings.items()
    }


def update_rows() -> list[tuple[str, dict, dict, tuple[str, str, str]]]:
    rows = [line.strip("|").split("|") for line in UPDATES_DOC.read_text().splitlines() if line.startswith("| ")]
    parsed = []
    for cells in rows[1:]:  # the header
        change, example, pools, lws, cluster = (cell.strip() for cell in cells)
        before, after = example.split("→")
        parsed.append((change, _settings(before), _settings(after), (pools, lws, cluster)))
    return parsed


@pytest.mark.parametrize(
    ("change", "before", "after", "documented"), update_rows(), ids=[row[0] for row in update_rows()]
)
def test_the_updates_table_says_what_the_program_does(change, before, after, documented):
    base = stack_file_config(UPDATES_BASE)
    first = run_stack({**base, **qualified(before)}, UPDATES_BASE)
    second = run_stack({**base, **qualified(after)}, UPDATES_BASE)
    assert (pools_effect(first, second), lws_effect(first, second), cluster_effect(first, second)) == documented


def test_the_updates_table_covers_the_kinds_of_change_the_stack_has():
    effects = {effect for *_, documented in update_rows() for effect in documented}
    assert {POOLS_REPLACED, POOLS_ADDED, FREED_SLICE, ROLLING, UNTOUCHED, POOLS_IN_PLACE} <= effects
