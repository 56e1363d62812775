"""Rendered manifests: golden parity with the reference YAMLs, the CRD schema, kubernetes-validate."""

from __future__ import annotations

import copy
import dataclasses
import typing

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components.core import lws_model, manifests
from components.core.errors import ConfigError
from components.core.runtimes import gcs_fuse
from components.core.runtimes.pathways import DEFAULT_IMAGES
from tests.stack.stack_helpers import (
    BUNDLED_IMAGE,
    BUNDLED_STACKS,
    GOLDEN,
    bundled_example,
    config,
    example,
    lws_openapi_schema,
    lws_validator,
)

GOLDEN_FILES = {
    "llama3-405b-v6e16": "reference-interleaved-llama3.1-405b-v6e-16.yaml",
    "llama2-70b-disagg": "reference-disaggregated-llama2-70b-2x-v6e-8.yaml",
}
REFERENCE_SCRATCH = "--gcs_scratch_location=gs://cloud-pathways-staging/tmp"
REFERENCE_LATEST = {
    "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/proxy_server:latest": DEFAULT_IMAGES["pathwaysProxyImage"],
    "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/server:latest": DEFAULT_IMAGES["pathwaysServerImage"],
}
K8S_VERSION = "1.33.0"
STACK_TOLERATION = {"key": "jetstream-tpu/stack", "operator": "Equal", "effect": "NoSchedule"}  # and the stack's value

# Every way the stack's output differs from the reference YAMLs on purpose; nothing else may differ.
INTENTIONAL_DIFFERENCES = (
    "metadata.namespace: the LWS and the Service live in the stack's namespace",
    "serviceAccountName: leader and worker pods run as the Workload Identity service account",
    "images: the Pathways proxy_server/server ':latest' tags are pinned",
    "imagePullPolicy: Always -> IfNotPresent, since every image is pinned",
    "--gcs_scratch_location: Google's shared staging bucket -> the stack's own scratch bucket",
    "disaggregated: the worker template carries the TPU toleration the leader has",
    "nodeSelector: pods also select the stack's own TPU pools (label jetstream-tpu/deployment)",
    "tolerations: pods also tolerate the stack's own taint on its TPU pools (jetstream-tpu/stack=<deployment id>)",
    "Service: annotated pulumi.com/skipAwait, so pulumi up never waits for the leader's endpoints",
    "disaggregated: subGroupPolicyType LeaderExcluded, the Pathways leader holds no TPU",
    "LWS: annotated pulumi.com/patchForce, so an apply takes spec.replicas back from a removed HPA",
    "Service: its type stated (serviceType, ClusterIP by default) and a second port jetstream-grpc 9000 -> 9000",
)


def reference_yaml(stack: str, cfg) -> list[dict]:
    """The reference YAML with its placeholders filled from the stack config."""
    text = (GOLDEN / GOLDEN_FILES[stack]).read_text()
    for placeholder, value in {
        "TPU_ACCELERATOR_TYPE": "tpu-v6e-slice",
        "TPU_TOPOLOGY": cfg.tpu_slice.topology,
        "GCS_CHECKPOINT_PATH": cfg.server.checkpoint_path,
    }.items():
        text = text.replace(placeholder, value)
    return list(yaml.safe_load_all(text))


def _containers(pod_spec: dict):
    yield from pod_spec["containers"]


def apply_intentional_differences(reference: list[dict], cfg) -> list[dict]:
    """Apply exactly the INTENTIONAL_DIFFERENCES to the reference YAML's documents."""
    lws, svc = copy.deepcopy(reference)
    for document in (lws, svc):
        document["metadata"]["namespace"] = cfg.names.namespace
    svc["metadata"]["annotations"] = {"pulumi.com/skipAwait": "true"}
    lws["metadata"]["annotations"]["pulumi.com/patchForce"] = "true"
    svc["spec"] = {"type": "ClusterIP", **svc["spec"]}
    svc["spec"]["ports"].append({"protocol": "TCP", "name": "jetstream-grpc", "port": 9000, "targetPort": 9000})
    template = lws["spec"]["leaderWorkerTemplate"]
    pods = (template["leaderTemplate"]["spec"], template["workerTemplate"]["spec"])
    for pod in pods:
        pod["serviceAccountName"] = cfg.names.kubernetes_service_account
        pod["nodeSelector"]["jetstream-tpu/deployment"] = cfg.deployment_id
        for container in _containers(pod):
            container["image"] = REFERENCE_LATEST.get(container["image"], container["image"])
            container["imagePullPolicy"] = "IfNotPresent"
            scratch = f"--gcs_scratch_location={cfg.scratch_location}"
            container["args"] = [scratch if arg == REFERENCE_SCRATCH else arg for arg in container.get("args", [])]
            if not container["args"]:
                del container["args"]
    if cfg.mode == "disaggregated":
        pods[1]["tolerations"] = pods[0]["tolerations"]
        template["subGroupPolicy"] = {"subGroupPolicyType": "LeaderExcluded", **template["subGroupPolicy"]}
    for pod in pods:
        pod["tolerations"] = [*pod["tolerations"], STACK_TOLERATION | {"value": cfg.deployment_id}]
    return [lws, svc]


@pytest.mark.parametrize("stack", GOLDEN_FILES)
def test_example_stacks_render_the_reference_deployments(stack):
    cfg, plan = example(stack)
    expected = apply_intentional_differences(reference_yaml(stack, cfg), cfg)
    assert manifests.serving_manifests(cfg, plan) == expected


@pytest.mark.parametrize("stack", GOLDEN_FILES)
def test_the_differences_are_real(stack):
    """Guard the guard: without the listed differences, the reference does not match."""
    cfg, plan = example(stack)
    assert manifests.serving_manifests(cfg, plan) != reference_yaml(stack, cfg)


def test_golden_parity_catches_a_changed_flag():
    cfg, plan = example("llama3-405b-v6e16")
    rendered = manifests.leader_worker_set(
        dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, per_device_batch_size=9)), plan
    ).to_dict()
    expected = apply_intentional_differences(reference_yaml("llama3-405b-v6e16", cfg), cfg)[0]
    assert rendered != expected


# ---------------------------------------------------------------------------------------------
# Schemas.

VARIANTS = {
    "405b": lambda: example("llama3-405b-v6e16"),
    "70b-disagg": lambda: example("llama2-70b-disagg"),
    "8b-single-host": lambda: example("llama3-8b-v6e8"),
}


def _with_plan(cfg):
    from components.core.planner import plan_deployment

    return cfg, plan_deployment(cfg)


VARIANTS["bundled-bf16"] = lambda: _with_plan(
    config(
        serverRuntime="bundled",
        bundledServerImage="example.com/jetstream-tpu-server:0.1.0",
        quantization="bf16",
        checkpointPath="gs://test-checkpoints/m/smollm2.gguf",
    )
)
VARIANTS["1x1"] = lambda: _with_plan(config(topology="1x1", namespace="default"))
for _stack in BUNDLED_STACKS:
    VARIANTS[f"bundled-{_stack}"] = lambda _stack=_stack: bundled_example(_stack)


@pytest.mark.parametrize("variant", VARIANTS)
def test_leader_worker_set_validates_against_the_strict_crd_schema(variant):
    cfg, plan = VARIANTS[variant]()
    lws_validator().validate(manifests.leader_worker_set(cfg, plan).to_dict())


def test_strict_crd_schema_rejects_a_misplaced_field():
    cfg, plan = example("llama2-70b-disagg")
    lws = manifests.leader_worker_set(cfg, plan).to_dict()
    lws["spec"]["subGroupPolicy"] = lws["spec"]["leaderWorkerTemplate"].pop("subGroupPolicy")
    with pytest.raises(jsonschema.ValidationError):
        lws_validator().validate(lws)


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_objects_validate_with_kubernetes_validate(variant):
    cfg, plan = VARIANTS[variant]()
    kubernetes_validate.validate(manifests.service(cfg).to_dict(), K8S_VERSION, strict=True)
    template = manifests.leader_worker_set(cfg, plan).to_dict()["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{cfg.names.app_name}-{role.lower()}"},
            "spec": template[role]["spec"],
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_namespace_and_service_account_validate_with_kubernetes_validate(variant):
    cfg, plan = VARIANTS[variant]()
    namespace, account = manifests.namespace(cfg), manifests.service_account(cfg).to_dict()
    if cfg.names.namespace == "default":
        assert namespace is None
    else:
        assert namespace.to_dict() == {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": cfg.names.namespace},
        }
        kubernetes_validate.validate(namespace.to_dict(), K8S_VERSION, strict=True)
    kubernetes_validate.validate(account, K8S_VERSION, strict=True)
    binding = {
        "annotations": {
            "iam.gke.io/gcp-service-account": f"{cfg.workload_service_account_id}@{cfg.project}.iam.gserviceaccount.com"
        }
    }
    # Workload Identity for the bundled server; Pathways pods act as the node account instead.
    assert account["metadata"] == {
        "name": cfg.names.kubernetes_service_account,
        "namespace": cfg.names.namespace,
        **(binding if cfg.pods_use_workload_identity else {}),
    }
    # Every pod runs as that account, in that namespace.
    lws = manifests.leader_worker_set(cfg, plan).to_dict()
    template = lws["spec"]["leaderWorkerTemplate"]
    assert {template[role]["spec"]["serviceAccountName"] for role in ("leaderTemplate", "workerTemplate")} == {
        account["metadata"]["name"]
    }
    assert (
        lws["metadata"]["namespace"]
        == account["metadata"]["namespace"]
        == manifests.service(cfg).to_dict()["metadata"]["namespace"]
    )
    kinds = [document["kind"] for document in manifests.all_manifests(cfg, plan)]
    assert kinds == [*(["Namespace"] if namespace else []), "ServiceAccount", "LeaderWorkerSet", "Service"]


def test_kubernetes_validate_catches_a_bad_service():
    cfg, _ = example("llama3-405b-v6e16")
    service = manifests.service(cfg).to_dict()
    service["spec"]["ports"][0]["targetPrt"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------
# The typed LWS model against the CRD.


def _dataclass_in(annotation):
    """The dataclass inside X | None, tuple[X, ...], or None."""
    for candidate in (
        annotation,
        *typing.get_args(annotation),
        *(arg for inner in typing.get_args(annotation) for arg in typing.get_args(inner)),
    ):
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
    class Bogus(lws_model.Model):
        sub_group_size: int
        leader_count: int

    missing: list[str] = []
    schema = lws_openapi_schema()["properties"]["spec"]["properties"]["leaderWorkerTemplate"]["properties"][
        "subGroupPolicy"
    ]
    _check_model_against_schema(Bogus, schema, "subGroupPolicy", missing)
    assert missing == ["subGroupPolicy.leaderCount"]


def test_a_misspelled_or_misplaced_field_fails_at_construction():
    with pytest.raises(TypeError):
        lws_model.Container(name="x", image="y:1", imagePullPolicy="IfNotPresent")
    with pytest.raises(TypeError):
        lws_model.LeaderWorkerSetSpec(
            replicas=1,
            sub_group_policy=lws_model.SubGroupPolicy(sub_group_size=2),
            leader_worker_template=lws_model.LeaderWorkerTemplate(worker_template=lws_model.PodTemplateSpec()),
        )


def test_to_dict_uses_crd_names_and_drops_unset_fields():
    probe = lws_model.Probe(http_get=lws_model.HTTPGetAction(path="/healthcheck", port=8000), period_seconds=60)
    assert probe.to_dict() == {"httpGet": {"path": "/healthcheck", "port": 8000, "scheme": "HTTP"}, "periodSeconds": 60}


# ---------------------------------------------------------------------------------------------
# Server command line and runtimes.


def _jax_tpu(cfg, plan) -> dict:
    leader = manifests.leader_worker_set(cfg, plan).to_dict()["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
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
    lws = manifests.leader_worker_set(cfg, plan).to_dict()
    assert "inference_server=ExperimentalMaxtextDisaggregatedServer_8" in _jax_tpu(cfg, plan)["args"]
    assert lws["spec"]["leaderWorkerTemplate"]["subGroupPolicy"] == {
        "subGroupPolicyType": "LeaderExcluded",
        "subGroupSize": 2,
    }
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 5


# ---------------------------------------------------------------------------------------------
# serverRuntime=bundled: multi-controller, one server process per TPU host, no Pathways.

PATHWAYS_IMAGES = {
    DEFAULT_IMAGES[name]
    for name in ("pathwaysServerImage", "pathwaysProxyImage", "jetstreamImage", "jetstreamHttpImage")
}


def _templates(cfg, plan) -> tuple[dict, dict, dict]:
    lws = manifests.leader_worker_set(cfg, plan).to_dict()
    template = lws["spec"]["leaderWorkerTemplate"]
    return lws, template["leaderTemplate"], template["workerTemplate"]


def _args(container) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in container["args"] if "=" in arg)


@pytest.mark.parametrize("stack", BUNDLED_STACKS)
def test_bundled_leader_and_workers_each_run_the_server_on_their_hosts_chips(stack):
    cfg, plan = bundled_example(stack)
    lws, leader, worker = _templates(cfg, plan)
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == cfg.tpu_slice.hosts == plan.hosts_per_slice
    assert "subGroupPolicy" not in lws["spec"]["leaderWorkerTemplate"]
    assert lws["metadata"]["annotations"] == {
        "leaderworkerset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool",
        "pulumi.com/patchForce": "true",
    }
    for template in (leader, worker):
        spec = template["spec"]
        (server,) = spec["containers"]  # no Pathways proxy, resource manager, HTTP sidecar or worker
        assert server["name"] == "jax-tpu" and server["image"] == BUNDLED_IMAGE
        assert server["command"] == [
            "python",
            "-m",
            "serving",
            "--host",
            "0.0.0.0",
            "--http-port",
            "8000",
            "--grpc-port",
            "9000",
        ]
        assert server["resources"] == {"limits": {"google.com/tpu": str(cfg.tpu_slice.chips_per_host)}}
        assert server["env"] == [
            {"name": "JAX_COORDINATOR_PORT", "value": "8476"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]
        assert {8476, 8477} <= {port["containerPort"] for port in server["ports"]}
        assert spec["nodeSelector"] == {
            "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
            "cloud.google.com/gke-tpu-topology": cfg.tpu_slice.topology,
            "jetstream-tpu/deployment": f"jetstream-{stack}",
        }
        assert spec["tolerations"] == [
            {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"},
            STACK_TOLERATION | {"value": f"jetstream-{stack}"},
        ]
        images = {container["image"] for container in spec["containers"]}
        assert "initContainers" not in spec  # the checkpoint is mounted, not copied
        assert not images & PATHWAYS_IMAGES
        assert not any("pathways" in container["name"] for container in spec["containers"])
        flags = _args(server)
        assert flags["enable_single_controller"] == "false"
        assert flags["ici_tensor_parallelism"] == str(plan.axis_flags["tensor"])
        assert not any(arg.startswith("--gcs_scratch_location") for arg in server["args"])
    # Same command line everywhere (multi-controller JAX); only the leader binds the front ends.
    assert leader["spec"]["containers"][0]["args"] == worker["spec"]["containers"][0]["args"]
    leader_server, worker_server = leader["spec"]["containers"][0], worker["spec"]["containers"][0]
    assert {port["containerPort"] for port in leader_server["ports"]} == {8000, 9000, 8476, 8477}
    assert {port["containerPort"] for port in worker_server["ports"]} == {8476, 8477}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert leader_server[probe]["httpGet"] == {"path": "/healthcheck", "port": 8000, "scheme": "HTTP"}
        assert probe not in worker_server  # workers serve no HTTP


def _fuse_volume(bucket: str, directory: str, name: str = "models", read_only: bool = True) -> dict:
    options = gcs_fuse.MOUNT_OPTIONS + (f",only-dir={directory}" if directory else "")
    return {
        "name": name,
        "csi": {
            "driver": "gcsfuse.csi.storage.gke.io",
            **({"readOnly": True} if read_only else {}),
            "volumeAttributes": {"bucketName": bucket, "mountOptions": options},
        },
    }


@pytest.mark.parametrize("stack", BUNDLED_STACKS)
def test_bundled_pods_mount_the_checkpoints_directory_read_only_through_gcs_fuse(stack):
    cfg, plan = bundled_example(stack)
    _, leader, worker = _templates(cfg, plan)
    assert cfg.server.checkpoint_path == f"gs://my-gcp-project-checkpoints/{stack}/model.npz"
    for template in (leader, worker):
        spec = template["spec"]
        assert template["metadata"]["annotations"] == gcs_fuse.ANNOTATIONS  # the driver's sidecar
        assert spec["volumes"] == [
            {"name": "gke-gcsfuse-cache", "emptyDir": {"medium": "Memory"}},
            _fuse_volume("my-gcp-project-checkpoints", stack),
            _fuse_volume(cfg.scratch_bucket, f"jax-cache/{cfg.deployment_id}", "jax-cache", False),
        ]
        (server,) = spec["containers"]
        assert server["volumeMounts"] == [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "jax-cache", "mountPath": "/jax-cache"},
        ]
        assert _args(server)["load_parameters_path"] == "/models/model.npz"
        # the compilation cache of each pod in its own directory of the deployment's prefix
        assert _args(server)["jax_cache_dir"] == "/jax-cache/$(POD_NAME)"


@pytest.mark.parametrize(
    "path, volume, load_path",
    [
        ("gs://weights/hf/Llama-3.1-8B", _fuse_volume("weights", "hf/Llama-3.1-8B"), "/models"),
        ("gs://weights/Llama-3.1-8B/", _fuse_volume("weights", "Llama-3.1-8B"), "/models"),
        ("gs://weights", _fuse_volume("weights", ""), "/models"),
        ("gs://weights/llama-q8.gguf", _fuse_volume("weights", ""), "/models/llama-q8.gguf"),
    ],
)
def test_bundled_reads_a_hugging_face_directory_or_one_object(path, volume, load_path):
    cfg, plan = _with_plan(config(serverRuntime="bundled", bundledServerImage=BUNDLED_IMAGE, checkpointPath=path))
    _, leader, _ = _templates(cfg, plan)
    assert leader["spec"]["volumes"][1] == volume
    flags = _args(leader["spec"]["containers"][0])
    assert flags["load_parameters_path"] == load_path
    # A Hugging Face checkpoint is bf16 on disk: int8 is the server's quantization on load.
    assert flags["checkpoint_is_quantized"] == "false" and flags["quantization"] == "int8"


def test_bundled_refuses_a_preset_its_server_cannot_run():
    with pytest.raises(ConfigError) as refused:
        config(
            model="gemma-7b",
            serverRuntime="bundled",
            bundledServerImage=BUNDLED_IMAGE,
            checkpointPath="gs://weights/gemma-7b",
        )
    assert refused.value.keys == ("model", "serverRuntime") and "gemma" in refused.value.problem


def test_bundled_service_reaches_the_leader_only():
    cfg, plan = bundled_example("llama3-405b-v6e16")
    _, leader, worker = _templates(cfg, plan)
    selector = manifests.service(cfg).to_dict()["spec"]["selector"]
    assert selector.items() <= leader["metadata"]["labels"].items()
    assert "labels" not in worker["metadata"]  # workers carry only LWS's own labels
    assert manifests.service(cfg).to_dict()["spec"]["ports"][0]["targetPort"] == 8000


def test_bundled_checkpoint_settings_follow_the_file_format():
    npz, _ = bundled_example("llama3-405b-v6e16", "llama-int8.npz")
    gguf, plan = bundled_example("llama3-405b-v6e16", "llama-q8.gguf")
    assert _args(_templates(npz, plan)[1]["spec"]["containers"][0])["checkpoint_is_quantized"] == "true"
    # GGUF tensors are dequantized on load, then quantized to int8 by the server.
    flags = _args(_templates(gguf, plan)[1]["spec"]["containers"][0])
    assert flags["quantization"] == "int8" and flags["checkpoint_is_quantized"] == "false"
    assert flags["load_parameters_path"] == "/models/llama-q8.gguf"


def test_bundled_single_host_is_a_group_of_one():
    cfg, plan = bundled_example("llama3-8b-v6e8")
    lws, leader, _ = _templates(cfg, plan)
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 1  # no workers: LWS_GROUP_SIZE=1, one process
    assert leader["spec"]["containers"][0]["resources"]["limits"] == {"google.com/tpu": "8"}
    assert leader["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"


def test_jetstream_runtime_keeps_pathways_and_its_sizes():
    cfg, plan = example("llama3-405b-v6e16")
    lws, leader, worker = _templates(cfg, plan)
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == cfg.tpu_slice.hosts + 1
    assert [container["name"] for container in leader["spec"]["containers"]] == [
        "pathways-proxy",
        "pathways-rm",
        "jax-tpu",
        "jetstream-http",
    ]
    assert "initContainers" not in leader["spec"] and "volumes" not in worker["spec"]


def test_every_default_image_is_pinned():
    for image in DEFAULT_IMAGES.values():
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")


def test_bundled_server_gets_every_memory_flag_explicitly():
    """8.11: the planner sizes memory with these values; the server's defaults must not decide them."""
    memory_flags = {"weight_dtype", "dtype", "quantization", "quantize_kvcache", "checkpoint_is_quantized"}
    for raw, expected in (
        (
            {"quantization": "int8", "quantizeKvCache": "true", "checkpointPath": "gs://test-checkpoints/m/model.npz"},
            {"quantization": "int8", "quantize_kvcache": "true", "checkpoint_is_quantized": "true"},
        ),
        (
            {"quantization": "bf16", "quantizeKvCache": "false", "checkpointPath": "gs://test-checkpoints/m/model.npz"},
            {"quantization": "", "quantize_kvcache": "false", "checkpoint_is_quantized": "false"},
        ),
    ):
        cfg, plan = _with_plan(config(serverRuntime="bundled", bundledServerImage=BUNDLED_IMAGE, **raw))
        flags = _args(_templates(cfg, plan)[1]["spec"]["containers"][0])
        assert memory_flags <= set(flags)
        assert {key: flags[key] for key in memory_flags} == {
            "weight_dtype": "bfloat16",
            "dtype": "bfloat16",
            **expected,
        }


# ---------------------------------------------------------------------------------------------
# Updates the LWS v0.10.0 webhook refuses.

# Every field kubernetes-sigs/lws v0.10.0 refuses to change on update (pkg/webhooks/
# leaderworkerset_webhook.go, LeaderWorkerSetWebhook.ValidateUpdate), with the webhook's message.
WEBHOOK_IMMUTABLE_ON_UPDATE = {
    "spec.leaderWorkerTemplate.subGroupPolicy": (
        "cannot enable subGroupSize after the lws is already created / cannot remove subGroupSize after enabled"
    ),
    "spec.leaderWorkerTemplate.subGroupPolicy.subGroupSize": "field is immutable",
    "spec.networkConfig.subdomainPolicy": "cannot set subdomainPolicy as null",
}


def _covers(replace_path: str, path: str) -> bool:
    """Pulumi's replaceOnChanges semantics: a listed property path covers itself and everything under it."""
    return path == replace_path or path.startswith(replace_path + ".")


def test_every_field_the_update_webhook_treats_as_immutable_replaces_the_lws():
    for path in WEBHOOK_IMMUTABLE_ON_UPDATE:
        assert any(_covers(replace, path) for replace in lws_model.REPLACE_ON_CHANGES), path
    # Nothing else: every other field updates in place (a rolling update of the groups).
    assert all(
        any(_covers(replace, path) for path in WEBHOOK_IMMUTABLE_ON_UPDATE) for replace in lws_model.REPLACE_ON_CHANGES
    )


def _changed_paths(old, new, prefix: str = "") -> set[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return {
            path
            for key in old.keys() | new.keys()
            for path in _changed_paths(old.get(key), new.get(key), f"{prefix}.{key}".lstrip("."))
        }
    return set() if old == new else {prefix}


@pytest.mark.parametrize("change", ["mode", "topology"])
def test_mode_and_disaggregated_topology_changes_hit_an_immutable_field_and_replace(change):
    before = {"model": "llama2-70b", "topology": "2x4", "mode": "disaggregated"}
    after = {**before, **({"mode": "interleaved"} if change == "mode" else {"topology": "4x4"})}
    old, new = (manifests.leader_worker_set(*_with_plan(config(**raw))).to_dict() for raw in (before, after))
    immutable = {
        path
        for path in _changed_paths(old, new)
        if any(_covers(field, path) or _covers(path, field) for field in WEBHOOK_IMMUTABLE_ON_UPDATE)
    }
    assert immutable, "the change must touch subGroupPolicy, or this test proves nothing"
    assert all(any(_covers(replace, path) for replace in lws_model.REPLACE_ON_CHANGES) for path in immutable)
