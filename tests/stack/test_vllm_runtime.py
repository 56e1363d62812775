"""serverRuntime=vllm: GKE's vLLM-on-TPU tutorial as the golden reference, what the runtime refuses,
the planner's memory, the Service, autoscaling, scheduling and the program's Secret."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from components.core import manifests, models, scheduling, tpu
from components.core.config import parse_stack_config
from components.core.errors import ConfigError
from components.core.node_pools import DEPLOYMENT_LABEL, STACK_TAINT_KEY
from components.core.planner import GIB, plan_deployment
from components.core.runtimes import gcs_fuse, vllm
from components.render import read_stack_file, render
from tests.stack.pulumi_harness import HF_TOKEN, run_stack, stack_file_config
from tests.stack.stack_helpers import GOLDEN, ROOT, example

# The tutorial's setup as stack config: Llama 3.1 70B from the Hugging Face Hub on one 2x4 host,
# 128 sequences (16 per chip) of 4096 tokens, with its names and its extra vLLM flag.
TUTORIAL_CONFIG = {
    "model": "llama3.1-70b",
    "topology": "2x4",
    "tpuMachineType": "ct6e-standard-8t",
    "serverRuntime": "vllm",
    "quantization": "bf16",
    "quantizeKvCache": "false",
    "checkpointPath": "hf://meta-llama/Llama-3.1-70B",
    "hfTokenSecret": "hf-token",
    "maxTargetLength": "4096",
    "perDeviceBatchSize": "16",
    "appName": "vllm-tpu",
    "serviceName": "vllm-service",
    "serverFlags": json.dumps({"max_num_batched_tokens": "512"}),
}
# Every way our LeaderWorkerSet leader template differs from the tutorial's Deployment pod
# template; docs/stack/runtimes.md gives each its reason. Nothing else may differ.
TUTORIAL_DIFFERENCES = (
    "serviceAccountName: the stack's Kubernetes service account (the tutorial's KSA_NAME placeholder)",
    "nodeSelector: also the stack's deployment label (its own TPU pools only)",
    "tolerations: the TPU taint's toleration, stated as for every runtime",
    "image: docker.io/vllm/vllm-tpu pinned to a release tag instead of :latest; imagePullPolicy IfNotPresent",
    "args: --download-dir=/data/huggingface, a prefix of the scratch bucket beside the XLA caches",
    "args: --served-model-name (the preset's Hugging Face id), --gpu-memory-utilization (the planned fraction)",
    "args: --max-num-batched-tokens comes from serverFlags, after the planned flags",
    "env: the token's Secret is the stack's (<app>-hf-token, made from Secret Manager), same key",
    "env: VLLM_XLA_CACHE_PATH is one directory per pod (POD_NAME from the downward API)",
    "env: VLLM_USE_V1 dropped: the pinned vLLM has only the V1 engine",
    "ports: the container port is named http",
    "probes: /health over HTTP (readiness every 10 s, as the tutorial) plus startup and liveness probes",
    "volumes: the FUSE volume mounts the stack's scratch bucket (the tutorial's GSBUCKET placeholder)",
)


def tutorial_documents() -> dict[str, dict]:
    """The tutorial's objects by kind. Its Service line `type: LoadBalancer` ends in a tab, which
    kubectl's parser accepts and PyYAML does not: trailing whitespace is dropped before parsing."""
    documents = {}
    for name in ("llama3-70b", "hpa", "pod-monitor"):
        text = "\n".join(line.rstrip() for line in (GOLDEN / f"gke-tutorial-vllm-{name}.yaml").read_text().splitlines())
        for document in yaml.safe_load_all(text):
            documents[document["kind"]] = document
    return documents


def _args_by_flag(args: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in args)


def apply_tutorial_differences(template: dict, cfg) -> dict:
    """The tutorial's pod template with exactly the TUTORIAL_DIFFERENCES applied (args by flag)."""
    template = copy.deepcopy(template)
    spec = template["spec"]
    spec["serviceAccountName"] = cfg.names.kubernetes_service_account
    spec["nodeSelector"][DEPLOYMENT_LABEL] = cfg.deployment_id
    spec["tolerations"] = [
        {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": STACK_TAINT_KEY, "operator": "Equal", "value": cfg.deployment_id, "effect": "NoSchedule"},
    ]
    (container,) = spec["containers"]
    container |= {"image": cfg.images["vllmImage"], "imagePullPolicy": "IfNotPresent"}
    args = _args_by_flag(container["args"])
    args |= {
        "download-dir": "/data/huggingface",
        "served-model-name": "meta-llama/Llama-3.1-70B",
        "gpu-memory-utilization": "0.9",
    }
    container["args"] = args
    token, _cache, _v1 = container["env"]
    token["valueFrom"]["secretKeyRef"]["name"] = "vllm-tpu-hf-token"
    container["env"] = [
        token,
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "VLLM_XLA_CACHE_PATH", "value": "/data/xla-cache/$(POD_NAME)"},
    ]
    container["ports"][0]["name"] = "http"
    container["resources"]["limits"]["google.com/tpu"] = str(container["resources"]["limits"]["google.com/tpu"])
    health = {"path": "/health", "port": 8000, "scheme": "HTTP"}
    failures = cfg.model.probe_failure_threshold
    container["startupProbe"] = {
        "httpGet": health,
        "periodSeconds": 1,
        "initialDelaySeconds": cfg.startup_probe_delay_seconds,
        "failureThreshold": 10000,
    }
    container["livenessProbe"] = {"httpGet": health, "periodSeconds": 60, "failureThreshold": failures}
    container["readinessProbe"] = {"httpGet": health, "periodSeconds": 10, "failureThreshold": failures}
    spec["volumes"][2]["csi"]["volumeAttributes"]["bucketName"] = cfg.scratch_bucket
    return template


def tutorial_cfg(**overrides: str):
    return parse_stack_config({**TUTORIAL_CONFIG, **overrides}, project="my-gcp-project", stack="vllm-70b")


def leader_template(cfg) -> dict:
    lws = manifests.leader_worker_set(cfg, plan_deployment(cfg)).to_dict()
    template = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    (container,) = template["spec"]["containers"]
    container["args"] = _args_by_flag(container["args"])
    return template


def test_the_leader_template_is_the_tutorials_pod_with_the_listed_differences():
    cfg = tutorial_cfg()
    tutorial = tutorial_documents()["Deployment"]["spec"]["template"]
    assert leader_template(cfg) == apply_tutorial_differences(tutorial, cfg)


def test_the_differences_are_real():
    """Guard the guard: the tutorial's pod as it is does not match, and a changed flag is caught."""
    cfg = tutorial_cfg()
    tutorial = tutorial_documents()["Deployment"]["spec"]["template"]
    ours = leader_template(cfg)
    assert ours != tutorial
    assert leader_template(tutorial_cfg(maxTargetLength="8192")) != apply_tutorial_differences(tutorial, cfg)


def test_the_tutorials_autoscaling_is_ours():
    tutorial = tutorial_documents()
    cfg = tutorial_cfg(maxReplicas="2")
    pod_monitoring, hpa = manifests.scaling_manifests(cfg)
    (theirs,), (ours,) = tutorial["HorizontalPodAutoscaler"]["spec"]["metrics"], hpa["spec"]["metrics"]
    assert (
        ours["pods"]["metric"] == theirs["pods"]["metric"]
    )  # prometheus.googleapis.com|vllm:num_requests_waiting|gauge
    assert ours["pods"]["target"] == {
        **theirs["pods"]["target"],
        "averageValue": str(theirs["pods"]["target"]["averageValue"]),
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 2)
    assert pod_monitoring["spec"]["endpoints"] == tutorial["PodMonitoring"]["spec"]["endpoints"]
    latency = tutorial_cfg(maxReplicas="2", autoscalingMetric="slots-used")
    assert manifests.scaling_manifests(latency)[1]["spec"]["metrics"][0]["pods"]["metric"]["name"] == (
        "prometheus.googleapis.com|vllm:kv_cache_usage_perc|gauge"
    )


def test_the_service_serves_http_and_the_openai_api_only():
    tutorial = tutorial_documents()["Service"]
    cfg = tutorial_cfg()
    service = manifests.service(cfg).to_dict()
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (
        tutorial["spec"]["ports"][0]["port"],
        tutorial["spec"]["ports"][0]["targetPort"],
    )
    assert service["spec"]["selector"] == tutorial["spec"]["selector"]
    endpoints = manifests.client_endpoints(
        "vllm-service.ns.svc.cluster.local", {port["name"]: port["port"]}, openai=cfg.runtime.serves_openai
    )
    assert endpoints == {
        "httpUrl": "http://vllm-service.ns.svc.cluster.local:8000",
        "grpcTarget": "",
        "openaiBaseUrl": "http://vllm-service.ns.svc.cluster.local:8000/v1",
    }


# ---------------------------------------------------------------------------------------------
# Weights from a gs:// directory.


@pytest.mark.parametrize(
    "path, directory", [("gs://my-weights/llama/3.1-70b/hf", "llama/3.1-70b/hf"), ("gs://my-weights", "")]
)
def test_a_gs_checkpoint_is_mounted_read_only_and_served_under_the_presets_name(path, directory):
    cfg = tutorial_cfg(checkpointPath=path, hfTokenSecret="")
    template = leader_template(cfg)
    (container,) = template["spec"]["containers"]
    assert (
        container["args"]["model"] == "/models" and container["args"]["served-model-name"] == "meta-llama/Llama-3.1-70B"
    )
    assert {"name": "checkpoint", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert [item["name"] for item in container["env"]] == [
        "POD_NAME",
        "VLLM_XLA_CACHE_PATH",
    ]  # no token without hfTokenSecret
    (volume,) = [volume for volume in template["spec"]["volumes"] if volume["name"] == "checkpoint"]
    attributes = volume["csi"]["volumeAttributes"]
    assert volume["csi"]["readOnly"] is True and attributes["bucketName"] == "my-weights"
    assert attributes["mountOptions"].startswith(gcs_fuse.MOUNT_OPTIONS)
    assert attributes["mountOptions"].endswith(f",only-dir={directory}") == bool(directory)
    assert cfg.checkpoint_bucket == "my-weights"


def test_weights_from_the_hub_are_read_from_the_scratch_bucket_they_are_downloaded_into():
    cfg = tutorial_cfg()
    assert cfg.checkpoint_bucket == cfg.scratch_bucket  # the serving identity's read grant


def test_a_hub_variant_of_the_preset_is_served_under_its_own_name():
    cfg = tutorial_cfg(checkpointPath="hf://meta-llama/Llama-3.1-70B-Instruct")
    args = leader_template(cfg)["spec"]["containers"][0]["args"]
    assert args["model"] == args["served-model-name"] == "meta-llama/Llama-3.1-70B-Instruct"
    assert '"model": "meta-llama/Llama-3.1-70B-Instruct"' in manifests.curl_example(cfg)


# ---------------------------------------------------------------------------------------------
# Refusals.

REFUSALS = {
    "multi-host 2x4": ({"tpuMachineType": ""}, {"topology", "tpuMachineType", "serverRuntime"}),
    "multi-host 4x4": ({"topology": "4x4", "tpuMachineType": ""}, {"topology", "serverRuntime"}),
    "int8": ({"quantization": "int8"}, {"quantization", "serverRuntime"}),
    "int8 kv cache": ({"quantizeKvCache": "true"}, {"quantizeKvCache", "serverRuntime"}),
    "disaggregated": ({"mode": "disaggregated"}, {"mode", "serverRuntime"}),
    "bad hub path": ({"checkpointPath": "hf://llama"}, {"checkpointPath"}),
    "other scheme": ({"checkpointPath": "s3://bucket/llama"}, {"checkpointPath"}),
    "bad secret id": ({"hfTokenSecret": "projects/p/secrets/x"}, {"hfTokenSecret"}),
    "planned flag": ({"serverFlags": json.dumps({"max_model_len": "8"})}, {"serverFlags", "maxTargetLength"}),
    "port flag": ({"serverFlags": json.dumps({"port": "9000"})}, {"serverFlags", "serverRuntime"}),
    "bundled key": ({"bundledServerImage": "registry.example/server:1.0"}, {"bundledServerImage", "serverRuntime"}),
    "unpinned image": ({"vllmImage": "docker.io/vllm/vllm-tpu:latest"}, {"vllmImage"}),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_vllm_cannot_serve_is_refused_naming_the_keys(case):
    overrides, keys = REFUSALS[case]
    with pytest.raises(ConfigError) as refused:
        tutorial_cfg(**overrides)
    assert keys <= set(refused.value.keys), refused.value


def test_multi_host_refusal_names_the_runtimes_that_serve_it():
    with pytest.raises(ConfigError) as refused:
        tutorial_cfg(tpuMachineType="")
    assert "serverRuntime=jetstream or serverRuntime=bundled" in refused.value.suggestion
    assert "ct6e-standard-8t" in refused.value.suggestion


def test_vllm_keys_are_refused_by_the_other_runtimes():
    raw = {
        "model": "llama3.1-8b",
        "topology": "2x2",
        "checkpointPath": "gs://test-checkpoints/m/0/items",
        "hfTokenSecret": "hf-token",
    }
    with pytest.raises(ConfigError) as refused:
        parse_stack_config(raw, project="p", stack="s")
    assert refused.value.keys == ("hfTokenSecret", "serverRuntime") and "serverRuntime=vllm" in refused.value.problem


# ---------------------------------------------------------------------------------------------
# The planner.


def test_the_planner_sizes_weights_and_the_paged_cache_within_vllms_memory_fraction():
    cfg = tutorial_cfg()
    plan = plan_deployment(cfg)
    usable = 32 * 0.9
    weights = 70.55e9 * 2 / 8 / GIB
    assert plan.parallelism.tensor == 8 and plan.weights_gib_per_chip == pytest.approx(weights)
    # 128 sequences of 4096 tokens would need 20 GiB per chip: vLLM's cache takes what the weights leave.
    assert plan.kv_cache_gib_per_chip == pytest.approx(usable - weights) and plan.needed_gib_per_chip == pytest.approx(
        usable
    )
    small = plan_deployment(tutorial_cfg(perDeviceBatchSize="1"))  # 8 sequences: the full batch fits
    assert small.kv_cache_gib_per_chip == pytest.approx(8 * 4096 * 80 * 2 * 1 * 128 * 2 / GIB)
    assert f"--gpu-memory-utilization={0.8:g}" in vllm.server_args(tutorial_cfg(hbmReservePercent="20"))


@pytest.mark.parametrize(
    "overrides, keys",
    [
        ({"model": "llama3.1-405b"}, ("model", "topology", "quantization")),
        ({"maxTargetLength": "1000000"}, ("topology", "perDeviceBatchSize", "maxTargetLength")),
        (
            {"tensorParallelism": "4", "autoregressiveParallelism": "2"},
            ("tensorParallelism", "autoregressiveParallelism", "fsdpParallelism", "topology"),
        ),
    ],
)
def test_what_does_not_fit_or_shard_is_refused(overrides, keys):
    with pytest.raises(ConfigError) as refused:
        plan_deployment(tutorial_cfg(**overrides))
    assert refused.value.keys == keys
    assert "int8" not in refused.value.suggestion  # vLLM serves bf16 only: not a way out here


# ---------------------------------------------------------------------------------------------
# The example stack: scheduling, environments and the program (tests/policy runs the pack over it).


def test_the_example_stack_can_be_scheduled_at_its_maximum_replicas():
    cfg, plan = example("llama3-8b-vllm")
    assert (cfg.runtime.name, cfg.scaling.replicas, cfg.scaling.max_replicas, cfg.tpu_slice.topology) == (
        "vllm",
        1,
        3,
        "2x4",
    )
    placement = scheduling.check_deployment(cfg, plan)
    assert sorted(placement) == ["vllm-tpu-0", "vllm-tpu-1", "vllm-tpu-2"]
    assert len(set(placement.values())) == 3  # a v6e-8 host each


def test_a_serving_stack_runs_vllm_on_its_platforms_cluster(tmp_path):
    raw, project = read_stack_file(ROOT / "Pulumi.llama3-8b-vllm.yaml")
    serving = {**raw, "role": "serving", "clusterStack": "my-org/jetstream-tpu/platform", "deletionProtection": "true"}
    (tmp_path / "Pulumi.vllm-dev.yaml").write_text(
        yaml.safe_dump(
            {"config": {"gcp:project": project, **{f"jetstream-tpu:{key}": value for key, value in serving.items()}}}
        )
    )
    text = render("vllm-dev", tmp_path)
    kinds = [document["kind"] for document in yaml.safe_load_all(text.split("\n---\n", 1)[1])]
    assert kinds == [
        "Namespace",
        "ServiceAccount",
        "LeaderWorkerSet",
        "Service",
        "PodMonitoring",
        "HorizontalPodAutoscaler",
    ]
    assert "my-org/jetstream-tpu/platform" in text and "vllm-tpu-hf-token" in text


@pytest.fixture(scope="module")
def recording():
    return run_stack(stack_file_config("llama3-8b-vllm"), "llama3-8b-vllm")


def test_the_program_makes_the_token_secret_from_secret_manager_before_the_workload(recording):
    assert (
        "gcp:secretmanager/getSecretVersion:getSecretVersion",
        {"project": "my-gcp-project", "secret": "hf-token"},
    ) in recording.calls
    secret = recording.one("kubernetes:core/v1:Secret")
    assert secret.inputs["metadata"] == {"name": "vllm-tpu-hf-token", "namespace": "llama3-8b-vllm"}
    assert secret.inputs["stringData"]["value"] == {"hf_api_token": HF_TOKEN}  # wrapped: a Pulumi secret
    lws = recording.one("kubernetes:leaderworkerset.x-k8s.io/v1:LeaderWorkerSet")
    assert secret.urn in lws.dependencies
    assert HF_TOKEN not in json.dumps(lws.inputs)
    outputs = recording.outputs
    assert outputs["openaiBaseUrl"].endswith(":8000/v1") and outputs["grpcTarget"] == ""
    assert "/v1/completions" in outputs["curlExample"]


SINGLE_HOST = [row for row in tpu.SLICES if not row.multi_host]


@pytest.mark.parametrize("model", models.PRESETS)
@pytest.mark.parametrize("row", SINGLE_HOST, ids=lambda row: f"{row.topology}-{row.machine_type}")
def test_every_single_host_plan_vllm_accepts_can_be_scheduled(model, row):
    raw = {
        **TUTORIAL_CONFIG,
        "model": model,
        "topology": row.topology,
        "tpuMachineType": row.machine_type,
        "checkpointPath": f"hf://{models.PRESETS[model].hf_model_id}",
        "maxTargetLength": "2048",
        "perDeviceBatchSize": "4",
    }
    cfg = parse_stack_config(raw, project="my-gcp-project", stack="vllm")
    try:
        plan = plan_deployment(cfg)
    except ConfigError as refused:  # weights that do not fit one host: named, never a silent pass
        assert "model" in refused.keys and plan_weights_exceed(cfg), refused
        return
    assert len(scheduling.check_deployment(cfg, plan)) == 1


def plan_weights_exceed(cfg) -> bool:
    return cfg.model.params * 2 / cfg.tpu_slice.chips > cfg.tpu_slice.hbm_gib_per_chip * GIB * 0.9
