"""The runtime seam: what differs between the servers the stack can run on a TPU slice.

`serverRuntime` names one `ServerRuntime`; `parse_stack_config` picks it once and `StackConfig`
carries it (`cfg.runtime`). Everything else in the core (the LeaderWorkerSet, the Service, the
planner, autoscaling, the scheduling check) asks the runtime instead of branching on its name:

  validation of the config               `validate`, `planned_flags`, `checkpoint_schemes`
  the pods of one LWS group              `pod_layout` (leader and worker contents, the group size)
  the memory a plan needs per chip       `memory_per_chip`, `check_parallelism`, `fit_hints`
  metrics and autoscaling                `metrics_endpoint`, `scaling_metrics`
  what the Service exposes               `serves_grpc`, `serves_openai`, `example_request`
  secrets in the server's environment    `api_key_env`, `secret_envs`
  identity, images, checkpoint           `pods_use_workload_identity`, `image_keys`, `builds_server_image`

A runtime fills in the pods' containers, volumes and annotations; the placement every runtime
shares (node selector, tolerations, service account) is added in one place, `manifests.py`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from components.core import lws_model as lws
from components.core.autoscaling import MetricsEndpoint, ScalingMetric
from components.core.runtimes.gcs_fuse import GCS_SCHEME
from components.core.server_secrets import SecretEnv
from serving.protocol import HEALTH_PATH

if TYPE_CHECKING:  # the config and the planner import this module; these names are types only
    from components.core.config import StackConfig
    from components.core.planner import Parallelism, Plan


@dataclasses.dataclass(frozen=True)
class MemoryPerChip:
    weights_bytes: float
    kv_cache_bytes: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodContent:
    """What a runtime puts in one pod template; `manifests.py` places it on the stack's TPU nodes."""

    containers: tuple[lws.Container, ...]
    init_containers: tuple[lws.Container, ...] | None = None
    volumes: tuple[lws.Volume, ...] | None = None
    annotations: Mapping[str, str] | None = None  # pod template annotations (e.g. the GCS FUSE sidecar's)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodLayout:
    """One LeaderWorkerSet group: the leader's and the workers' pods, and how many pods in all."""

    leader: PodContent
    worker: PodContent
    size: int


class ServerRuntime(abc.ABC):
    """One server runtime; stateless, one instance per runtime (`runtimes.RUNTIMES`)."""

    name: ClassVar[str]  # the serverRuntime value
    image_keys: ClassVar[tuple[str, ...]]  # the image config keys it runs (each pinned, `config_runtime.parse_images`)
    built_image_key: ClassVar[str | None] = None  # the image key that, left empty, has the stack build the image
    other_keys: ClassVar[tuple[str, ...]] = ()  # further config keys only this runtime reads
    planned_flags: ClassVar[Mapping[str, str]]  # serverFlags it derives from a config key -> that key
    checkpoint_schemes: ClassVar[tuple[str, ...]] = (GCS_SCHEME,)  # what checkpointPath may start with
    pods_use_workload_identity: ClassVar[bool]  # pods act as the workload GSA (else as the node's)
    serves_grpc: ClassVar[bool]  # JetStream's gRPC Orchestrator service on ports.GRPC_PORT
    serves_openai: ClassVar[bool]  # the OpenAI API under /v1 on the HTTP port
    api_key_env: ClassVar[str | None] = None  # where the server reads the key clients must send; None: it has none
    health_path: ClassVar[str] = (
        HEALTH_PATH  # the leader's readiness path on the HTTP port (load balancer health checks)
    )
    scaling_metrics: ClassVar[Mapping[str, ScalingMetric]]  # autoscalingMetric value -> its gauge

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys only this runtime reads: another runtime's stack refuses them."""
        return (*self.image_keys, *self.other_keys)

    def validate(self, cfg: StackConfig) -> None:  # noqa: B027 (a hook: by default every config is servable)
        """ConfigError for a config this runtime cannot serve (after the keys parsed one by one)."""

    def secret_envs(self, cfg: StackConfig) -> tuple[SecretEnv, ...]:
        """The server's environment from Secret Manager (apiKeySecret, where the server checks a key)."""
        if not cfg.api_key_secret:
            return ()
        return (
            SecretEnv(
                env=self.api_key_env,
                config_key="apiKeySecret",
                secret_id=cfg.api_key_secret,
                name=f"{cfg.names.app_name}-api-key",
                data_key="api-key",
            ),
        )

    @abc.abstractmethod
    def pod_layout(self, cfg: StackConfig, plan: Plan, image: Any = None) -> PodLayout:
        """The group's pods; `image` replaces the server image (the stack's own build, an Output)."""

    @abc.abstractmethod
    def memory_per_chip(self, cfg: StackConfig, parallelism: Parallelism) -> MemoryPerChip:
        """HBM one chip holds, as this runtime lays the weights and the KV cache out."""

    def check_parallelism(self, cfg: StackConfig, parallelism: Parallelism) -> None:  # noqa: B027 (a hook)
        """ConfigError for mesh axes this runtime cannot use."""

    def fit_hints(self, cfg: StackConfig, parallelism: Parallelism) -> tuple[str, ...]:
        """This runtime's ways out of a plan that does not fit (the planner adds batch, length and topology)."""
        return ("quantization=int8",) if cfg.server.quantization == "bf16" else ()

    @abc.abstractmethod
    def metrics_endpoint(self, cfg: StackConfig) -> MetricsEndpoint:
        """Where the leaders serve the gauges the HPA scales on; ConfigError if the config turned them off."""

    def builds_server_image(self, images: Mapping[str, str]) -> bool:
        """Whether the stack builds the server image itself (serving/Dockerfile)."""
        return self.built_image_key is not None and not images.get(self.built_image_key)

    @abc.abstractmethod
    def example_request(self, cfg: StackConfig, http_port: int) -> str:
        """A first request, as a curl command against localhost:<http_port>."""
