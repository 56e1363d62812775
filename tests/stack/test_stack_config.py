"""Config keys: Pulumi.yaml matches the key table; bad configs fail before any resource."""

from __future__ import annotations

import pulumi
import pytest
import yaml

from components.core import config as stack_config
from components.core.errors import ConfigError

from pulumi_harness import EXAMPLE_STACKS, GCP_PROJECT, PROJECT, ROOT, qualified, run_stack
from stack_helpers import config, example

CONTRACT_KEYS = ("model", "topology", "mode", "quantization", "checkpointPath")


def test_pulumi_yaml_declares_exactly_the_key_table():
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    assert project["name"] == stack_config.PROJECT == PROJECT
    assert project["runtime"] == "python"
    declared = project["config"]
    assert list(declared) == [key.name for key in stack_config.CONFIG_KEYS]
    for key in stack_config.CONFIG_KEYS:
        entry = declared[key.name]
        assert entry["type"] == key.type and entry["description"] == key.description
        assert entry.get("default") == key.default, key.name


def test_contract_keys_exist_and_required_ones_have_no_default():
    for name in CONTRACT_KEYS:
        assert name in stack_config.KEYS_BY_NAME
    required = {key.name for key in stack_config.CONFIG_KEYS if key.default is None}
    assert required == {"model", "topology", "checkpointPath"}


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_example_stack_files_are_complete(stack):
    values = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    assert "gcp:project" in values
    for name in ("model", "topology", "mode", "quantization", "checkpointPath"):
        assert f"{PROJECT}:{name}" in values
    cfg, plan = example(stack)
    assert cfg.stack == stack and plan.chips_per_slice == cfg.tpu_slice.chips


def test_example_stacks_cover_both_modes_and_a_single_host():
    configs = {stack: example(stack)[0] for stack in EXAMPLE_STACKS}
    assert configs["llama3-405b-v6e16"].mode == "interleaved" and configs["llama3-405b-v6e16"].tpu_slice.topology == "4x4"
    assert configs["llama2-70b-disagg"].mode == "disaggregated" and configs["llama2-70b-disagg"].tpu_slice.hosts == 2
    assert not configs["llama3-8b-v6e8"].tpu_slice.multi_host


def test_preset_defaults_apply_unless_overridden():
    assert config(model="llama3.1-405b", topology="4x4").per_device_batch_size == 10
    assert config(model="llama3.1-405b", topology="4x4", perDeviceBatchSize="4").per_device_batch_size == 4


def test_derived_names_are_valid():
    cfg = config(stack="Prod_EU.1")
    assert cfg.google_service_account_id == "jetstream-prod-eu-1"
    assert cfg.scratch_bucket == "test-project-prod-eu-1-pathways-scratch"
    assert cfg.cluster_location == "us-east5" and cfg.checkpoint_bucket == "test-checkpoints"


BUNDLED = {"serverRuntime": "bundled", "bundledServerImage": "registry.example/jetstream-jax:0.1.0", "checkpointPath": "gs://test-checkpoints/m/model.gguf"}

# Bad configs: (change to the minimal valid config, key the message must name, message fragment).
REFUSALS = {
    "unknown model": ({"model": "llama4-2t"}, "model", "unknown model preset"),
    "model typo": ({"model": "llama3.1-405"}, "model", "did you mean 'llama3.1-405b'"),
    "non-v6e topology": ({"topology": "3x3"}, "topology", "not a TPU v6e slice shape"),
    "bf16 405b on 4x4": ({"model": "llama3.1-405b", "topology": "4x4", "quantization": "bf16"}, "quantization", "needs 52.2 GiB"),
    "parallelism != chips": ({"tensorParallelism": "8"}, "tensorParallelism", "has 4 chips"),
    "bad checkpoint URI": ({"checkpointPath": "s3://bucket/ckpt"}, "checkpointPath", "not a gs:// URI"),
    "missing checkpoint": ({"checkpointPath": None}, "checkpointPath", "is required"),
    "bad mode": ({"mode": "pipelined"}, "mode", "not one of interleaved, disaggregated"),
    "bad quantization": ({"quantization": "fp8"}, "quantization", "not one of int8, bf16"),
    "unknown key": ({"tensorParalelism": "4"}, "tensorParalelism", "did you mean 'tensorParallelism'"),
    "not an integer": ({"perDeviceBatchSize": "lots"}, "perDeviceBatchSize", "expected an integer"),
    "8t machine for 4x4": ({"topology": "4x4", "tpuMachineType": "ct6e-standard-8t"}, "tpuMachineType", "cannot host a 4x4 slice"),
    "reservation without name": ({"tpuProvisioning": "reservation"}, "tpuReservation", "needs a reservation name"),
    "latest image": ({"jetstreamImage": "us-docker.pkg.dev/x/jetstream:latest"}, "jetstreamImage", "not pinned"),
    "bundled without image": ({"serverRuntime": "bundled"}, "bundledServerImage", "needs the image"),
    "planned flag in serverFlags": ({"serverFlags": '{"per_device_batch_size": 64}'}, "perDeviceBatchSize", "cannot be overridden"),
    "serverFlags not JSON": ({"serverFlags": "{per_device: 1"}, "serverFlags", "not valid JSON"),
    "bad namespace": ({"namespace": "Serving_NS"}, "namespace", "DNS-1123"),
    "bad lws version": ({"lwsVersion": "latest"}, "lwsVersion", "not a release tag"),
    "target <= prefill": ({"maxTargetLength": "512"}, "maxTargetLength", "must exceed"),
    "bundled with an Orbax checkpoint": ({**BUNDLED, "checkpointPath": "gs://test-checkpoints/m/0/items"}, "checkpointPath",
                                         "not a gs:// URI of a .gguf or .npz object"),
    "bundled with a safetensors file": ({**BUNDLED, "checkpointPath": "gs://test-checkpoints/m/model.safetensors"}, "checkpointPath",
                                        "not a gs:// URI of a .gguf or .npz object"),
    "bundled with a bucket only": ({**BUNDLED, "checkpointPath": "gs://test-checkpoints.npz"}, "serverRuntime", "not a gs:// URI of a .gguf"),
    "bundled disaggregated": ({**BUNDLED, "topology": "2x4", "mode": "disaggregated"}, "mode", "cannot run mode=disaggregated"),
    "bundled disaggregated names the runtime": ({**BUNDLED, "topology": "2x4", "mode": "disaggregated"}, "serverRuntime", "use serverRuntime=jetstream"),
    "bundled single controller": ({**BUNDLED, "serverFlags": '{"enable_single_controller": true}'}, "serverFlags", "needs Pathways"),
    "bundled copy image latest": ({**BUNDLED, "checkpointCopyImage": "gcr.io/google.com/cloudsdktool/google-cloud-cli:latest"},
                                  "checkpointCopyImage", "not pinned"),
}


def _refused_raw(change: dict) -> dict[str, str]:
    raw = {"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-checkpoints/m/0/items"}
    for key, value in change.items():
        if value is None:
            raw.pop(key)
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


def test_missing_gcp_project_is_refused():
    with pytest.raises(ConfigError) as refused:
        stack_config.parse_stack_config(_refused_raw({}), project=None, stack="test")
    assert refused.value.keys == ("gcp:project",)
