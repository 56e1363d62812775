"""Rendered manifests: golden parity with the seed, the CRD schema, kubernetes-validate."""

from __future__ import annotations

import copy
import dataclasses
import typing

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components import lws_model, manifests
from components.config import DEFAULT_IMAGES

from stack_helpers import GOLDEN, config, example, lws_openapi_schema, lws_validator

GOLDEN_FILES = {
    "llama3-405b-v6e16": "seed-interleaved-llama3.1-405b-v6e-16.yaml",
    "llama2-70b-disagg": "seed-disaggregated-llama2-70b-2x-v6e-8.yaml",
}
SEED_SCRATCH = "--gcs_scratch_location=gs://cloud-pathways-staging/tmp"
SEED_LATEST = {
    "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/proxy_server:latest": DEFAULT_IMAGES["pathwaysProxyImage"],
    "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/server:latest": DEFAULT_IMAGES["pathwaysServerImage"],
}
K8S_VERSION = "1.33.0"

# Every way the stack's output differs from the seed's YAML on purpose; nothing else may differ.
INTENTIONAL_DIFFERENCES = (
    "metadata.namespace: the LWS and the Service live in the stack's namespace",
    "serviceAccountName: leader and worker pods run as the Workload Identity service account",
    "images: the Pathways proxy_server/server ':latest' tags are pinned",
    "imagePullPolicy: Always -> IfNotPresent, since every image is pinned",
    "--gcs_scratch_location: Google's shared staging bucket -> the stack's own scratch bucket",
    "disaggregated: the worker template carries the TPU toleration the leader has",
)


def seed_reference(stack: str, cfg) -> list[dict]:
    """The seed YAML with its placeholders filled from the stack config."""
    text = (GOLDEN / GOLDEN_FILES[stack]).read_text()
    for placeholder, value in {"TPU_ACCELERATOR_TYPE": "tpu-v6e-slice", "TPU_TOPOLOGY": cfg.tpu_slice.topology,
                               "GCS_CHECKPOINT_PATH": cfg.checkpoint_path}.items():
        text = text.replace(placeholder, value)
    return list(yaml.safe_load_all(text))


def _containers(pod_spec: dict):
    yield from pod_spec["containers"]


def apply_intentional_differences(reference: list[dict], cfg) -> list[dict]:
    """Apply exactly the INTENTIONAL_DIFFERENCES to the seed documents."""
    lws, svc = copy.deepcopy(reference)
    for document in (lws, svc):
        document["metadata"]["namespace"] = cfg.namespace
    template = lws["spec"]["leaderWorkerTemplate"]
    pods = (template["leaderTemplate"]["spec"], template["workerTemplate"]["spec"])
    for pod in pods:
        pod["serviceAccountName"] = cfg.kubernetes_service_account
        for container in _containers(pod):
            container["image"] = SEED_LATEST.get(container["image"], container["image"])
            container["imagePullPolicy"] = "IfNotPresent"
            container["args"] = [f"--gcs_scratch_location={cfg.scratch_location}" if arg == SEED_SCRATCH else arg for arg in container.get("args", [])]
            if not container["args"]:
                del container["args"]
    if cfg.mode == "disaggregated":
        pods[1]["tolerations"] = pods[0]["tolerations"]
    return [lws, svc]


@pytest.mark.parametrize("stack", GOLDEN_FILES)
def test_example_stacks_render_the_seed_deployments(stack):
    cfg, plan = example(stack)
    expected = apply_intentional_differences(seed_reference(stack, cfg), cfg)
    assert manifests.serving_manifests(cfg, plan) == expected


@pytest.mark.parametrize("stack", GOLDEN_FILES)
def test_the_differences_are_real(stack):
    """Guard the guard: without the listed differences, the reference does not match."""
    cfg, plan = example(stack)
    assert manifests.serving_manifests(cfg, plan) != seed_reference(stack, cfg)


def test_golden_parity_catches_a_changed_flag():
    cfg, plan = example("llama3-405b-v6e16")
    rendered = manifests.leader_worker_set(dataclasses.replace(cfg, per_device_batch_size=9), plan)
    expected = apply_intentional_differences(seed_reference("llama3-405b-v6e16", cfg), cfg)[0]
    assert rendered != expected


# ---------------------------------------------------------------------------------------------
# Schemas.

VARIANTS = {
    "405b": lambda: example("llama3-405b-v6e16"),
    "70b-disagg": lambda: example("llama2-70b-disagg"),
    "8b-single-host": lambda: example("llama3-8b-v6e8"),
}


def _with_plan(cfg):
    from components.planner import plan_deployment
    return cfg, plan_deployment(cfg)


VARIANTS["bundled-bf16"] = lambda: _with_plan(config(serverRuntime="bundled", bundledServerImage="example.com/jetstream-tpu-server:0.1.0", quantization="bf16"))
VARIANTS["1x1"] = lambda: _with_plan(config(topology="1x1", namespace="default"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_leader_worker_set_validates_against_the_strict_crd_schema(variant):
    cfg, plan = VARIANTS[variant]()
    lws_validator().validate(manifests.leader_worker_set(cfg, plan))


def test_strict_crd_schema_rejects_a_misplaced_field():
    cfg, plan = example("llama2-70b-disagg")
    lws = manifests.leader_worker_set(cfg, plan)
    lws["spec"]["subGroupPolicy"] = lws["spec"]["leaderWorkerTemplate"].pop("subGroupPolicy")
    with pytest.raises(jsonschema.ValidationError):
        lws_validator().validate(lws)


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_objects_validate_with_kubernetes_validate(variant):
    cfg, plan = VARIANTS[variant]()
    kubernetes_validate.validate(manifests.service(cfg), K8S_VERSION, strict=True)
    template = manifests.leader_worker_set(cfg, plan)["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{cfg.app_name}-{role.lower()}"}, "spec": template[role]["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_kubernetes_validate_catches_a_bad_service():
    cfg, _ = example("llama3-405b-v6e16")
    service = manifests.service(cfg)
    service["spec"]["ports"][0]["targetPrt"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------
# The typed LWS model against the CRD.


def _dataclass_in(annotation):
    """The dataclass inside X | None, tuple[X, ...], or None."""
    for candidate in (annotation, *typing.get_args(annotation), *(arg for inner in typing.get_args(annotation) for arg in typing.get_args(inner))):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _check_model_against_schema(cls, schema: dict, path: str, missing: list[str]):
    hints = typing.get_type_hints(cls)
    properties = schema.get("properties")
    if properties is None:  # the CRD root metadata is the API server's ObjectMeta
        assert path == "metadata", f"{path}: schema declares no properties"
        return
    for field in dataclasses.fields(cls):
        name = lws_model.camel(field.name)
        if name not in properties:
            missing.append(f"{path}.{name}")
            continue
        inner = _dataclass_in(hints[field.name])
        if inner is not None:
            sub = properties[name]
            _check_model_against_schema(inner, sub.get("items", sub), f"{path}.{name}", missing)


def test_every_typed_lws_field_exists_at_its_place_in_the_crd():
    missing: list[str] = []
    root = lws_openapi_schema()
    for field in dataclasses.fields(lws_model.LeaderWorkerSet):
        inner = _dataclass_in(typing.get_type_hints(lws_model.LeaderWorkerSet)[field.name])
        _check_model_against_schema(inner, root["properties"][field.name], field.name, missing)
    assert missing == []


def test_the_crd_check_catches_a_field_the_crd_lacks():
    @lws_model.model
    class Bogus(lws_model._Model):
        sub_group_size: int
        leader_count: int

    missing: list[str] = []
    schema = lws_openapi_schema()["properties"]["spec"]["properties"]["leaderWorkerTemplate"]["properties"]["subGroupPolicy"]
    _check_model_against_schema(Bogus, schema, "subGroupPolicy", missing)
    assert missing == ["subGroupPolicy.leaderCount"]


def test_a_misspelled_or_misplaced_field_fails_at_construction():
    with pytest.raises(TypeError):
        lws_model.Container(name="x", image="y:1", imagePullPolicy="IfNotPresent")
    with pytest.raises(TypeError):
        lws_model.LeaderWorkerSetSpec(replicas=1, sub_group_policy=lws_model.SubGroupPolicy(sub_group_size=2),
                                      leader_worker_template=lws_model.LeaderWorkerTemplate(worker_template=lws_model.PodTemplateSpec()))


def test_to_dict_uses_crd_names_and_drops_unset_fields():
    probe = lws_model.Probe(http_get=lws_model.HTTPGetAction(path="/healthcheck", port=8000), period_seconds=60)
    assert probe.to_dict() == {"httpGet": {"path": "/healthcheck", "port": 8000, "scheme": "HTTP"}, "periodSeconds": 60}


# ---------------------------------------------------------------------------------------------
# Server command line and runtimes.


def _jax_tpu(cfg, plan) -> dict:
    leader = manifests.leader_worker_set(cfg, plan)["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    return next(container for container in leader["containers"] if container["name"] == "jax-tpu")


def test_server_flags_override_in_place_and_append():
    cfg, plan = _with_plan(config(serverFlags='{"enable_model_warmup": false, "attention": "dot_product"}'))
    args = _jax_tpu(cfg, plan)["args"]
    assert "enable_model_warmup=false" in args and "enable_model_warmup=true" not in args
    assert args[-1] == "attention=dot_product"
    assert args.index("enable_model_warmup=false") < args.index("attention=dot_product")


def test_bf16_drops_the_int8_flags():
    cfg, plan = _with_plan(config(quantization="bf16", quantizeKvCache="false"))
    args = _jax_tpu(cfg, plan)["args"]
    assert not any(arg.startswith(("quantization=", "checkpoint_is_quantized=")) for arg in args)
    assert "quantize_kvcache=false" in args


def test_disaggregated_mode_works_for_any_preset():
    cfg, plan = _with_plan(config(model="llama3.1-8b", topology="2x4", mode="disaggregated"))
    lws = manifests.leader_worker_set(cfg, plan)
    assert "inference_server=ExperimentalMaxtextDisaggregatedServer_8" in _jax_tpu(cfg, plan)["args"]
    assert lws["spec"]["leaderWorkerTemplate"]["subGroupPolicy"] == {"subGroupSize": 2}
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 5


def test_bundled_runtime_runs_this_repositorys_server():
    image = "example.com/jetstream-tpu-server:0.1.0"
    cfg, plan = _with_plan(config(serverRuntime="bundled", bundledServerImage=image))
    leader = manifests.leader_worker_set(cfg, plan)["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    names = [container["name"] for container in leader["containers"]]
    assert names == ["pathways-proxy", "pathways-rm", "jax-tpu"]  # it serves HTTP itself
    server = _jax_tpu(cfg, plan)
    assert server["image"] == image
    assert server["command"] == ["python", "-m", "serving", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "9000"]
    assert {port["containerPort"] for port in server["ports"]} == {8000, 9000}
    assert server["args"][0] == "MaxText/configs/base.yml" and "model_name=llama3.1-8b" in server["args"]


def test_every_default_image_is_pinned():
    for image in DEFAULT_IMAGES.values():
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
