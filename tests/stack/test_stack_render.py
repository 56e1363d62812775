"""The offline renderer: `python -m components.render --stack <name>`."""

from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from components import manifests, render

from conftest import EXAMPLE_STACKS, ROOT
from stack_helpers import example, lws_validator


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "components.render", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("stack", EXAMPLE_STACKS)
def test_render_prints_the_manifests_kubectl_would_apply(stack):
    result = _cli("--stack", stack)
    assert result.returncode == 0, result.stderr
    documents = [document for document in yaml.safe_load_all(result.stdout) if document is not None]
    cfg, plan = example(stack)
    assert documents == manifests.serving_manifests(cfg, plan)
    lws_validator().validate(documents[0])
    kubernetes_validate.validate(documents[1], "1.33.0", strict=True)


def test_render_prints_the_plan_summary_as_comments():
    text = render.render("llama3-405b-v6e16")
    header = "\n".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    plan = yaml.safe_load(header)["plan"]
    assert plan["chipsPerSlice"] == 16 and plan["hostsPerSlice"] == 4
    assert plan["parallelism"] == {"fsdp": 1, "autoregressive": 2, "tensor": 8}
    assert plan["hbmGiBPerChip"]["needed"] <= plan["hbmGiBPerChip"]["usable"]
    assert plan["nodePoolSpecs"][0]["tpu_topology"] == "4x4" and plan["nodePoolSpecs"][0]["node_count"] == 4


def _write_stack(tmp_path, name: str, values: dict[str, str]) -> None:
    config = {"gcp:project": "test-project", **{f"jetstream-tpu:{key}": value for key, value in values.items()}}
    (tmp_path / f"Pulumi.{name}.yaml").write_text(yaml.safe_dump({"config": config}))


def test_bad_config_prints_the_preview_error_and_exits_non_zero(tmp_path):
    _write_stack(tmp_path, "bad", {"model": "llama3.1-405b", "topology": "4x4", "quantization": "bf16", "checkpointPath": "gs://test-ckpt/x"})
    result = _cli("--stack", "bad", "--root", str(tmp_path))
    assert result.returncode != 0 and result.stdout == ""
    assert "`quantization`" in result.stderr and "needs 52.2 GiB HBM per chip" in result.stderr and "Suggestion:" in result.stderr


def test_unknown_topology_and_missing_stack_file_exit_non_zero(tmp_path):
    _write_stack(tmp_path, "odd", {"model": "llama2-7b", "topology": "3x3", "checkpointPath": "gs://test-ckpt/x"})
    assert "`topology`" in _cli("--stack", "odd", "--root", str(tmp_path)).stderr
    missing = _cli("--stack", "nope", "--root", str(tmp_path))
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_stack_file_values_are_read_as_pulumi_passes_them(tmp_path):
    (tmp_path / "Pulumi.typed.yaml").write_text(yaml.safe_dump({"config": {
        "gcp:project": "test-project", "other-project:model": "ignored",
        "jetstream-tpu:model": "llama3.1-8b", "jetstream-tpu:topology": "2x2", "jetstream-tpu:checkpointPath": "gs://test-ckpt/x",
        "jetstream-tpu:quantizeKvCache": False, "jetstream-tpu:perDeviceBatchSize": 2, "jetstream-tpu:serverFlags": {"attention": "dot_product"}}}))
    raw, project = render.read_stack_file(tmp_path / "Pulumi.typed.yaml")
    assert project == "test-project"
    assert raw == {"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-ckpt/x", "quantizeKvCache": "false",
                   "perDeviceBatchSize": "2", "serverFlags": '{"attention": "dot_product"}'}
