"""Stack configuration: the raw config values, parsed once into a frozen `StackConfig` (or `PlatformConfig`).

Pulumi hands config values over as strings (structured ones as JSON). `parse_stack_config` turns
them into typed values and refuses anything it cannot deploy with a `ConfigError` naming the key.
It has no Pulumi imports: `__main__.py` and the offline renderer (`components.render`) call the
same function. It collects every value first and then constructs the config; nothing is
mutated along the way.

The parts, one concern per module, each importing only those before it:
  config_keys.py     a key as Pulumi.yaml declares it, and the generic readers of a raw value;
  config_table.py    the key table (`CONFIG_KEYS`), its choices and sentinels;
  config_values.py   each key's value parsing and the cross-field checks of a stack that serves
                     and of its cluster; the cluster (`ClusterSettings`), the workload's names
                     (`ServiceNames`) and the TPU pools' capacity (`TpuCapacity`);
  config_runtime.py  the runtime choice: `serverRuntime` picks the `ServerRuntime`
                     (components/core/runtimes/) once, and the keys that depend on it, among them
                     the model server's own settings (`ServerSettings`);
  config_roles.py    the roles: which keys a role=all, platform or serving stack uses;
  naming.py          the names derived from the stack, and the rules of names;
  config_scaling.py, config_gateway.py   the keys of those features, parsed by their own modules.
`StackConfig.runtime` answers everything that differs between servers, and the runtime validates
the config it is given. `StackConfig` holds one sub-object per concern (`cluster`, `names`,
`server`, `tpu_capacity`, `scaling`, `gateway`); `PlatformConfig` shares its `ClusterSettings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from components.core import models, tpu
from components.core.autoscaling import Autoscaling
from components.core.config_gateway import parse_gateway
from components.core.config_roles import check_role_keys, parse_cluster_stack
from components.core.config_runtime import (
    ServerSettings,
    choose_runtime,
    parse_api_key_secret,
    parse_images,
    parse_server_settings,
)
from components.core.config_scaling import parse_autoscaling
from components.core.config_table import (
    MODES,
    PLATFORM,
    PROVISIONING,
    ROLES,
    SERVICE_TYPES,
    SERVING,
)
from components.core.config_values import (
    STARTUP_DELAY_RANGE,
    ClusterSettings,
    ServiceNames,
    TpuCapacity,
    boolean_of,
    bounded,
    check_unknown_keys,
    choice_of,
    parse_cluster,
    parse_model,
    parse_names,
    parse_scratch_bucket,
    parse_tpu_capacity,
    parse_tpu_slice,
    preset_integer,
    text_of,
)
from components.core.errors import ConfigError
from components.core.gateway import GatewaySettings
from components.core.naming import (
    DNS_LABEL_LIMIT,
    SERVICE_ACCOUNT_ID_LIMIT,
    node_service_account_id,
    stack_scoped_name,
)
from components.core.runtimes import ServerRuntime, bundled
from components.core.runtimes.gcs_fuse import GCS_SCHEME, bucket_and_directory
from components.core.server_secrets import secret_id


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlatformConfig:
    """A role=platform stack: the cluster and what every serving stack on it shares."""

    project: str
    stack: str
    cluster: ClusterSettings  # the cluster it creates: never existing (existingClusterName is refused)
    gateway: GatewaySettings  # enabled: the cluster-wide parts serving stacks' gateways need
    role: str = PLATFORM

    @property
    def node_service_account_id(self) -> str:
        return node_service_account_id(self.stack)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackConfig:
    """Every setting a stack that serves (role=all or serving) uses, typed and validated; presets already applied."""

    project: str  # GCP project id (gcp:project)
    stack: str
    role: str  # all | serving
    cluster_stack: str  # role=serving: the platform stack, <organization>/<project>/<stack>; "" otherwise
    service_type: str  # ClusterIP | InternalLoadBalancer
    model: models.ModelPreset
    tpu_slice: tpu.TpuSlice
    tpu_capacity: TpuCapacity  # tpuProvisioning and tpuReservation of the TPU pools
    mode: str
    server: ServerSettings  # the model server's own settings: checkpoint, quantization, lengths, batch, mesh, flags
    startup_probe_delay_seconds: int
    wait_for_ready: bool
    runtime: ServerRuntime  # serverRuntime, chosen once here: everything that differs between servers asks it
    images: Mapping[str, str]  # config key -> image, the runtime's image keys
    hf_token_secret: str  # Secret Manager secret of the Hugging Face token (serverRuntime=vllm); "" = none
    api_key_secret: str  # Secret Manager secret of the API key clients must send; "" = none
    names: ServiceNames  # appName, serviceName, namespace
    cluster: ClusterSettings  # role=serving: the platform's, so its name and location are "" (PlatformReference)
    scratch_bucket: str
    scaling: Autoscaling  # LWS replicas and the HPA's bounds, metric and target
    gateway: GatewaySettings  # GKE Inference Gateway in front of the replicas, or off

    @property
    def slice_roles(self) -> tuple[str, ...]:
        """One TPU slice (node pool) per role; disaggregated serving prefills and generates apart."""
        return ("prefill", "generate") if self.mode == "disaggregated" else ("serving",)

    @property
    def checkpoint_bucket(self) -> str:
        """The bucket the weights are read from: checkpointPath's, or for weights downloaded from the
        Hugging Face Hub (hf://) the scratch bucket they are downloaded into."""
        if not self.server.checkpoint_path.startswith(GCS_SCHEME):
            return self.scratch_bucket
        return bucket_and_directory(self.server.checkpoint_path)[0]

    @property
    def builds_server_image(self) -> bool:
        """The stack builds and pushes serving/Dockerfile (serverRuntime=bundled without an image)."""
        return self.runtime.builds_server_image(self.images)

    @property
    def scratch_location(self) -> str:
        return f"gs://{self.scratch_bucket}/tmp"

    @property
    def deployment_id(self) -> str:
        """The label value that ties this stack's pods to this stack's TPU node pools."""
        return stack_scoped_name("jetstream", self.stack, DNS_LABEL_LIMIT)

    @property
    def workload_service_account_id(self) -> str:
        """GSA the bundled server's pods act as through Workload Identity (6-30 characters)."""
        return stack_scoped_name("js-pods", self.stack, SERVICE_ACCOUNT_ID_LIMIT)

    @property
    def workload_service_account_email(self) -> str:
        """The workload GSA's email, as GCP derives it from the account id."""
        return f"{self.workload_service_account_id}@{self.project}.iam.gserviceaccount.com"

    @property
    def serving_role(self) -> bool:
        """On the cluster of another (platform) stack."""
        return self.role == SERVING

    @property
    def creates_cluster(self) -> bool:
        """role=all without existingClusterName: the stack owns its cluster, and so what is cluster-wide on it."""
        return not self.serving_role and not self.cluster.existing

    @property
    def installs_metrics_adapter(self) -> bool:
        """The custom metrics adapter is cluster-wide, so an autoscaled stack installs it only on a
        cluster it creates; a platform stack installs it for its serving stacks, and on an existing
        cluster it is its owner's (destroying a stack that installed it would break every
        custom-metrics HPA of the cluster)."""
        return self.scaling.enabled and self.creates_cluster

    @property
    def node_service_account_id(self) -> str:
        """The GSA this stack creates and its TPU pools run as (also in a serving stack: its own)."""
        return node_service_account_id(self.stack)

    @property
    def artifact_repository_id(self) -> str:
        return stack_scoped_name("jetstream", self.stack, DNS_LABEL_LIMIT)

    @property
    def bundled_image_repository(self) -> str:
        """Where a stack-built server image lives: <region>-docker.pkg.dev/<project>/<repo>/<name>."""
        return f"{self.cluster.region}-docker.pkg.dev/{self.project}/{self.artifact_repository_id}/{bundled.IMAGE_NAME}"

    @property
    def pods_use_workload_identity(self) -> bool:
        """The serving pods act as the workload GSA; Pathways pods act as the node service
        account instead, because their TPU pools run without Workload Identity (node_pools.py)."""
        return self.runtime.pods_use_workload_identity


def parse_stack_config(raw: Mapping[str, str], *, project: str | None, stack: str) -> StackConfig | PlatformConfig:
    """Typed, validated config from the project's raw string values (keys without namespace):
    a PlatformConfig for role=platform, else a StackConfig."""
    check_unknown_keys(raw)
    if not project:
        raise ConfigError("gcp:project", "the GCP project is not set", "pulumi config set gcp:project <project-id>")
    role = choice_of(raw, "role", ROLES)
    check_role_keys(raw, role)
    cluster_stack = parse_cluster_stack(raw, role, stack)
    cluster = parse_cluster(raw, stack, role)
    if role == PLATFORM:
        return PlatformConfig(
            project=project, stack=stack, cluster=cluster, gateway=parse_gateway(raw, server_runtime=None)
        )
    cfg = _stack_config(raw, project=project, stack=stack, role=role, cluster_stack=cluster_stack, cluster=cluster)
    cfg.runtime.validate(cfg)
    if cfg.scaling.enabled:
        cfg.runtime.metrics_endpoint(cfg)  # refuses a config that turns the metrics off
    return cfg


def _stack_config(
    raw: Mapping[str, str], *, project: str, stack: str, role: str, cluster_stack: str, cluster: ClusterSettings
) -> StackConfig:
    """A role=all or serving stack's config; the values are parsed in the order their errors surface."""
    preset, tpu_slice = parse_model(raw), parse_tpu_slice(raw)
    runtime = choose_runtime(raw)
    provisioning = choice_of(raw, "tpuProvisioning", PROVISIONING)
    names = parse_names(raw, stack)
    return StackConfig(
        project=project,
        stack=stack,
        role=role,
        cluster_stack=cluster_stack,
        service_type=choice_of(raw, "serviceType", SERVICE_TYPES),
        model=preset,
        tpu_slice=tpu_slice,
        mode=choice_of(raw, "mode", MODES),
        server=parse_server_settings(raw, preset, runtime),
        startup_probe_delay_seconds=bounded(
            "startupProbeDelaySeconds",
            preset_integer(raw, "startupProbeDelaySeconds", preset.startup_probe_delay_seconds),
            STARTUP_DELAY_RANGE,
        ),
        wait_for_ready=boolean_of(raw, "waitForReady"),
        runtime=runtime,
        images=parse_images(raw, runtime),
        hf_token_secret=secret_id(text_of(raw, "hfTokenSecret"), "hfTokenSecret"),
        api_key_secret=parse_api_key_secret(raw, runtime),
        names=names,
        tpu_capacity=parse_tpu_capacity(raw, provisioning),
        scratch_bucket=parse_scratch_bucket(raw, project, stack),
        scaling=parse_autoscaling(raw, runtime.scaling_metrics),
        gateway=parse_gateway(
            raw, server_runtime=runtime.name, creates_cluster=role != SERVING and not cluster.existing
        ),
        cluster=cluster,
    )
