"""Config keys: Pulumi.yaml matches the key table; bad configs fail before any resource."""

from __future__ import annotations

import re
from operator import attrgetter

import pulumi
import pytest
import yaml

from components.core import config as stack_config
from components.core import config_table
from components.core.config_roles import check_same_project
from components.core.errors import ConfigError
from components.core.naming import node_service_account_id
from components.core.planner import plan_deployment
from tests.stack.pulumi_harness import (
    GCP_PROJECT,
    PLATFORM_STACKS,
    PROJECT,
    ROOT,
    WORKLOAD_STACKS,
    qualified,
    run_stack,
)
from tests.stack.stack_helpers import config, example

CONTRACT_KEYS = ("model", "topology", "mode", "quantization", "checkpointPath")


def test_pulumi_yaml_declares_exactly_the_key_table():
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    assert project["name"] == config_table.PROJECT == PROJECT
    assert project["runtime"] == "python"
    declared = project["config"]
    assert list(declared) == [key.name for key in config_table.CONFIG_KEYS]
    for key in config_table.CONFIG_KEYS:
        entry = declared[key.name]
        assert entry["type"] == key.type and entry["description"] == key.description
        assert entry.get("default") == key.default, key.name


def test_contract_keys_exist_and_the_ones_a_stack_that_serves_needs_are_refused_when_missing():
    for name in (*CONTRACT_KEYS, "role", "clusterStack", "serviceType"):  # the contract, role and Service keys
        assert name in config_table.KEYS_BY_NAME
    assert config_table.KEYS_BY_NAME["waitForReady"].type == "boolean"
    # A string: Pulumi merges a boolean's default into config, so its "unset" could not be told from true.
    lws_install = config_table.KEYS_BY_NAME["installLwsController"]
    assert (lws_install.type, lws_install.default, config_table.LWS_INSTALLS) == (
        "string",
        "auto",
        ("auto", "always", "never"),
    )
    # Pulumi requires a key declared without a default, also in a platform stack, which has no model.
    assert [key.name for key in config_table.CONFIG_KEYS if key.default is None] == []
    assert config_table.REQUIRED_TO_SERVE == ("model", "topology", "checkpointPath")
    for name in config_table.REQUIRED_TO_SERVE:
        with pytest.raises(ConfigError) as refused:
            config(**{name: ""})
        assert refused.value.keys == (name,) and "is required" in refused.value.problem


@pytest.mark.parametrize("stack", WORKLOAD_STACKS)
def test_example_stack_files_are_complete(stack):
    values = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    assert "gcp:project" in values
    for name in config_table.REQUIRED_TO_SERVE:
        assert f"{PROJECT}:{name}" in values
    cfg, plan = example(stack)
    assert cfg.stack == stack and plan.chips_per_slice == cfg.tpu_slice.chips


@pytest.mark.parametrize("stack", PLATFORM_STACKS)
def test_platform_stack_files_set_no_workload_key(stack):
    values = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    assert "gcp:project" in values and values[f"{PROJECT}:role"] == "platform"
    assert not {f"{PROJECT}:{name}" for name in config_table.REQUIRED_TO_SERVE} & set(values)


def test_example_stacks_cover_both_modes_and_a_single_host():
    configs = {stack: example(stack)[0] for stack in WORKLOAD_STACKS}
    assert (
        configs["llama3-405b-v6e16"].mode == "interleaved" and configs["llama3-405b-v6e16"].tpu_slice.topology == "4x4"
    )
    assert configs["llama2-70b-disagg"].mode == "disaggregated" and configs["llama2-70b-disagg"].tpu_slice.hosts == 2
    assert not configs["llama3-8b-v6e8"].tpu_slice.multi_host


def test_preset_defaults_apply_unless_overridden():
    assert config(model="llama3.1-405b", topology="4x4").server.per_device_batch_size == 10
    assert config(model="llama3.1-405b", topology="4x4", perDeviceBatchSize="4").server.per_device_batch_size == 4


def test_derived_names_are_the_stack_name_where_it_is_a_valid_one():
    cfg = config(stack="prod-eu")
    assert (cfg.cluster.name, cfg.names.namespace, cfg.deployment_id) == ("jetstream-prod-eu",) * 3
    assert (cfg.workload_service_account_id, cfg.node_service_account_id) == ("js-pods-prod-eu", "js-nodes-prod-eu")
    assert cfg.scratch_bucket == "test-project-scratch-prod-eu" and cfg.artifact_repository_id == "jetstream-prod-eu"
    assert cfg.cluster.location == "us-east5" and cfg.checkpoint_bucket == "test-checkpoints"
    assert cfg.bundled_image_repository == "us-east5-docker.pkg.dev/test-project/jetstream-prod-eu/jetstream-jax"


# attribute path of the config -> (pattern, min length, max length): GKE, IAM, Cloud Storage and DNS rules
NAME_RULES = {
    "cluster.name": (r"[a-z]([-a-z0-9]*[a-z0-9])?", 1, 40),
    "names.namespace": (r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", 1, 63),
    "deployment_id": (r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", 1, 63),
    "workload_service_account_id": (r"[a-z]([-a-z0-9]*[a-z0-9])", 6, 30),
    "node_service_account_id": (r"[a-z]([-a-z0-9]*[a-z0-9])", 6, 30),
    "scratch_bucket": (r"[a-z0-9][-a-z0-9_]*[a-z0-9]", 3, 63),
    "artifact_repository_id": (r"[a-z]([-a-z0-9]*[a-z0-9])?", 1, 63),
}
STACK_NAMES = (
    "dev",
    "Prod_EU.1",
    "prod-eu-1",
    "a" * 100,
    "a" * 99 + "b",
    "team.with.dots-and-a-very-long-name-for-production-us-east5",
)


@pytest.mark.parametrize("stack", STACK_NAMES)
def test_derived_names_follow_the_cloud_naming_rules(stack):
    cfg = config(stack=stack)
    for name, (pattern, shortest, longest) in NAME_RULES.items():
        value = attrgetter(name)(cfg)
        assert re.fullmatch(pattern, value) and shortest <= len(value) <= longest, (name, value)
    for pool in plan_deployment(cfg).node_pools:  # GKE node pool names: 1-40 characters
        assert re.fullmatch(NAME_RULES["cluster.name"][0], pool) and len(pool) <= 40, pool


def test_stacks_never_share_a_derived_name():
    """Truncation and character replacement keep names apart: a hash of the stack name ends them."""
    configs = [config(stack=stack) for stack in STACK_NAMES]
    for name in NAME_RULES:
        values = [attrgetter(name)(cfg) for cfg in configs]
        assert len(set(values)) == len(values), (name, values)


def test_explicit_names_win_over_derived_ones():
    cfg = config(stack="dev", clusterName="shared", namespace="serving", scratchBucketName="my-scratch")
    assert (cfg.cluster.name, cfg.names.namespace, cfg.scratch_bucket) == ("shared", "serving", "my-scratch")


def test_installLwsController_auto_installs_on_a_created_cluster_always_also_on_an_existing_one_and_keeps_it_there():
    """auto (the default) installs where the stack creates the cluster; always also into an existing
    cluster, where the install outlives the stack; never leaves it to the cluster's owner."""
    installs = {
        (existing, choice): (cfg.cluster.install_lws_controller, cfg.cluster.keep_lws_controller)
        for existing in ("", "shared")
        for choice in config_table.LWS_INSTALLS
        for cfg in [config(existingClusterName=existing, installLwsController=choice)]
    }
    assert installs == {
        ("", "auto"): (True, False),
        ("", "always"): (True, False),
        ("", "never"): (False, False),
        ("shared", "auto"): (False, False),
        ("shared", "always"): (True, True),
        ("shared", "never"): (False, False),
    }
    for value in ("auto", "never"):  # a serving stack's cluster is its platform's
        serving = stack_config.parse_stack_config(
            {**_refused_raw(SERVING), "installLwsController": value}, project=GCP_PROJECT, stack="dev"
        )
        assert serving.cluster.install_lws_controller is False
    with pytest.raises(ConfigError, match="installLwsController.*platform stack does"):
        stack_config.parse_stack_config(
            {**_refused_raw(SERVING), "installLwsController": "always"}, project=GCP_PROJECT, stack="dev"
        )
    for legacy, replacement in (("false", "never"), ("true", "auto")):  # the boolean it was: a clear way over
        with pytest.raises(ConfigError, match=f"installLwsController.*not a boolean.*{replacement} \\(was {legacy}\\)"):
            config(installLwsController=legacy)
    with pytest.raises(ConfigError, match="installLwsController.*did you mean 'always'"):
        config(installLwsController="alway")
    platform = stack_config.parse_stack_config({"role": "platform"}, project=GCP_PROJECT, stack="platform")
    assert platform.cluster.install_lws_controller is True
    assert (
        stack_config.parse_stack_config(
            {"role": "platform", "installLwsController": "never"}, project=GCP_PROJECT, stack="platform"
        ).cluster.install_lws_controller
        is False
    )


def test_only_a_stack_that_creates_its_cluster_installs_the_metrics_adapter():
    assert config(maxReplicas="2").installs_metrics_adapter is True
    assert config().installs_metrics_adapter is False  # no autoscaling, no adapter
    shared = config(maxReplicas="2", existingClusterName="shared", installLwsController="never")
    assert (shared.creates_cluster, shared.installs_metrics_adapter) == (False, False)
    serving = stack_config.parse_stack_config(
        {**_refused_raw(SERVING), "maxReplicas": "2"}, project=GCP_PROJECT, stack="dev"
    )
    assert (serving.creates_cluster, serving.installs_metrics_adapter) == (False, False)


def test_wait_for_ready_defaults_to_false():
    assert config().wait_for_ready is False and config(waitForReady="true").wait_for_ready is True


BUNDLED = {
    "serverRuntime": "bundled",
    "bundledServerImage": "registry.example/jetstream-jax:0.1.0",
    "checkpointPath": "gs://test-checkpoints/m/model.gguf",
}

PLATFORM_STACK = "my-org/jetstream-tpu/platform"
SERVING = {"role": "serving", "clusterStack": PLATFORM_STACK}  # a valid serving stack's keys

# Bad configs: (change to the minimal valid config, key the message must name, message fragment).
REFUSALS = {
    "unknown model": ({"model": "llama4-2t"}, "model", "unknown model preset"),
    "model typo": ({"model": "llama3.1-405"}, "model", "did you mean 'llama3.1-405b'"),
    "non-v6e topology": ({"topology": "3x3"}, "topology", "not a TPU v6e slice shape"),
    "bf16 405b on 4x4": (
        {"model": "llama3.1-405b", "topology": "4x4", "quantization": "bf16"},
        "quantization",
        "needs 52.2 GiB",
    ),
    "parallelism != chips": ({"tensorParallelism": "8"}, "tensorParallelism", "has 4 chips"),
    "bad checkpoint URI": ({"checkpointPath": "s3://bucket/ckpt"}, "checkpointPath", "not a gs:// URI"),
    "missing checkpoint": ({"checkpointPath": None}, "checkpointPath", "is required"),
    "bad mode": ({"mode": "pipelined"}, "mode", "not one of interleaved, disaggregated"),
    "bad quantization": ({"quantization": "fp8"}, "quantization", "not one of int8, bf16"),
    "not an integer": ({"perDeviceBatchSize": "lots"}, "perDeviceBatchSize", "expected an integer"),
    "8t machine for 4x4": (
        {"topology": "4x4", "tpuMachineType": "ct6e-standard-8t"},
        "tpuMachineType",
        "cannot host a 4x4 slice",
    ),
    "reservation without name": ({"tpuProvisioning": "reservation"}, "tpuReservation", "needs a reservation name"),
    "latest image": ({"jetstreamImage": "us-docker.pkg.dev/x/jetstream:latest"}, "jetstreamImage", "not pinned"),
    "not a boolean": ({"waitForReady": "sometimes"}, "waitForReady", "expected true or false"),
    "bundled image latest": (
        {
            **{"serverRuntime": "bundled", "checkpointPath": "gs://test-checkpoints/m/model.gguf"},
            "bundledServerImage": "registry.example/jetstream-jax:latest",
        },
        "bundledServerImage",
        "not pinned",
    ),
    "dtype in serverFlags": ({"serverFlags": '{"dtype": "float32"}'}, "quantization", "cannot be overridden"),
    "planned flag in serverFlags": (
        {"serverFlags": '{"per_device_batch_size": 64}'},
        "perDeviceBatchSize",
        "cannot be overridden",
    ),
    "serverFlags not JSON": ({"serverFlags": "{per_device: 1"}, "serverFlags", "not valid JSON"),
    "bad namespace": ({"namespace": "Serving_NS"}, "namespace", "DNS-1123"),
    "empty app name": ({"appName": ""}, "appName", "'' is not a DNS-1123 label"),
    "empty service name": ({"serviceName": ""}, "serviceName", "'' is not a DNS-1123 label"),
    "bad lws version": ({"lwsVersion": "latest"}, "lwsVersion", "not a release tag"),
    "target <= prefill": ({"maxTargetLength": "512"}, "maxTargetLength", "must exceed"),
    "bundled with an Orbax checkpoint": (
        {**BUNDLED, "checkpointPath": "gs://test-checkpoints/m/0/items"},
        "checkpointPath",
        "neither a gs:// URI of a .gguf or .npz object",
    ),
    "bundled with a safetensors file": (
        {**BUNDLED, "checkpointPath": "gs://test-checkpoints/m/model.safetensors"},
        "checkpointPath",
        "neither a gs:// URI of a .gguf or .npz object",
    ),
    "bundled with a bucket only": (
        {**BUNDLED, "checkpointPath": "gs://test-checkpoints.npz"},
        "serverRuntime",
        "neither a gs:// URI of a .gguf",
    ),
    "bundled disaggregated": (
        {**BUNDLED, "topology": "2x4", "mode": "disaggregated"},
        "mode",
        "cannot run mode=disaggregated",
    ),
    "bundled disaggregated names the runtime": (
        {**BUNDLED, "topology": "2x4", "mode": "disaggregated"},
        "serverRuntime",
        "use serverRuntime=jetstream",
    ),
    "bundled single controller": (
        {**BUNDLED, "serverFlags": '{"enable_single_controller": true}'},
        "serverFlags",
        "needs Pathways",
    ),
    "maxReplicas below replicas": ({"replicas": "3", "maxReplicas": "2"}, "maxReplicas", "smaller than replicas 3"),
    "unreachable slots-used target": (
        {"maxReplicas": "2", "autoscalingMetric": "slots-used", "autoscalingTarget": "1.2"},
        "autoscalingTarget",
        "cannot be met",
    ),
    "autoscaling without its metrics": (
        {"maxReplicas": "2", "serverFlags": '{"prometheus_port": 0}'},
        "serverFlags",
        "Prometheus server off",
    ),
    "target without autoscaling": ({"autoscalingTarget": "5"}, "maxReplicas", "autoscaling is off"),
    "bad role": ({"role": "prod"}, "role", "not one of all, platform, serving"),
    "bad serviceType": ({"serviceType": "LoadBalancer"}, "serviceType", "not one of ClusterIP, InternalLoadBalancer"),
    "serving without clusterStack": ({**SERVING, "clusterStack": None}, "clusterStack", "needs the platform stack"),
    "clusterStack with role=all": ({"clusterStack": PLATFORM_STACK}, "clusterStack", "role=all stack does not use it"),
    "clusterStack not qualified": (
        {**SERVING, "clusterStack": "platform"},
        "clusterStack",
        "not a fully qualified stack name",
    ),
    "clusterStack is itself": (
        {**SERVING, "clusterStack": "my-org/jetstream-tpu/test"},
        "clusterStack",
        "is this stack itself",
    ),
    "serving on an existing cluster": (
        {**SERVING, "existingClusterName": "shared"},
        "existingClusterName",
        "creates no cluster",
    ),
    "serving names a cluster": (
        {**SERVING, "clusterName": "mine"},
        "clusterName",
        "role=serving stack does not use it",
    ),
    "serving sets a release channel": (
        {**SERVING, "releaseChannel": "REGULAR"},
        "releaseChannel",
        "role=serving stack does not use it",
    ),
    "zone outside clusterLocation": (
        {"clusterLocation": "us-central1"},
        "zone",
        "outside the cluster's location (us-central1)",
    ),
    "platform with a model": ({"role": "platform"}, "model", "no TPU pool, no workload"),
}


def _refused_raw(change: dict) -> dict[str, str]:
    raw = {"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-checkpoints/m/0/items"}
    for key, value in change.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_config_fails_at_preview_naming_the_key_and_creates_nothing(case):
    change, key, fragment = REFUSALS[case]
    full = {"gcp:project": GCP_PROJECT, **qualified(_refused_raw(change))}
    recording = run_stack(full, expect_error=True)
    assert isinstance(recording.error, pulumi.RunError), recording.error
    message = str(recording.error)
    assert f"`{key}`" in message and fragment in message and "Suggestion:" in message
    # The program stops before the first component: nothing was registered.
    assert recording.resources == []


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_come_from_the_pure_config_and_planner(case):
    from components.core.planner import plan_deployment

    change, key, fragment = REFUSALS[case]
    with pytest.raises(ConfigError) as refused:
        plan_deployment(stack_config.parse_stack_config(_refused_raw(change), project=GCP_PROJECT, stack="test"))
    assert key in refused.value.keys and fragment in str(refused.value)


def test_an_unknown_key_is_refused_with_a_suggestion():
    """The offline render reads whole stack files; `pulumi` itself refuses keys Pulumi.yaml does
    not declare, before the program runs (the program reads declared keys through pulumi.Config)."""
    with pytest.raises(ConfigError) as refused:
        stack_config.parse_stack_config(_refused_raw({"tensorParalelism": "4"}), project=GCP_PROJECT, stack="test")
    assert refused.value.keys == ("tensorParalelism",) and "did you mean 'tensorParallelism'" in str(refused.value)


def test_missing_gcp_project_is_refused():
    with pytest.raises(ConfigError) as refused:
        stack_config.parse_stack_config(_refused_raw({}), project=None, stack="test")
    assert refused.value.keys == ("gcp:project",)


# ---------------------------------------------------------------------------------------------
# Roles.

PLATFORM = {"role": "platform"}


def test_a_platform_stack_needs_no_model_and_takes_the_cluster_keys():
    cfg = stack_config.parse_stack_config(
        {**PLATFORM, "clusterName": "shared-tpu", "releaseChannel": "REGULAR", "systemNodeCount": "2"},
        project=GCP_PROJECT,
        stack="platform",
    )
    assert isinstance(cfg, stack_config.PlatformConfig)
    assert (cfg.cluster.name, cfg.cluster.release_channel, cfg.cluster.system_node_count, cfg.cluster.existing) == (
        "shared-tpu",
        "REGULAR",
        2,
        False,
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"existingClusterName": "shared"}, "existingClusterName"),
        ({"clusterStack": PLATFORM_STACK}, "clusterStack"),
        ({"serviceType": "InternalLoadBalancer"}, "serviceType"),
        ({"replicas": "2"}, "replicas"),
    ],
)
def test_a_platform_stack_refuses_what_it_does_not_create(change, key):
    with pytest.raises(ConfigError) as refused:
        stack_config.parse_stack_config({**PLATFORM, **change}, project=GCP_PROJECT, stack="platform")
    assert refused.value.keys == (key, "role")


def test_the_defaults_pulumi_fills_in_never_count_as_set():
    """Pulumi hands a platform stack every key, model "" and mode interleaved included."""
    defaults = {key.name: key.default_text for key in config_table.CONFIG_KEYS}
    cfg = stack_config.parse_stack_config({**defaults, **PLATFORM}, project=GCP_PROJECT, stack="platform")
    assert isinstance(cfg, stack_config.PlatformConfig) and cfg.cluster.install_lws_controller is True
    serving = stack_config.parse_stack_config({**defaults, **_refused_raw(SERVING)}, project=GCP_PROJECT, stack="dev")
    assert (serving.role, serving.cluster.name, serving.cluster.location, serving.cluster.install_lws_controller) == (
        "serving",
        "",
        "",
        False,
    )


def test_a_serving_stacks_pools_run_as_a_node_account_of_its_own():
    serving = stack_config.parse_stack_config(_refused_raw(SERVING), project=GCP_PROJECT, stack="dev")
    assert serving.node_service_account_id == node_service_account_id("dev") == "js-nodes-dev"
    assert config(stack="dev").node_service_account_id == "js-nodes-dev"


def test_a_serving_stack_deploys_into_its_platforms_project():
    assert check_same_project("p", "p", PLATFORM_STACK) == "p"
    with pytest.raises(ConfigError) as refused:
        check_same_project("p", "q", PLATFORM_STACK)
    assert refused.value.keys == ("gcp:project", "clusterStack") and "pulumi config set gcp:project q" in str(
        refused.value
    )
