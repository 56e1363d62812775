"""serverRuntime=vllm: vLLM's TPU backend on single-host slices, after GKE's vLLM-on-TPU tutorial.

The tutorial (GoogleCloudPlatform/kubernetes-engine-samples, ai-ml/vllm-tpu/vllm-llama3-70b.yaml,
vllm-hpa.yaml, vllm_pod_monitor.yaml) runs one Deployment pod per single-host slice:
`python3 -m vllm.entrypoints.openai.api_server` on port 8000 with every chip on the tensor axis,
weights downloaded from the Hugging Face Hub into a Cloud Storage bucket mounted at /data through
the Cloud Storage FUSE CSI driver (which also holds vLLM's XLA compilation cache), a token from a
Kubernetes Secret, and an HPA on `vllm:num_requests_waiting`. Here the same container is the
leader of a LeaderWorkerSet group of one pod (so replicas, exclusive slices, the Service and
autoscaling work as for the other runtimes), with these differences (docs/stack/runtimes.md
lists each with its reason):

  * weights: `checkpointPath` is `hf://<org>/<model>` (downloaded into the stack's scratch bucket,
    as the tutorial does) or a `gs://` directory holding a Hugging Face checkpoint, mounted
    read-only at /models;
  * the XLA cache is one directory per pod (`<scratch>/xla-cache/<pod name>`): LWS leader pods keep
    their names, so each replica reuses its own cache, and replicas never write one path;
  * probes on vLLM's /health, a startup probe from the preset's delay;
  * --max-num-seqs, --max-model-len and --gpu-memory-utilization come from the keys the planner
    checks (batch, maxTargetLength, hbmReservePercent), and --served-model-name is the Hub model's
    id (for weights in a bucket, the preset's) whatever the weights' path.

Multi-host slices are refused: vLLM spans hosts only through Ray, which this layout does not start.

Memory per chip (every chip on the tensor axis, bf16), as vLLM allocates it:
  usable/chip    = 32 GiB x --gpu-memory-utilization (= 1 - hbmReservePercent/100)
  weights/chip   = params x 2 / chips
  KV/sequence    = max-model-len x layers x 2 (K and V) x kv heads/chip x head_dim x 2
                   kv heads/chip = ceil(kv_heads / chips) (vLLM replicates KV heads past kv_heads)
  KV cache/chip  = vLLM's paged cache takes what the weights leave of usable/chip, but never more
                   than max-num-seqs sequences at max-model-len need; it must hold at least one
                   sequence at max-model-len, or vLLM refuses to start (and the planner refuses).
  Past that, vLLM queues or preempts sequences instead of running out of memory.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from components.core import lws_model as lws
from components.core import server_secrets
from components.core.autoscaling import MetricsEndpoint, ScalingMetric
from components.core.errors import ConfigError
from components.core.runtimes import gcs_fuse
from components.core.runtimes.base import MemoryPerChip, PodContent, PodLayout, ServerRuntime
from components.core.runtimes.containers import POD_NAME, PULL_POLICY, pod_name_env, port, server_probes, tpu_limits
from components.core.server_secrets import SecretEnv
from serving.protocol import HTTP_PORT, METRICS_PATH

if TYPE_CHECKING:
    from components.core.config import StackConfig
    from components.core.planner import Parallelism, Plan

# vLLM's TPU image (tpu-inference inside), pinned by release tag; the tutorial runs :latest.
DEFAULT_IMAGE = "docker.io/vllm/vllm-tpu:v0.27.0"
CONTAINER = "vllm-tpu"
COMMAND = ("python3", "-m", "vllm.entrypoints.openai.api_server")
HEALTH_PATH = "/health"
READINESS_PERIOD_SECONDS = 10  # the tutorial's readiness period
HF_SCHEME = "hf://"
_HF_MODEL = re.compile(r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The Hugging Face token: the tutorial's env var and Secret key; the stack makes the Secret from
# Secret Manager (hfTokenSecret, see server_secrets.py), so the token is never in the stack's config.
HF_TOKEN_ENV = "HUGGING_FACE_HUB_TOKEN"
HF_TOKEN_KEY = "hf_api_token"
XLA_CACHE_ENV = "VLLM_XLA_CACHE_PATH"

# Volumes: the scratch bucket at /data (downloads and the XLA cache, read-write), a gs://
# checkpoint at /models (read-only), and shared memory, as the tutorial mounts them.
DATA_DIR = "/data"
DATA_VOLUME = "gcs-fuse-csi-ephemeral"
DOWNLOAD_DIR = f"{DATA_DIR}/huggingface"
XLA_CACHE_DIR = f"{DATA_DIR}/xla-cache"
MODELS_DIR = "/models"
MODELS_VOLUME = "checkpoint"
SHM_VOLUME, SHM_DIR = "dshm", "/dev/shm"
BF16_BYTES = 2
GIB = 1 << 30

# serverFlags are vLLM flags written with '_' (vLLM's parser reads either); these come from keys.
PLANNED_FLAGS = {
    "model": "checkpointPath",
    "served_model_name": "model",
    "download_dir": "checkpointPath",
    "tensor_parallel_size": "topology",
    "max_model_len": "maxTargetLength",
    "max_num_seqs": "perDeviceBatchSize",
    "gpu_memory_utilization": "hbmReservePercent",
    "quantization": "quantization",
    "dtype": "quantization",
    "kv_cache_dtype": "quantizeKvCache",
    "host": "serverRuntime",
    "port": "serverRuntime",
}

# vLLM's gauges under the names autoscalingMetric already uses for JetStream's.
METRICS = {
    metric.name: metric
    for metric in (
        ScalingMetric(
            name="prefill-backlog",
            prometheus_name="vllm:num_requests_waiting",
            meaning="requests waiting to be scheduled, averaged over the replicas' leaders",
            default_target=10.0,  # the tutorial's HPA target
        ),
        ScalingMetric(
            name="slots-used",
            prometheus_name="vllm:kv_cache_usage_perc",
            # The tutorial's alternative for latency-sensitive serving: scale before the cache fills.
            meaning="the fraction (0..1) of the KV cache in use, averaged over the replicas' leaders",
            default_target=0.8,
            ceiling=1.0,
        ),
    )
}


def memory_fraction(cfg: StackConfig) -> float:
    """vLLM's --gpu-memory-utilization: the HBM the planner lets it use."""
    return round(1 - cfg.server.hbm_reserve_percent / 100, 2)


def _weights_from_hub(cfg: StackConfig) -> bool:
    return cfg.server.checkpoint_path.startswith(HF_SCHEME)


def served_model_name(cfg: StackConfig) -> str:
    """The name clients ask for: the Hub model downloaded, or the preset's Hub id for weights in a bucket."""
    return _model_arg(cfg) if _weights_from_hub(cfg) else cfg.model.hf_model_id


def _model_arg(cfg: StackConfig) -> str:
    return cfg.server.checkpoint_path.removeprefix(HF_SCHEME) if _weights_from_hub(cfg) else MODELS_DIR


def server_args(cfg: StackConfig) -> tuple[str, ...]:
    """The tutorial's arguments in its order, then ours, then serverFlags."""
    args = {
        "host": "0.0.0.0",
        "port": str(HTTP_PORT),
        "tensor-parallel-size": str(cfg.tpu_slice.chips),
        "max-model-len": str(cfg.server.max_target_length),
        "model": _model_arg(cfg),
        "download-dir": DOWNLOAD_DIR,
        "max-num-seqs": str(cfg.server.per_device_batch_size * cfg.tpu_slice.chips),
        "served-model-name": served_model_name(cfg),
        "gpu-memory-utilization": f"{memory_fraction(cfg):g}",
        **{flag.replace("_", "-"): value for flag, value in cfg.server.flags.items()},
    }
    return tuple(f"--{flag}={value}" for flag, value in args.items())


def _env(cfg: StackConfig) -> tuple[lws.EnvVar, ...]:
    secrets = server_secrets.env_vars(cfg.runtime.secret_envs(cfg))
    # One cache per pod: LWS leader pods keep their names (<lws>-<group>) across restarts.
    cache = lws.EnvVar(name=XLA_CACHE_ENV, value=f"{XLA_CACHE_DIR}/{POD_NAME}")
    return (*secrets, pod_name_env(), cache)


def _mounts(cfg: StackConfig) -> tuple[lws.VolumeMount, ...]:
    checkpoint = (
        () if _weights_from_hub(cfg) else (lws.VolumeMount(name=MODELS_VOLUME, mount_path=MODELS_DIR, read_only=True),)
    )
    return (
        lws.VolumeMount(name=DATA_VOLUME, mount_path=DATA_DIR),
        *checkpoint,
        lws.VolumeMount(name=SHM_VOLUME, mount_path=SHM_DIR),
    )


def server(cfg: StackConfig) -> lws.Container:
    return lws.Container(
        name=CONTAINER,
        image=cfg.images["vllmImage"],
        command=COMMAND,
        args=server_args(cfg),
        env=_env(cfg),
        image_pull_policy=PULL_POLICY,
        ports=port(HTTP_PORT, "http"),
        resources=tpu_limits(cfg),
        volume_mounts=_mounts(cfg),
        **server_probes(cfg, HEALTH_PATH, readiness_period=READINESS_PERIOD_SECONDS),
    )


def _volumes(cfg: StackConfig) -> tuple[lws.Volume, ...]:
    checkpoint = ()
    if not _weights_from_hub(cfg):
        bucket, directory = gcs_fuse.bucket_and_directory(cfg.server.checkpoint_path)
        checkpoint = (gcs_fuse.bucket_volume(MODELS_VOLUME, bucket, directory, read_only=True),)
    shm = lws.Volume(name=SHM_VOLUME, empty_dir=lws.EmptyDirVolumeSource(medium="Memory"))
    return (gcs_fuse.cache_volume(), shm, gcs_fuse.bucket_volume(DATA_VOLUME, cfg.scratch_bucket), *checkpoint)


# ---------------------------------------------------------------------------------------------
# Validation.


def _refuse_multi_host(cfg: StackConfig) -> None:
    if cfg.tpu_slice.multi_host:
        raise ConfigError(
            ("topology", "tpuMachineType", "serverRuntime"),
            f"serverRuntime=vllm serves single-host slices only; topology {cfg.tpu_slice.topology} on "
            f"{cfg.tpu_slice.machine_type} is {cfg.tpu_slice.hosts} hosts (vLLM spans hosts only through Ray, "
            "which this layout does not start)",
            "serverRuntime=jetstream or serverRuntime=bundled serve multi-host slices; or a single-host slice: "
            "topology 1x1, 2x2, or 2x4 with tpuMachineType=ct6e-standard-8t",
        )


def _refuse_unsupported(cfg: StackConfig) -> None:
    if cfg.mode == "disaggregated":
        raise ConfigError(
            ("mode", "serverRuntime"),
            "serverRuntime=vllm serves one slice (mode=interleaved)",
            "use serverRuntime=jetstream for disaggregated serving, or mode=interleaved",
        )
    if cfg.server.quantization != "bf16":
        raise ConfigError(
            ("quantization", "serverRuntime"),
            "serverRuntime=vllm serves the checkpoint's bf16 weights, and the planner sizes them so; "
            f"quantization={cfg.server.quantization}",
            "pulumi config set quantization bf16",
        )
    if cfg.server.quantize_kv_cache:
        raise ConfigError(
            ("quantizeKvCache", "serverRuntime"),
            "serverRuntime=vllm keeps its KV cache in bf16, as the planner sizes it",
            "pulumi config set quantizeKvCache false",
        )


def _check_checkpoint(cfg: StackConfig) -> None:
    if _weights_from_hub(cfg) and not _HF_MODEL.match(cfg.server.checkpoint_path):
        raise ConfigError(
            "checkpointPath",
            f"{cfg.server.checkpoint_path!r} is not hf://<organization>/<model>",
            f"pulumi config set checkpointPath hf://{cfg.model.hf_model_id}",
        )


class VllmRuntime(ServerRuntime):
    name = "vllm"
    image_keys = ("vllmImage",)
    other_keys = ("hfTokenSecret",)
    planned_flags = PLANNED_FLAGS
    checkpoint_schemes = (gcs_fuse.GCS_SCHEME, HF_SCHEME)
    pods_use_workload_identity = True  # the Cloud Storage FUSE CSI driver mounts buckets as the pod's identity
    serves_grpc = False
    serves_openai = True
    api_key_env = "VLLM_API_KEY"  # vLLM's api_server checks it when --api-key is not given
    health_path = HEALTH_PATH
    scaling_metrics = METRICS

    def validate(self, cfg: StackConfig) -> None:
        _refuse_multi_host(cfg)
        _refuse_unsupported(cfg)
        _check_checkpoint(cfg)

    def secret_envs(self, cfg: StackConfig) -> tuple[SecretEnv, ...]:
        token = ()
        if cfg.hf_token_secret:
            token = (
                SecretEnv(
                    env=HF_TOKEN_ENV,
                    config_key="hfTokenSecret",
                    secret_id=cfg.hf_token_secret,
                    name=f"{cfg.names.app_name}-hf-token",
                    data_key=HF_TOKEN_KEY,
                ),
            )
        return (*token, *super().secret_envs(cfg))

    def pod_layout(self, cfg: StackConfig, plan: Plan, image: Any = None) -> PodLayout:
        pod = PodContent(containers=(server(cfg),), volumes=_volumes(cfg), annotations=gcs_fuse.ANNOTATIONS)
        # A group of one: the leader is the slice's only host, so the worker template is never used.
        return PodLayout(leader=pod, worker=pod, size=1)

    def memory_per_chip(self, cfg: StackConfig, parallelism: Parallelism) -> MemoryPerChip:
        model, chips = cfg.model, cfg.tpu_slice.chips
        weights = model.params * BF16_BYTES / chips
        per_token = model.layers * 2 * math.ceil(model.kv_heads / chips) * model.head_dim * BF16_BYTES  # K and V
        sequence = cfg.server.max_target_length * per_token
        usable = cfg.tpu_slice.hbm_gib_per_chip * GIB * memory_fraction(cfg)
        full_batch = sequence * cfg.server.per_device_batch_size * chips
        return MemoryPerChip(weights, min(full_batch, max(usable - weights, sequence)))

    def check_parallelism(self, cfg: StackConfig, parallelism: Parallelism) -> None:
        chips = cfg.tpu_slice.chips
        if parallelism.tensor != chips:
            raise ConfigError(
                ("tensorParallelism", "autoregressiveParallelism", "fsdpParallelism", "topology"),
                f"serverRuntime=vllm puts every chip on the tensor axis (--tensor-parallel-size={chips}), "
                f"but the plan has tensor {parallelism.tensor} (the {cfg.model.heads} attention heads of "
                f"{cfg.model.name} need a tensor axis that divides them)",
                "leave the parallelism keys unset, or pick a topology whose chip count divides the heads",
            )

    def fit_hints(self, cfg: StackConfig, parallelism: Parallelism) -> tuple[str, ...]:
        return ()  # bf16 only: no quantization to try

    def metrics_endpoint(self, cfg: StackConfig) -> MetricsEndpoint:
        return MetricsEndpoint(port=HTTP_PORT, path=METRICS_PATH)

    def example_request(self, cfg: StackConfig, http_port: int) -> str:
        body = json.dumps(
            {"model": served_model_name(cfg), "prompt": "What are the top 5 programming languages", "max_tokens": 200}
        )
        return f"curl -X POST localhost:{http_port}/v1/completions -H 'Content-type: application/json' -d '{body}'"
