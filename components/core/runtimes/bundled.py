"""serverRuntime=bundled: this repository's server (serving/), multi-controller JAX, no Pathways.

One pod per TPU host of the slice, the leader included (`size = hosts`), every pod running the
same `python -m serving ...` command with the host's chips. LWS gives each pod LWS_LEADER_ADDRESS,
LWS_GROUP_SIZE (= size = the number of server processes) and LWS_WORKER_INDEX, from which the
server joins `jax.distributed` at the leader on COORDINATOR_PORT (control channel on the next
port); process 0, the leader, serves HTTP and gRPC and carries the probes. Because the leader
requests TPUs, LWS also injects TPU_WORKER_HOSTNAMES / TPU_WORKER_ID with the leader as TPU worker
0 (into the first container requesting `google.com/tpu`, the server). The server reads the
checkpoint from the `checkpointPath` bucket, mounted read-only at /models through the Cloud Storage
FUSE CSI driver (`gcs_fuse.py`) as the pod's Workload Identity: a `.gguf` or `.npz` object (its
directory is mounted) or a directory holding a Hugging Face checkpoint. Nothing is copied to the
node's boot disk. The server runs the Llama architecture only (`SERVED_FAMILIES`).

Memory per chip (serving/engine):
  weights/chip   = embeddings and MLP over fsdp x tensor; attention over fsdp x tensor when the
                   KV heads divide the tensor axis, else over fsdp only (the server replicates
                   attention over tensor then); every weight is replicated over autoregressive.
                   Norms and int8 scales (< 0.5%) are not counted.
  KV cache/chip  = the cache [L, B, K, S, E] with B = per_device_batch_size x chips and S =
                   max_target_length rounded up to the server's KV block, divided per dimension
                   as the server splits it (`serving.engine.parallelism.kv_cache_split`), x 2
                   (K and V) x bytes/element: the `dtype` flag's size (bfloat16 = 2), or int8 plus
                   one float32 scale per (token, head). tests/contract checks this against the
                   server's own memory report.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from components.core import lws_model as lws
from components.core import server_secrets
from components.core.autoscaling import METRICS, MetricsEndpoint
from components.core.errors import ConfigError
from components.core.runtimes import gcs_fuse, maxtext
from components.core.runtimes.base import MemoryPerChip, PodContent, PodLayout, ServerRuntime
from components.core.runtimes.containers import (
    POD_NAME,
    PULL_POLICY,
    SERVER_CONTAINER,
    generate_request,
    pod_name_env,
    port,
    server_probes,
    tpu_limits,
)
from components.core.runtimes.pathways import WEIGHT_BYTES
from serving.engine.parallelism import kv_cache_split
from serving.protocol import (
    API_KEY_ENV,
    CONTROL_PORT,
    COORDINATOR_PORT,
    COORDINATOR_PORT_ENV,
    GRPC_PORT,
    HEALTH_PATH,
    HTTP_PORT,
    KV_BLOCK,
    METRICS_PATH,
)

if TYPE_CHECKING:
    from components.core.config import StackConfig
    from components.core.planner import Parallelism, Plan

CHECKPOINT_SUFFIXES = (".gguf", ".npz")  # the single-file formats the server's loaders read; else a directory
# Paths that are surely no checkpoint the server reads: a file of a Hugging Face checkpoint (the
# server reads its directory), or MaxText's Orbax layout (<run>/checkpoints/<step>/items).
_NOT_READ = re.compile(r"(\.(safetensors|bin|pt|pth|json)|/items)$")
_CHECKPOINT_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SERVED_FAMILIES = ("llama",)  # the architectures the server's model implements
# Without bundledServerImage the stack builds serving/Dockerfile into its own Artifact Registry
# repository under this name and tag, and the pods run it by digest.
IMAGE_NAME = "jetstream-jax"
IMAGE_TAG = "stack-build"
# The server serves HTTP itself, so it replaces both jax-tpu's JetStream command and the
# jetstream-http sidecar.
COMMAND = ("python", "-m", "serving", "--host", "0.0.0.0", "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT))
MODELS_DIR = "/models"
MODELS_VOLUME = "models"
# JAX's persistent compilation cache on the scratch bucket (read-write), one directory per pod: a
# restarted group loads its executables instead of compiling them, and LWS pods keep their names
# (<lws>-<group>[-<worker>]) across restarts; pods never write one directory at once.
JAX_CACHE_VOLUME = "jax-cache"
JAX_CACHE_DIR = "/jax-cache"
# The dtype the server computes and keeps its unquantized KV cache in; the planner counts its
# size (ACTIVATION_BYTES), so the stack always passes it.
DTYPE = "bfloat16"
ACTIVATION_BYTES = 2  # DTYPE's size: the unquantized KV cache's element
KV_SCALE_BYTES = 4  # int8 KV cache: one float32 scale per (token, kv head)


def _single_file(cfg: StackConfig) -> bool:
    return cfg.server.checkpoint_path.endswith(CHECKPOINT_SUFFIXES)


def local_checkpoint(cfg: StackConfig) -> str:
    """Where the server finds the checkpoint: the object in its mounted directory, or the directory."""
    return f"{MODELS_DIR}/{cfg.server.checkpoint_file}" if _single_file(cfg) else MODELS_DIR


def _checkpoint_volume(cfg: StackConfig) -> lws.Volume:
    """The checkpoint's directory (a single file's parent), read-only."""
    bucket, directory = gcs_fuse.bucket_and_directory(cfg.server.checkpoint_path)
    if _single_file(cfg):
        directory = directory.rpartition("/")[0]
    return gcs_fuse.bucket_volume(MODELS_VOLUME, bucket, directory, read_only=True)


def _memory_flags(cfg: StackConfig) -> dict[str, str]:
    """Every flag that decides the server's memory, stated rather than left to its defaults, so
    the planner's figures stay true when those defaults change."""
    int8 = cfg.server.quantization == "int8"
    # A .npz int8 checkpoint is the offline converter's output; GGUF tensors and a Hugging Face
    # checkpoint's are dequantized or read in bf16 on load and quantized to int8 by the server.
    return {
        "weight_dtype": DTYPE,
        "dtype": DTYPE,
        "quantization": "int8" if int8 else "",
        "checkpoint_is_quantized": "true" if int8 and cfg.server.checkpoint_path.endswith(".npz") else "false",
        "quantize_kvcache": "true" if cfg.server.quantize_kv_cache else "false",
    }


def server_args(cfg: StackConfig, axis_flags: Mapping[str, int]) -> tuple[str, ...]:
    # Multi-controller: one server process per TPU host, no Pathways.
    always = {
        "enable_single_controller": "false",
        "jax_cache_dir": f"{JAX_CACHE_DIR}/{POD_NAME}",
        **_memory_flags(cfg),
    }
    return maxtext.maxtext_args(cfg, axis_flags, load_path=local_checkpoint(cfg), always=always)


def server_image(cfg: StackConfig) -> str:
    """The configured image, or the tag the stack's own build pushes (`pulumi up` runs that build
    by digest instead, see resources/server_image.py)."""
    return cfg.images.get("bundledServerImage") or f"{cfg.bundled_image_repository}:{IMAGE_TAG}"


def command(cfg: StackConfig) -> tuple[str, ...]:
    """The server's command line; with apiKeySecret it checks the key from its environment."""
    return (*COMMAND, "--api-key-env", API_KEY_ENV) if cfg.api_key_secret else COMMAND


def server(cfg: StackConfig, plan: Plan, image: Any, leader: bool) -> lws.Container:
    """The server, one per TPU host.

    Every pod runs the same command line; only the leader (process 0) binds HTTP and gRPC, so
    only it declares those ports and carries the health probes. A worker whose leader is gone
    exits non-zero, and a leader that loses a worker fails its health check: either way LWS
    recreates the whole group.
    """
    front_ends = (*port(HTTP_PORT, "http"), *port(GRPC_PORT, "grpc")) if leader else ()
    return lws.Container(
        name=SERVER_CONTAINER,
        image=image,
        command=command(cfg),
        args=server_args(cfg, plan.axis_flags),
        env=(
            *server_secrets.env_vars(cfg.runtime.secret_envs(cfg)),
            lws.EnvVar(name=COORDINATOR_PORT_ENV, value=str(COORDINATOR_PORT)),
            pod_name_env(),
        ),
        image_pull_policy=PULL_POLICY,
        ports=(*front_ends, *port(COORDINATOR_PORT, "jax-coordinator"), *port(CONTROL_PORT, "jax-control")),
        resources=tpu_limits(cfg),
        volume_mounts=(
            lws.VolumeMount(name=MODELS_VOLUME, mount_path=MODELS_DIR, read_only=True),
            lws.VolumeMount(name=JAX_CACHE_VOLUME, mount_path=JAX_CACHE_DIR),
        ),
        **(server_probes(cfg, HEALTH_PATH) if leader else {}),
    )


def _pod(cfg: StackConfig, plan: Plan, image: Any, leader: bool) -> PodContent:
    return PodContent(
        containers=(server(cfg, plan, image, leader),),
        volumes=(
            gcs_fuse.cache_volume(),
            _checkpoint_volume(cfg),
            gcs_fuse.bucket_volume(JAX_CACHE_VOLUME, cfg.scratch_bucket, f"jax-cache/{cfg.deployment_id}"),
        ),
        annotations=gcs_fuse.ANNOTATIONS,
    )


# ---------------------------------------------------------------------------------------------
# Memory.


def weights_per_chip(cfg: StackConfig, parallelism: Parallelism) -> float:
    model = cfg.model
    sharded = parallelism.fsdp * parallelism.tensor
    attention_split = sharded if model.kv_heads % parallelism.tensor == 0 else parallelism.fsdp
    embeddings = model.vocab * model.d_model * (1 if model.tie_embeddings else 2)
    attention = model.layers * model.d_model * model.head_dim * (2 * model.heads + 2 * model.kv_heads)  # wq, wo, wk, wv
    mlp = model.layers * 3 * model.d_model * model.ffn_dim  # gate, up, down
    elements = (embeddings + mlp) / sharded + attention / attention_split
    return elements * WEIGHT_BYTES[cfg.server.quantization]


def kv_cache_per_chip(cfg: StackConfig, parallelism: Parallelism) -> float:
    model = cfg.model
    split = kv_cache_split(model.kv_heads, dataclasses.asdict(parallelism))
    slots = cfg.server.per_device_batch_size * cfg.tpu_slice.chips
    cache_length = math.ceil(cfg.server.max_target_length / KV_BLOCK) * KV_BLOCK
    bytes_per_element = 1 if cfg.server.quantize_kv_cache else ACTIVATION_BYTES
    scale_bytes = KV_SCALE_BYTES if cfg.server.quantize_kv_cache else 0
    tokens_per_chip = (
        math.ceil(slots / split.batch)
        * math.ceil(model.kv_heads / split.kv_heads)
        * math.ceil(cache_length / split.seq)
    )
    return model.layers * 2 * tokens_per_chip * (model.head_dim * bytes_per_element + scale_bytes)


# ---------------------------------------------------------------------------------------------
# Validation.


def _check_mode(cfg: StackConfig) -> None:
    if cfg.mode == "disaggregated":
        raise ConfigError(
            ("mode", "serverRuntime"),
            "serverRuntime=bundled cannot run mode=disaggregated: the bundled server splits one process group's "
            "devices in halves, which across two multi-host slices needs multi-slice (DCN) networking "
            "this layout does not set up",
            "use serverRuntime=jetstream for disaggregated serving, or mode=interleaved on a single slice",
        )


def _check_model(cfg: StackConfig) -> None:
    if cfg.model.family not in SERVED_FAMILIES:
        raise ConfigError(
            ("model", "serverRuntime"),
            f"serverRuntime=bundled runs the {', '.join(SERVED_FAMILIES)} architecture; "
            f"{cfg.model.name} is {cfg.model.family}",
            "serverRuntime=jetstream or serverRuntime=vllm serve it, or pick a Llama preset",
        )


def _check_checkpoint(cfg: StackConfig) -> None:
    name = cfg.server.checkpoint_file
    bad_file = _single_file(cfg) and (name == cfg.checkpoint_bucket or not _CHECKPOINT_FILE.match(name))
    if bad_file or _NOT_READ.search(cfg.server.checkpoint_path):
        raise ConfigError(
            ("checkpointPath", "serverRuntime"),
            f"serverRuntime=bundled reads one .gguf or .npz object, or a directory holding a Hugging Face "
            f"checkpoint; {cfg.server.checkpoint_path!r} is neither a gs:// URI of a .gguf or .npz object in a bucket "
            "(file name of letters, digits, '.', '_', '-') nor such a directory (a MaxText Orbax checkpoint "
            "ends in /items; a Hugging Face file's directory is the checkpoint)",
            "pulumi config set checkpointPath gs://my-bucket/models/llama3.1-8b-int8.npz, "
            "or gs://my-bucket/models/Llama-3.1-8B (a Hugging Face checkpoint directory)",
        )


def _check_multi_controller(cfg: StackConfig) -> None:
    single_controller = cfg.server.flags.get("enable_single_controller", "false").lower()
    if single_controller not in ("false", "0", "no"):
        raise ConfigError(
            ("serverFlags", "serverRuntime"),
            f"enable_single_controller={single_controller} needs Pathways, which serverRuntime=bundled does not deploy "
            "(one server process per TPU host, multi-controller JAX)",
            "remove enable_single_controller from serverFlags, or use serverRuntime=jetstream",
        )


class BundledRuntime(ServerRuntime):
    name = "bundled"
    image_keys = ("bundledServerImage",)
    built_image_key = "bundledServerImage"
    planned_flags = maxtext.PLANNED_FLAGS
    pods_use_workload_identity = True
    serves_grpc = True
    serves_openai = True
    api_key_env = API_KEY_ENV  # the server's --api-key, from its environment
    scaling_metrics = METRICS  # the server exports JetStream's gauges under the same names (serving/server/metrics.py)

    def validate(self, cfg: StackConfig) -> None:
        _check_model(cfg)
        _check_mode(cfg)
        _check_checkpoint(cfg)
        _check_multi_controller(cfg)

    def pod_layout(self, cfg: StackConfig, plan: Plan, image: Any = None) -> PodLayout:
        image = server_image(cfg) if image is None else image
        # The leader is a TPU host like the workers: one server process per host.
        return PodLayout(
            leader=_pod(cfg, plan, image, leader=True),
            worker=_pod(cfg, plan, image, leader=False),
            size=plan.slices * plan.hosts_per_slice,
        )

    def memory_per_chip(self, cfg: StackConfig, parallelism: Parallelism) -> MemoryPerChip:
        return MemoryPerChip(weights_per_chip(cfg, parallelism), kv_cache_per_chip(cfg, parallelism))

    def fit_hints(self, cfg: StackConfig, parallelism: Parallelism) -> tuple[str, ...]:
        if parallelism.autoregressive == 1:
            return super().fit_hints(cfg, parallelism)
        hint = (
            f"fsdpParallelism={parallelism.autoregressive * parallelism.fsdp} with autoregressiveParallelism=1 "
            "(the bundled server keeps a full weight copy per autoregressive shard)"
        )
        return (*super().fit_hints(cfg, parallelism), hint)

    def metrics_endpoint(self, cfg: StackConfig) -> MetricsEndpoint:
        return MetricsEndpoint(port=HTTP_PORT, path=METRICS_PATH)

    def example_request(self, cfg: StackConfig, http_port: int) -> str:
        return generate_request(http_port)
