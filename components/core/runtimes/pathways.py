"""serverRuntime=jetstream: JetStream + MaxText on Pathways, the reference YAMLs' layout.

The LeaderWorkerSet follows the reference YAMLs container for container: a leader pod with the
Pathways proxy, the Pathways resource manager, the JetStream/MaxText server (`jax-tpu`, single
controller) and the JetStream HTTP front end, and one Pathways worker per TPU host (`size =
hosts + 1`). The leader holds no TPU. The tests diff it against the reference YAMLs.

Identity: Google's tutorial "Serve LLMs using multi-host TPUs on GKE with JetStream and Pathways"
runs the TPU pools without Workload Identity, so these pods act as the node service account.

Memory per chip (MaxText):
  weights/chip   = params x bytes_per_weight / chips
                   MaxText shards every matmul weight over the fsdp, tensor and autoregressive
                   axes; int8 = 1 byte (per-channel scales < 0.1% are ignored), bf16 = 2 bytes.
  KV cache/chip  = sequences/chip x max_target_length x layers x 2 (K and V) x kv heads/chip x bytes/head
                   sequences/chip = per_device_batch_size x chips / (autoregressive x fsdp)
                   kv heads/chip  = kv_heads / gcd(tensor, kv_heads) (replicated past kv_heads)
                   bytes/head     = head_dim x 2 (bf16), or head_dim + 2 (int8 + a bf16 scale)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from components.core import lws_model as lws
from components.core.autoscaling import METRICS, MetricsEndpoint
from components.core.errors import ConfigError
from components.core.runtimes import maxtext
from components.core.runtimes.base import MemoryPerChip, PodContent, PodLayout, ServerRuntime
from components.core.runtimes.containers import (
    LEADER_ADDRESS,
    PULL_POLICY,
    SERVER_CONTAINER,
    generate_request,
    port,
    server_probes,
    tpu_limits,
)
from serving.protocol import DISAGGREGATED_SERVER, GRPC_PORT, HEALTH_PATH, HTTP_PORT

if TYPE_CHECKING:
    from components.core.config import StackConfig
    from components.core.planner import Parallelism, Plan

# Default images: the reference YAMLs' images, with the Pathways `latest` tags replaced by a pinned release.
DEFAULT_IMAGES = {
    "jetstreamImage": "us-docker.pkg.dev/cloud-tpu-images/inference/jetstream-pathways:v0.2.0",
    "jetstreamHttpImage": "us-docker.pkg.dev/cloud-tpu-images/inference/jetstream-http:v0.2.3",
    "pathwaysServerImage": "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/server:jax-0.5.3",
    "pathwaysProxyImage": "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/proxy_server:jax-0.5.3",
}
PROXY_PORT = 38681
RESOURCE_MANAGER_PORT = 38677
WORKER_PORT = 38679
WEIGHT_BYTES = {"int8": 1, "bf16": 2}
MAXTEXT_KV_SCALE_BYTES = 2  # MaxText's int8 KV cache: one bf16 scale per (token, kv head)

# The upstream JetStream server (MaxText's maxengine_server.py) starts its Prometheus server only
# when `prometheus_port` is non-zero (MaxText base.yml default 0); GKE's JetStream tutorials use 9090.
# It answers on every path; GKE's PodMonitoring for it scrapes "/".
PROMETHEUS_PORT_FLAG = "prometheus_port"
JETSTREAM_PROMETHEUS_PORT = 9090


def jetstream_server_flags(cfg: StackConfig) -> dict[str, str]:
    """MaxText flags the upstream server needs so the PodMonitoring has something to scrape; a
    `prometheus_port` in serverFlags overrides this value in place."""
    return {PROMETHEUS_PORT_FLAG: str(JETSTREAM_PROMETHEUS_PORT)} if cfg.scaling.enabled else {}


def _mode_flags(cfg: StackConfig) -> dict[str, str]:
    if cfg.mode == "disaggregated":
        return {
            "stack_prefill_result_cache": "True",
            "inference_server": DISAGGREGATED_SERVER,
            **cfg.model.disaggregated_flags,
        }
    # Interleaved serving on Pathways: one JAX controller drives every host of the slice.
    return {"enable_single_controller": "true"}


def server_args(cfg: StackConfig, axis_flags: Mapping[str, int]) -> tuple[str, ...]:
    always = {**_mode_flags(cfg), **jetstream_server_flags(cfg)}
    return maxtext.maxtext_args(cfg, axis_flags, load_path=cfg.server.checkpoint_path, always=always)


# ---------------------------------------------------------------------------------------------
# Containers.


def _scratch_arg(cfg: StackConfig) -> str:
    return f"--gcs_scratch_location={cfg.scratch_location}"


def pathways_proxy(cfg: StackConfig) -> lws.Container:
    return lws.Container(
        name="pathways-proxy",
        image=cfg.images["pathwaysProxyImage"],
        args=(
            f"--resource_manager_address={LEADER_ADDRESS}:{RESOURCE_MANAGER_PORT}",
            f"--server_port={PROXY_PORT}",
            _scratch_arg(cfg),
        ),
        image_pull_policy=PULL_POLICY,
        ports=port(PROXY_PORT),
    )


def pathways_resource_manager(cfg: StackConfig, plan: Plan) -> lws.Container:
    return lws.Container(
        name="pathways-rm",
        env=(
            lws.EnvVar(name="HOST_ADDRESS", value=LEADER_ADDRESS),
            lws.EnvVar(name="TPU_SKIP_MDS_QUERY", value="true"),
        ),
        image=cfg.images["pathwaysServerImage"],
        args=(
            f"--server_port={RESOURCE_MANAGER_PORT}",
            _scratch_arg(cfg),
            "--node_type=resource_manager",
            f"--instance_count={plan.slices}",  # one Pathways instance per slice
            f"--instance_type={cfg.tpu_slice.pathways_instance_type}",
            *cfg.model.resource_manager_flags,
        ),
        image_pull_policy=PULL_POLICY,
        ports=port(RESOURCE_MANAGER_PORT),
    )


def jax_server(cfg: StackConfig, plan: Plan) -> lws.Container:
    """JetStream/MaxText server on the Pathways leader."""
    disaggregated = cfg.mode == "disaggregated"
    # The reference's disaggregated server runs with these capabilities (KV transfer between slices).
    capabilities = lws.Capabilities(add=("SYS_PTRACE", "NET_ADMIN", "SYS_TIME"))
    return lws.Container(
        name=SERVER_CONTAINER,
        image=cfg.images["jetstreamImage"],
        args=server_args(cfg, plan.axis_flags),
        env=(lws.EnvVar(name="LOG_LEVEL", value="INFO"),) if disaggregated else None,
        image_pull_policy=PULL_POLICY,
        security_context=lws.SecurityContext(capabilities=capabilities) if disaggregated else None,
        ports=port(GRPC_PORT),
        **server_probes(cfg, HEALTH_PATH),
    )


def jetstream_http(cfg: StackConfig) -> lws.Container:
    return lws.Container(
        name="jetstream-http",
        image=cfg.images["jetstreamHttpImage"],
        image_pull_policy=PULL_POLICY,
        ports=port(HTTP_PORT),
    )


def pathways_worker(cfg: StackConfig) -> lws.Container:
    return lws.Container(
        name="worker",
        args=(
            f"--server_port={WORKER_PORT}",
            f"--resource_manager_address={LEADER_ADDRESS}:{RESOURCE_MANAGER_PORT}",
            _scratch_arg(cfg),
        ),
        image=cfg.images["pathwaysServerImage"],
        image_pull_policy=PULL_POLICY,
        ports=port(WORKER_PORT),
        resources=tpu_limits(cfg),
    )


# ---------------------------------------------------------------------------------------------
# Memory.


def maxtext_weights(cfg: StackConfig) -> float:
    return cfg.model.params * WEIGHT_BYTES[cfg.server.quantization] / cfg.tpu_slice.chips


def maxtext_kv(cfg: StackConfig, parallelism: Parallelism) -> float:
    model = cfg.model
    global_batch = cfg.server.per_device_batch_size * cfg.tpu_slice.chips
    sequences_per_chip = math.ceil(global_batch / (parallelism.autoregressive * parallelism.fsdp))
    kv_heads_per_chip = model.kv_heads // math.gcd(parallelism.tensor, model.kv_heads)
    bytes_per_head = model.head_dim + MAXTEXT_KV_SCALE_BYTES if cfg.server.quantize_kv_cache else model.head_dim * 2
    bytes_per_token = model.layers * 2 * kv_heads_per_chip * bytes_per_head
    return sequences_per_chip * cfg.server.max_target_length * bytes_per_token


class PathwaysRuntime(ServerRuntime):
    name = "jetstream"
    image_keys = tuple(DEFAULT_IMAGES)
    planned_flags = maxtext.PLANNED_FLAGS
    pods_use_workload_identity = False
    serves_grpc = True
    serves_openai = False  # jetstream-http serves /generate only
    scaling_metrics = METRICS

    def pod_layout(self, cfg: StackConfig, plan: Plan, image: Any = None) -> PodLayout:
        leader = (pathways_proxy(cfg), pathways_resource_manager(cfg, plan), jax_server(cfg, plan), jetstream_http(cfg))
        # Pathways adds a leader (no TPU) to the TPU hosts of every slice.
        return PodLayout(
            leader=PodContent(containers=leader),
            worker=PodContent(containers=(pathways_worker(cfg),)),
            size=cfg.tpu_slice.lws_size(plan.slices),
        )

    def memory_per_chip(self, cfg: StackConfig, parallelism: Parallelism) -> MemoryPerChip:
        return MemoryPerChip(maxtext_weights(cfg), maxtext_kv(cfg, parallelism))

    def metrics_endpoint(self, cfg: StackConfig) -> MetricsEndpoint:
        text = str(cfg.server.flags.get(PROMETHEUS_PORT_FLAG, JETSTREAM_PROMETHEUS_PORT))
        number = int(text) if text.isdigit() else 0
        if not 0 < number < 65536:
            raise ConfigError(
                ("serverFlags", "maxReplicas"),
                f"{PROMETHEUS_PORT_FLAG}={text} leaves JetStream's Prometheus server off, "
                "but autoscaling scales on its metrics",
                f"remove {PROMETHEUS_PORT_FLAG} from serverFlags (autoscaling sets {JETSTREAM_PROMETHEUS_PORT}), "
                "or set a port",
            )
        return MetricsEndpoint(port=number, path="/")

    def example_request(self, cfg: StackConfig, http_port: int) -> str:
        return generate_request(http_port)
