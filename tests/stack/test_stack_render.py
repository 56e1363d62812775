"""The offline renderer: `python -m components.render --stack <name>`."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from components import render
from components.core import manifests
from components.core.errors import ConfigError
from tests.stack.pulumi_harness import EXAMPLE_STACKS, ROOT, WORKLOAD_STACKS
from tests.stack.stack_helpers import (
    BUNDLED_STACKS,
    bundled_example,
    bundled_raw,
    example,
    lws_validator,
    pod_monitoring_validator,
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "components.render", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def _documents(text: str) -> list[dict]:
    return [document for document in yaml.safe_load_all(text) if document is not None]


def _validate_all(documents: list[dict], cfg) -> None:
    """Everything kubectl would apply: the LWS and the PodMonitoring against their CRDs, the rest and
    the pod templates with kubernetes-validate."""
    for document in documents:
        if document["kind"] == "PodMonitoring":
            pod_monitoring_validator().validate(document)
        elif document["kind"] == "LeaderWorkerSet":
            lws_validator().validate(document)
            template = document["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"{cfg.names.app_name}-{role.lower()}"},
                    "spec": template[role]["spec"],
                }
                kubernetes_validate.validate(pod, "1.33.0", strict=True)
        else:
            kubernetes_validate.validate(document, "1.33.0", strict=True)


@pytest.mark.parametrize("stack", WORKLOAD_STACKS)
def test_render_prints_the_manifests_kubectl_would_apply(stack):
    result = _cli("--stack", stack)
    assert result.returncode == 0, result.stderr
    documents = _documents(result.stdout)
    cfg, plan = example(stack)
    assert documents == manifests.all_manifests(cfg, plan)
    # A fresh cluster (LWS controller installed) needs nothing else: the namespace and the
    # Workload Identity service account the pods run as come first; with autoscaling, the
    # PodMonitoring and the HPA (the metrics adapter comes from its own manifest) last.
    scaling = ["PodMonitoring", "HorizontalPodAutoscaler"] if cfg.scaling.enabled else []
    assert [document["kind"] for document in documents] == [
        "Namespace",
        "ServiceAccount",
        "LeaderWorkerSet",
        "Service",
        *scaling,
    ]
    assert documents[0]["metadata"]["name"] == cfg.names.namespace
    # Pathways pods act as the node account; the bundled server's through Workload Identity as its own GSA.
    annotations = (
        {"iam.gke.io/gcp-service-account": cfg.workload_service_account_email}
        if cfg.pods_use_workload_identity
        else None
    )
    assert documents[1]["metadata"].get("annotations") == annotations
    assert documents[2:4] == manifests.serving_manifests(cfg, plan)
    _validate_all(documents, cfg)


@pytest.mark.parametrize("stack", BUNDLED_STACKS)
def test_render_of_a_bundled_stack(stack, tmp_path):
    raw, project = bundled_raw(stack)
    _write_stack(tmp_path, stack, raw, project)
    result = _cli("--stack", stack, "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    documents = _documents(result.stdout)
    cfg, plan = bundled_example(stack)
    assert documents == manifests.all_manifests(cfg, plan)
    lws = next(document for document in documents if document["kind"] == "LeaderWorkerSet")
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == cfg.tpu_slice.hosts
    account = next(document for document in documents if document["kind"] == "ServiceAccount")
    assert account["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": cfg.workload_service_account_email}
    _validate_all(documents, cfg)


# Runs `python -m components.render` in a Python where every `pulumi*` import fails: the
# planning core and the render must not need the Pulumi SDK.
WITHOUT_PULUMI = """
import importlib.abc, runpy, sys

class NoPulumi(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("pulumi"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the render must not import Pulumi)")
        return None

sys.meta_path.insert(0, NoPulumi())
import pkgutil, components.core
for module in pkgutil.iter_modules(components.core.__path__):
    __import__(f"components.core.{module.name}")
sys.argv = ["components.render", *sys.argv[1:]]
runpy.run_module("components.render", run_name="__main__")
"""


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_render_and_the_planning_core_run_without_the_pulumi_sdk(stack):
    assert importlib.util.find_spec("pulumi") is not None  # installed: the shim is what makes it unimportable
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_PULUMI, "--stack", stack], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert _documents(result.stdout) == _documents(_cli("--stack", stack).stdout)


def test_the_shim_does_block_pulumi():
    probe = WITHOUT_PULUMI.replace(
        'runpy.run_module("components.render", run_name="__main__")', "import components.resources.program"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "blocked: the render must not import Pulumi" in result.stderr


def test_render_of_a_bundled_stack_that_builds_its_image(tmp_path):
    """No bundledServerImage: the render shows the tag the stack's build pushes (pulumi up pins the digest)."""
    raw, project = bundled_raw("llama3-8b-v6e8")
    _write_stack(tmp_path, "llama3-8b-v6e8", {**raw, "bundledServerImage": ""}, project)
    result = _cli("--stack", "llama3-8b-v6e8", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lws = next(document for document in _documents(result.stdout) if document["kind"] == "LeaderWorkerSet")
    (server,) = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"]
    assert (
        server["image"] == "us-east5-docker.pkg.dev/my-gcp-project/jetstream-llama3-8b-v6e8/jetstream-jax:stack-build"
    )


def test_render_refuses_a_layout_that_cannot_be_scheduled(tmp_path, monkeypatch):
    """The render runs preview's scheduling check too (components/core/scheduling.py)."""
    from components.core import manifests as built

    original = built._sub_group_policy
    monkeypatch.setattr(
        built,
        "_sub_group_policy",
        lambda cfg, plan: (
            None
            if original(cfg, plan) is None
            else dataclasses.replace(original(cfg, plan), sub_group_policy_type=None)
        ),
    )
    _write_stack(
        tmp_path,
        "single-host-disagg",
        {
            "model": "llama3.1-8b",
            "topology": "2x4",
            "tpuMachineType": "ct6e-standard-8t",
            "mode": "disaggregated",
            "checkpointPath": "gs://test-ckpt/x",
        },
    )
    with pytest.raises(ConfigError) as refused:
        render.render("single-host-disagg", tmp_path)
    assert "would stay Pending forever" in str(refused.value) and "`mode`" in str(refused.value)


def test_render_in_the_default_namespace_creates_no_namespace(tmp_path):
    _write_stack(
        tmp_path,
        "dflt",
        {"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-ckpt/x", "namespace": "default"},
    )
    result = _cli("--stack", "dflt", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert [document["kind"] for document in _documents(result.stdout)] == [
        "ServiceAccount",
        "LeaderWorkerSet",
        "Service",
    ]


def test_render_prints_the_plan_summary_as_comments():
    text = render.render("llama3-405b-v6e16")
    header = "\n".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    plan = yaml.safe_load(header)["plan"]
    assert plan["chipsPerSlice"] == 16 and plan["hostsPerSlice"] == 4
    assert plan["parallelism"] == {"fsdp": 1, "autoregressive": 2, "tensor": 8}
    assert plan["hbmGiBPerChip"]["needed"] <= plan["hbmGiBPerChip"]["usable"]
    assert plan["nodePoolSpecs"][0]["tpu_topology"] == "4x4" and plan["nodePoolSpecs"][0]["node_count"] == 4
    assert plan["lwsController"] == "v0.10.0" and "metricsAdapter" not in plan  # installed by the stack; no autoscaling


@pytest.mark.parametrize(
    ("stack", "values", "lws", "adapter"),
    [
        ("own", {}, "v0.10.0", None),
        ("skip", {"installLwsController": "never"}, "not installed (installLwsController=never)", None),
        (
            "shared",
            {"existingClusterName": "shared-tpu", "maxReplicas": "2"},
            "not installed: the existing cluster's owner installs it",
            "not installed: the existing cluster's owner installs it",
        ),
        (
            "scaled",
            {"maxReplicas": "2"},
            "v0.10.0",
            "https://raw.githubusercontent.com/GoogleCloudPlatform/k8s-stackdriver/",
        ),
        (
            "serving",
            {"role": "serving", "clusterStack": "my-org/jetstream-tpu/platform", "maxReplicas": "2"},
            "not installed: the platform stack my-org/jetstream-tpu/platform installs it",
            "not installed: the platform stack my-org/jetstream-tpu/platform installs it",
        ),
    ],
)
def test_the_plan_says_whether_the_stack_installs_the_cluster_wide_pieces(tmp_path, stack, values, lws, adapter):
    _write_stack(
        tmp_path, stack, {"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-ckpt/x", **values}
    )
    text = render.render(stack, tmp_path)
    plan = yaml.safe_load("\n".join(line[2:] for line in text.split("\n---\n", 1)[0].splitlines()))["plan"]
    assert plan["lwsController"] == lws
    if adapter is None:
        assert "metricsAdapter" not in plan
    else:
        assert plan["metricsAdapter"].startswith(adapter)


def _write_stack(tmp_path, name: str, values: dict[str, str], project: str = "test-project") -> None:
    config = {"gcp:project": project, **{f"jetstream-tpu:{key}": value for key, value in values.items()}}
    (tmp_path / f"Pulumi.{name}.yaml").write_text(yaml.safe_dump({"config": config}))


def test_bad_config_prints_the_preview_error_and_exits_non_zero(tmp_path):
    _write_stack(
        tmp_path,
        "bad",
        {"model": "llama3.1-405b", "topology": "4x4", "quantization": "bf16", "checkpointPath": "gs://test-ckpt/x"},
    )
    result = _cli("--stack", "bad", "--root", str(tmp_path))
    assert result.returncode != 0 and result.stdout == ""
    assert (
        "`quantization`" in result.stderr
        and "needs 52.2 GiB HBM per chip" in result.stderr
        and "Suggestion:" in result.stderr
    )


def test_bundled_disaggregated_is_refused_by_render(tmp_path):
    _write_stack(
        tmp_path,
        "bd",
        {
            "model": "llama2-70b",
            "topology": "2x4",
            "mode": "disaggregated",
            "serverRuntime": "bundled",
            "bundledServerImage": "registry.example/jetstream-jax:0.1.0",
            "checkpointPath": "gs://test-ckpt/m.npz",
        },
    )
    result = _cli("--stack", "bd", "--root", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert "`mode`, `serverRuntime`" in result.stderr and "Suggestion: use serverRuntime=jetstream" in result.stderr


def test_unknown_topology_and_missing_stack_file_exit_non_zero(tmp_path):
    _write_stack(tmp_path, "odd", {"model": "llama2-7b", "topology": "3x3", "checkpointPath": "gs://test-ckpt/x"})
    assert "`topology`" in _cli("--stack", "odd", "--root", str(tmp_path)).stderr
    missing = _cli("--stack", "nope", "--root", str(tmp_path))
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_stack_file_values_are_read_as_pulumi_passes_them(tmp_path):
    (tmp_path / "Pulumi.typed.yaml").write_text(
        yaml.safe_dump(
            {
                "config": {
                    "gcp:project": "test-project",
                    "other-project:model": "ignored",
                    "jetstream-tpu:model": "llama3.1-8b",
                    "jetstream-tpu:topology": "2x2",
                    "jetstream-tpu:checkpointPath": "gs://test-ckpt/x",
                    "jetstream-tpu:quantizeKvCache": False,
                    "jetstream-tpu:perDeviceBatchSize": 2,
                    "jetstream-tpu:serverFlags": {"attention": "dot_product"},
                }
            }
        )
    )
    raw, project = render.read_stack_file(tmp_path / "Pulumi.typed.yaml")
    assert project == "test-project"
    assert raw == {
        "model": "llama3.1-8b",
        "topology": "2x2",
        "checkpointPath": "gs://test-ckpt/x",
        "quantizeKvCache": "false",
        "perDeviceBatchSize": "2",
        "serverFlags": '{"attention": "dot_product"}',
    }


@pytest.mark.parametrize("stack", ["llama3-405b-v6e16", "llama2-70b-disagg", "llama3-8b-v6e8"])
def test_replica_keys_at_their_defaults_change_nothing(stack, tmp_path):
    """The autoscaling contract: a stack that does not set the four keys previews as before; Pulumi
    hands the program their defaults, which must render exactly what leaving them out renders."""
    raw, project = render.read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    defaults = {"replicas": "1", "maxReplicas": "0", "autoscalingMetric": "prefill-backlog", "autoscalingTarget": ""}
    _write_stack(tmp_path, stack, {**raw, **defaults}, project)
    assert render.render(stack, tmp_path) == render.render(stack)
    text = render.render(stack)
    assert (
        "replicas: 1\n" in text and "PodMonitoring" not in text and "prometheus_port" not in text and "-r1-" not in text
    )
