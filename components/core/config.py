"""Stack configuration: one table of keys, parsed once into a frozen `StackConfig`.

Pulumi hands config values over as strings (structured ones as JSON). `parse_stack_config` turns
them into typed values and refuses anything it cannot deploy with a `ConfigError` naming the key.
It has no Pulumi imports: `__main__.py` and the offline renderer (`components.render`) call the
same function, and `Pulumi.yaml`'s `config:` schema is checked against `CONFIG_KEYS` in the tests.

Pulumi applies a key's schema default before the program runs, and a key declared without one is
required, so "take it from somewhere else" needs a sentinel default: integer keys use 0 for "the
model preset's value", name keys use "" for "derived from the stack name" (`stack_scoped_name`).
For the same reason a key counts as set only when its value differs from its default.

Roles (`role`): `all` is one stack with the cluster and the model server; `platform` owns the
cluster, its system pool, the node service account and the cluster-wide controllers, and exports
`PLATFORM_OUTPUTS`; `serving` puts its TPU pools and model server on the cluster of the platform
stack named by `clusterStack`. `parse_stack_config` returns a `PlatformConfig` for a platform
stack and a `StackConfig` otherwise, and refuses a key the role does not use (`_check_role_keys`).

Runtimes (`serverRuntime`): `parse_stack_config` picks the `ServerRuntime` (components/core/runtimes/)
once; `StackConfig.runtime` answers everything that differs between servers, and the runtime
validates the config it is given. Names derived from the stack are in `naming.py`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Mapping

from components.core import config_scaling, gateway, models, tpu
from components.core.autoscaling import Autoscaling
from components.core.config_keys import ConfigKey, closest, is_set, read_choice, read_integer, read_text
from components.core.config_scaling import parse_autoscaling
from components.core.errors import ConfigError
from components.core.gateway import GatewaySettings, parse_gateway
from components.core.naming import (
    BUCKET_NAME_LIMIT,
    CLUSTER_NAME_LIMIT,
    DNS_LABEL_LIMIT,
    SERVICE_ACCOUNT_ID_LIMIT,
    node_service_account_id,
    region_of,
    stack_scoped_name,
)
from components.core.runtimes import RUNTIMES, ServerRuntime, bundled
from components.core.runtimes.gcs_fuse import GCS_SCHEME, bucket_and_directory
from components.core.runtimes.pathways import DEFAULT_IMAGES
from components.core.runtimes.vllm import DEFAULT_IMAGE as DEFAULT_VLLM_IMAGE
from components.core.server_secrets import secret_id

PROJECT = "jetstream-tpu"  # Pulumi project name: stack files namespace keys as jetstream-tpu:<key>
MODES = ("interleaved", "disaggregated")
QUANTIZATIONS = ("int8", "bf16")
PROVISIONING = ("on-demand", "spot", "reservation")
RELEASE_CHANNELS = ("UNSPECIFIED", "RAPID", "REGULAR", "STABLE", "EXTENDED")
SERVER_RUNTIMES = tuple(RUNTIMES)
LWS_AUTO, LWS_ALWAYS, LWS_NEVER = "auto", "always", "never"
LWS_INSTALLS = (LWS_AUTO, LWS_ALWAYS, LWS_NEVER)
ROLES = ("all", "platform", "serving")
PLATFORM, SERVING = "platform", "serving"
SERVICE_TYPES = ("ClusterIP", "InternalLoadBalancer")
INTERNAL_LOAD_BALANCER = "InternalLoadBalancer"
# What a platform stack exports, exactly, and a serving stack reads through a StackReference.
PLATFORM_OUTPUTS = ("clusterName", "clusterLocation", "project", "kubeconfig")
# Keys a serving stack cannot do without (Pulumi.yaml gives them "" so a platform stack needs none).
REQUIRED_TO_SERVE = ("model", "topology", "checkpointPath")
PRESET_DEFAULT = 0  # integer sentinel: take the value from the model preset
DERIVED = ""  # name sentinel: derive the name from the stack (`stack_scoped_name`)
AXIS_KEYS = {"fsdp": "fsdpParallelism", "autoregressive": "autoregressiveParallelism", "tensor": "tensorParallelism"}

# Bounds of integer keys: sanity limits that turn a typo into a preview error; whether a value
# fits the hardware is the planner's job.
BATCH_RANGE = (1, 4096)  # sequences per chip; 4096 is far past any HBM fit on v6e
PREFILL_RANGE = (1, 1 << 20)  # tokens; a 1M-token prompt is past every preset's context
TARGET_RANGE = (2, 1 << 20)  # tokens; at least one prompt token and one generated token
HBM_RESERVE_RANGE = (0, 90)  # percent; keeping more than 90% free leaves no room for weights
STARTUP_DELAY_RANGE = (0, 7200)  # seconds; a restore slower than 2 h means a wrong checkpoint
SYSTEM_NODES_RANGE = (1, 100)  # CPU nodes for kube-system and the LWS controller

APP_NAME_LIMIT = 40  # LWS pod names are <app>-<group>-<index>, and pod hostnames must stay labels

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    # Contract keys.
    ConfigKey(
        name="model",
        type="string",
        default="",
        description=f"Model preset: {', '.join(models.PRESETS)}. Required unless role=platform.",
    ),
    ConfigKey(
        name="topology",
        type="string",
        default="",
        description=f"TPU v6e slice topology: {', '.join(tpu.TOPOLOGIES)}. Required unless role=platform.",
    ),
    ConfigKey(
        name="mode",
        type="string",
        default="interleaved",
        description=(
            "interleaved (one slice, prefill and generate interleaved) or disaggregated (a prefill slice and a generate"
            " slice)."
        ),
    ),
    ConfigKey(
        name="quantization",
        type="string",
        default="int8",
        description="Weight precision: int8 (checkpoint must be int8-quantized) or bf16.",
    ),
    ConfigKey(
        name="checkpointPath",
        type="string",
        default="",
        description=(
            "gs:// URI of the MaxText (Orbax) checkpoint; with serverRuntime=bundled or vllm of a directory holding a "
            "Hugging Face checkpoint (bundled: or of one .gguf or .npz object), mounted read-only through the Cloud "
            "Storage FUSE CSI driver; with serverRuntime=vllm also hf://<org>/<model> to download from the Hugging Face"
            " Hub. The serving identity gets read access to its bucket. Required unless role=platform."
        ),
    ),
    # Serving.
    ConfigKey(
        name="quantizeKvCache",
        type="boolean",
        default=True,
        description="Store the KV cache in int8 (quantize_kvcache).",
    ),
    ConfigKey(
        name="perDeviceBatchSize",
        type="integer",
        default=PRESET_DEFAULT,
        description="Sequences per chip (per_device_batch_size); 0 = model preset.",
    ),
    ConfigKey(
        name="maxPrefillLength",
        type="integer",
        default=PRESET_DEFAULT,
        description="Longest prompt (max_prefill_predict_length); 0 = model preset.",
    ),
    ConfigKey(
        name="maxTargetLength",
        type="integer",
        default=PRESET_DEFAULT,
        description="Prompt + generated tokens (max_target_length); 0 = model preset.",
    ),
    ConfigKey(
        name="tensorParallelism",
        type="integer",
        default=PRESET_DEFAULT,
        description=(
            "ici_tensor_parallelism; -1 fills in the remaining chips; 0 = the preset's recipe fitted to the slice."
        ),
    ),
    ConfigKey(
        name="autoregressiveParallelism",
        type="integer",
        default=PRESET_DEFAULT,
        description="ici_autoregressive_parallelism; -1 fills in; 0 = the preset's recipe fitted to the slice.",
    ),
    ConfigKey(
        name="fsdpParallelism",
        type="integer",
        default=PRESET_DEFAULT,
        description="ici_fsdp_parallelism; -1 fills in; 0 = the preset's recipe fitted to the slice.",
    ),
    ConfigKey(
        name="hbmReservePercent",
        type="integer",
        default=10,
        description="Percent of each chip's HBM kept free for XLA scratch, activations and compiled programs.",
    ),
    ConfigKey(
        name="serverFlags",
        type="string",
        default="{}",
        description=(
            "JSON object of MaxText flags that override or extend the preset recipe, e.g. "
            '{"enable_model_warmup": "false"}.'
        ),
    ),
    ConfigKey(
        name="startupProbeDelaySeconds",
        type="integer",
        default=PRESET_DEFAULT,
        description="Startup probe initialDelaySeconds (checkpoint restore time); 0 = model preset.",
    ),
    ConfigKey(
        name="waitForReady",
        type="boolean",
        default=False,
        description=(
            "true: pulumi up ends only when the LeaderWorkerSet reports Available (timeout derived from the startup "
            "delay); false: it ends once the objects are applied."
        ),
    ),
    # Replicas and autoscaling (components/core/config_scaling.py).
    *config_scaling.CONFIG_KEYS,
    # GKE Inference Gateway (components/core/gateway.py).
    *gateway.CONFIG_KEYS,
    # Server images and names.
    ConfigKey(
        name="serverRuntime",
        type="string",
        default="jetstream",
        description=(
            "jetstream (upstream JetStream + MaxText on Pathways, the reference YAMLs' layout), bundled (this "
            "repository's server image) or vllm (vLLM's TPU backend, single-host slices)."
        ),
    ),
    ConfigKey(
        name="bundledServerImage",
        type="string",
        default="",
        description=(
            "serverRuntime=bundled: image of this repository's server, pinned by tag or digest; empty = the stack "
            "builds serving/Dockerfile into its own Artifact Registry repository and runs it by digest."
        ),
    ),
    ConfigKey(
        name="vllmImage",
        type="string",
        default=DEFAULT_VLLM_IMAGE,
        description="serverRuntime=vllm: vLLM's TPU image (vllm/vllm-tpu); pinned tag or digest.",
    ),
    ConfigKey(
        name="hfTokenSecret",
        type="string",
        default="",
        description=(
            "serverRuntime=vllm: Secret Manager secret (in gcp:project) holding a Hugging Face token; pulumi up copies "
            "it into a Kubernetes Secret the server reads. Needed for gated models (Llama, Gemma) from hf://; empty = "
            "no token."
        ),
    ),
    ConfigKey(
        name="apiKeySecret",
        type="string",
        default="",
        description=(
            "Secret Manager secret (in gcp:project) holding the API key clients must send (Authorization: Bearer "
            "<key>); pulumi up copies it into a Kubernetes Secret the server reads from its environment. "
            "serverRuntime=bundled or vllm; empty = no key."
        ),
    ),
    ConfigKey(
        name="jetstreamImage",
        type="string",
        default=DEFAULT_IMAGES["jetstreamImage"],
        description=(
            "jax-tpu container image (JetStream + MaxText server) when serverRuntime=jetstream; pinned tag or digest."
        ),
    ),
    ConfigKey(
        name="jetstreamHttpImage",
        type="string",
        default=DEFAULT_IMAGES["jetstreamHttpImage"],
        description="jetstream-http container image (HTTP front end on port 8000); pinned tag or digest.",
    ),
    ConfigKey(
        name="pathwaysServerImage",
        type="string",
        default=DEFAULT_IMAGES["pathwaysServerImage"],
        description="Pathways server image (pathways-rm resource manager and TPU workers); pinned tag or digest.",
    ),
    ConfigKey(
        name="pathwaysProxyImage",
        type="string",
        default=DEFAULT_IMAGES["pathwaysProxyImage"],
        description="Pathways proxy image (pathways-proxy on the leader); pinned tag or digest.",
    ),
    ConfigKey(
        name="appName", type="string", default="jetstream-pathways", description="LeaderWorkerSet name and `app` label."
    ),
    ConfigKey(name="serviceName", type="string", default="jetstream-svc", description="Service name."),
    ConfigKey(
        name="serviceType",
        type="string",
        default="ClusterIP",
        description=(
            "ClusterIP (reachable inside the cluster) or InternalLoadBalancer (a GKE internal passthrough Network Load "
            "Balancer, reachable from the VPC; never a public one)."
        ),
    ),
    ConfigKey(
        name="namespace",
        type="string",
        default=DERIVED,
        description=(
            "Kubernetes namespace (created unless it is `default`); empty = jetstream-<stack>, so stacks sharing a "
            "cluster never collide."
        ),
    ),
    ConfigKey(
        name="lwsVersion",
        type="string",
        default="v0.10.0",
        description="LeaderWorkerSet controller release to install.",
    ),
    ConfigKey(
        name="installLwsController",
        type="string",
        default="auto",
        description=(
            f"Who installs the cluster-wide LWS controller: {', '.join(LWS_INSTALLS)}. auto installs it only on a "
            f"cluster this stack creates (role=all without existingClusterName, role=platform); always also installs it"
            f" into an existing cluster (existingClusterName), where it is kept when the stack is destroyed so other "
            f"stacks' LeaderWorkerSets keep their CRD; never leaves it to whoever owns the cluster. A serving stack "
            f"never installs it (its platform stack does)."
        ),
    ),
    # Environments.
    ConfigKey(
        name="role",
        type="string",
        default="all",
        description=(
            "all (the cluster and the model server in one stack), platform (the cluster, its system pool, node service "
            "account, LWS controller and metrics adapter; exports clusterName, clusterLocation, project, kubeconfig) or"
            " serving (TPU pools and the model server on the cluster of clusterStack)."
        ),
    ),
    ConfigKey(
        name="clusterStack",
        type="string",
        default="",
        description=(
            "role=serving: the platform stack whose cluster to use, fully qualified: "
            "<organization>/jetstream-tpu/<stack>."
        ),
    ),
    # Cluster and node pools.
    ConfigKey(
        name="clusterName",
        type="string",
        default=DERIVED,
        description="Name of the GKE cluster to create; empty = jetstream-<stack>.",
    ),
    ConfigKey(
        name="existingClusterName",
        type="string",
        default="",
        description="Use this existing cluster (at clusterLocation) instead of creating one.",
    ),
    ConfigKey(
        name="zone",
        type="string",
        default="us-east5-b",
        description=(
            "Zone of the TPU node pools (a zone with v6e capacity), in the cluster's region: refused at preview "
            "otherwise."
        ),
    ),
    ConfigKey(
        name="clusterLocation",
        type="string",
        default="",
        description="Cluster region or zone; empty = the region of `zone`.",
    ),
    ConfigKey(
        name="releaseChannel",
        type="string",
        default="UNSPECIFIED",
        description=(
            f"GKE release channel of a created cluster: {', '.join(RELEASE_CHANNELS)}. UNSPECIFIED (no channel) lets "
            f"multi-host TPU pools keep auto-upgrade off; GKE forces it on in a channel. On an existing cluster or a "
            f"platform's (role=serving) the pools follow that cluster's live channel."
        ),
    ),
    ConfigKey(
        name="deletionProtection",
        type="boolean",
        default=True,
        description="GKE deletion protection of a created cluster.",
    ),
    ConfigKey(
        name="privateEndpoint",
        type="boolean",
        default=False,
        description=(
            "A created cluster's control plane only on its private endpoint (private nodes too: no node has an external"
            " IP); kubectl, pulumi and CI runners then need a route into the VPC."
        ),
    ),
    ConfigKey(
        name="authorizedNetworks",
        type="string",
        default="",
        description=(
            "Comma-separated IPv4 CIDR blocks allowed to reach a created cluster's control plane (master authorized "
            "networks); empty = no restriction by source address."
        ),
    ),
    ConfigKey(
        name="systemMachineType",
        type="string",
        default="e2-standard-4",
        description="Machine type of the CPU system pool.",
    ),
    ConfigKey(name="systemNodeCount", type="integer", default=1, description="Nodes in the CPU system pool."),
    ConfigKey(
        name="tpuMachineType",
        type="string",
        default="",
        description="Override the catalog's machine type (only 2x4: ct6e-standard-8t for one host).",
    ),
    ConfigKey(
        name="tpuProvisioning",
        type="string",
        default="on-demand",
        description=f"TPU capacity: {', '.join(PROVISIONING)}.",
    ),
    ConfigKey(
        name="tpuReservation",
        type="string",
        default="",
        description="Reservation name (required when tpuProvisioning=reservation).",
    ),
    ConfigKey(
        name="scratchBucketName",
        type="string",
        default=DERIVED,
        description="Pathways scratch bucket the stack creates; empty = <gcp project>-scratch-<stack>.",
    ),
)
KEYS_BY_NAME = {key.name: key for key in CONFIG_KEYS}


def proxy_subnet_name(stack: str) -> str:
    """The proxy-only subnet a stack that creates its cluster creates for regional gateways."""
    return stack_scoped_name("jetstream-proxy", stack, DNS_LABEL_LIMIT)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlatformConfig:
    """A role=platform stack: the cluster and what every serving stack on it shares."""

    project: str
    stack: str
    cluster_name: str
    zone: str
    cluster_location: str
    release_channel: str
    deletion_protection: bool
    system_machine_type: str
    system_node_count: int
    lws_version: str
    install_lws_controller: bool  # installLwsController (a platform creates its cluster)
    keep_lws_controller: bool  # never: the platform creates the cluster it installs into
    private_endpoint: bool  # privateEndpoint
    authorized_networks: tuple[str, ...]  # authorizedNetworks
    gateway: GatewaySettings  # enabled: the cluster-wide parts serving stacks' gateways need
    role: str = PLATFORM

    @property
    def existing_cluster(self) -> bool:
        """Never: a platform stack creates its cluster (existingClusterName is refused)."""
        return False

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
    mode: str
    quantization: str
    checkpoint_path: str
    quantize_kv_cache: bool
    per_device_batch_size: int
    max_prefill_length: int
    max_target_length: int
    parallelism: Mapping[str, int]  # mesh axis -> size, only the axes the user set (-1 = fill in)
    hbm_reserve_percent: int
    server_flags: Mapping[str, str]
    startup_probe_delay_seconds: int
    wait_for_ready: bool
    runtime: ServerRuntime  # serverRuntime, chosen once here: everything that differs between servers asks it
    images: Mapping[str, str]  # config key -> image, the runtime's image keys
    hf_token_secret: str  # Secret Manager secret of the Hugging Face token (serverRuntime=vllm); "" = none
    api_key_secret: str  # Secret Manager secret of the API key clients must send; "" = none
    app_name: str
    service_name: str
    namespace: str
    lws_version: str
    install_lws_controller: bool  # installLwsController: auto on a cluster the stack creates, always on any
    keep_lws_controller: bool  # installed into an existing cluster: kept when the stack is destroyed
    private_endpoint: bool  # privateEndpoint of a cluster the stack creates
    authorized_networks: tuple[str, ...]  # authorizedNetworks of a cluster the stack creates
    cluster_name: str  # "" for role=serving: the cluster is the platform's (PlatformReference)
    existing_cluster: bool
    zone: str
    cluster_location: str  # "" for role=serving, as cluster_name
    release_channel: str
    deletion_protection: bool
    system_machine_type: str
    system_node_count: int
    tpu_provisioning: str
    tpu_reservation: str
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
        if not self.checkpoint_path.startswith(GCS_SCHEME):
            return self.scratch_bucket
        return bucket_and_directory(self.checkpoint_path)[0]

    @property
    def checkpoint_file(self) -> str:
        """Object name of the checkpoint (the file the bundled server loads after the copy)."""
        return self.checkpoint_path.rsplit("/", 1)[-1]

    @property
    def builds_server_image(self) -> bool:
        """The stack builds and pushes serving/Dockerfile (serverRuntime=bundled without an image)."""
        return self.runtime.builds_server_image(self.images)

    @property
    def scratch_location(self) -> str:
        return f"gs://{self.scratch_bucket}/tmp"

    @property
    def region(self) -> str:
        return region_of(self.zone)

    @property
    def deployment_id(self) -> str:
        """The label value that ties this stack's pods to this stack's TPU node pools."""
        return stack_scoped_name("jetstream", self.stack, DNS_LABEL_LIMIT)

    @property
    def kubernetes_service_account(self) -> str:
        return self.app_name

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
        return not self.serving_role and not self.existing_cluster

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
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.artifact_repository_id}/{bundled.IMAGE_NAME}"

    @property
    def pods_use_workload_identity(self) -> bool:
        """The serving pods act as the workload GSA; Pathways pods act as the node service
        account instead, because their TPU pools run without Workload Identity (node_pools.py)."""
        return self.runtime.pods_use_workload_identity


# ---------------------------------------------------------------------------------------------
# Scalar parsing: each returns the typed value or raises ConfigError naming the key.


def _text(raw: Mapping[str, str], name: str) -> str:
    return read_text(raw, KEYS_BY_NAME[name])


def _integer(raw: Mapping[str, str], name: str) -> int:
    return read_integer(raw, KEYS_BY_NAME[name])


def _boolean(raw: Mapping[str, str], name: str) -> bool:
    text = _text(raw, name).lower()
    if text not in ("true", "false"):
        raise ConfigError(name, f"expected true or false, got {text!r}", f"pulumi config set {name} true")
    return text == "true"


def _choice(raw: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    return read_choice(raw, KEYS_BY_NAME[name], choices)


def _preset_int(raw: Mapping[str, str], name: str, preset_value: int) -> int:
    value = _integer(raw, name)
    return preset_value if value == PRESET_DEFAULT else value


def _bounded(name: str, value: int, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(
            name, f"{value} is outside {low}..{high}", f"pulumi config set {name} {min(max(value, low), high)}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Cross-field checks.

_GCS_URI = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](/[^\s]*)?$")
_IMAGE_PINNED = re.compile(r"^[\w.\-/:]+(:[\w][\w.\-]{0,127}|@sha256:[0-9a-f]{64})$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9_-]{1,61}[a-z0-9]$")
_ZONE = re.compile(r"[a-z]+-[a-z]+\d+-[a-z]")


def check_unknown_keys(raw: Mapping[str, str]) -> None:
    """Refuse a key this project does not declare, naming the nearest declared one. The CLI no
    longer refuses undeclared keys, and the program is handed every key of its namespace."""
    for name in raw:
        if name not in KEYS_BY_NAME:
            raise ConfigError(name, "is not a key of this stack", closest(name, KEYS_BY_NAME))


def _required(raw: Mapping[str, str], name: str) -> str:
    """A key a stack that serves cannot do without (REQUIRED_TO_SERVE)."""
    value = _text(raw, name)
    if not value:
        raise ConfigError(
            name,
            "is required and not set (a stack that serves needs a model, a topology and a checkpoint)",
            f"pulumi config set {name} <value>",
        )
    return value


def _model(raw: Mapping[str, str]) -> models.ModelPreset:
    name = _required(raw, "model")
    if name not in models.PRESETS:
        raise ConfigError(
            "model",
            f"unknown model preset {name!r} (known: {', '.join(models.PRESETS)})",
            closest(name, models.PRESETS),
        )
    return models.PRESETS[name]


def _tpu_slice(raw: Mapping[str, str]) -> tpu.TpuSlice:
    topology = _required(raw, "topology")
    if topology not in tpu.TOPOLOGIES:
        raise ConfigError(
            "topology",
            f"{topology!r} is not a TPU v6e slice shape (v6e shapes: {', '.join(tpu.TOPOLOGIES)})",
            "pick the next larger v6e shape, e.g. 4x4 for 16 chips",
        )
    machine_type = _text(raw, "tpuMachineType") or None
    try:
        return tpu.slice_for(topology, machine_type)
    except KeyError:
        allowed = ", ".join(tpu.machine_types_for(topology))
        raise ConfigError(
            ("tpuMachineType", "topology"),
            f"{machine_type!r} cannot host a {topology} slice (allowed: {allowed})",
            "leave tpuMachineType empty to use the catalog's machine type",
        ) from None


def _checkpoint_path(raw: Mapping[str, str], runtime: ServerRuntime) -> str:
    """A gs:// path, or another scheme the runtime reads (the runtime checks the rest)."""
    path = _required(raw, "checkpointPath")
    other_schemes = [scheme for scheme in runtime.checkpoint_schemes if scheme != GCS_SCHEME]
    if not _GCS_URI.match(path) and not path.startswith(tuple(other_schemes)):
        also = "".join(f" or a {scheme} URI" for scheme in other_schemes)
        raise ConfigError(
            "checkpointPath",
            f"{path!r} is not a gs:// URI of a bucket path{also}",
            "pulumi config set checkpointPath gs://my-bucket/llama/checkpoints/0/items",
        )
    return path.rstrip("/")


def _parallelism(raw: Mapping[str, str]) -> dict[str, int]:
    """The mesh axes the user set; the others come from the preset's recipe (planner.py)."""
    return {axis: value for axis, key in AXIS_KEYS.items() if (value := _integer(raw, key)) != PRESET_DEFAULT}


def _server_flags(raw: Mapping[str, str], planned: Mapping[str, str]) -> dict[str, str]:
    text = _text(raw, "serverFlags")
    try:
        flags = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            "serverFlags",
            f"not valid JSON ({error.msg} at character {error.pos})",
            'use a JSON object, e.g. {"enable_model_warmup": "false"}',
        ) from None
    if not isinstance(flags, dict) or not all(
        isinstance(key, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", key) for key in flags
    ):
        raise ConfigError(
            "serverFlags",
            "must be a JSON object whose keys are the server's flag names (lowercase, '_')",
            'e.g. {"enable_model_warmup": "false"}',
        )
    _check_not_planned(flags, planned)
    return {key: _flag_text(value) for key, value in flags.items()}


def _check_not_planned(flags: Mapping[str, str], planned: Mapping[str, str]) -> None:
    """Refuse a flag the stack derives from a key: it would bypass the planner's checks."""
    for flag in flags:
        if flag in planned:
            key = planned[flag]
            raise ConfigError(
                ("serverFlags", key),
                f"{flag} is planned from `{key}` and cannot be overridden here",
                f"pulumi config set {key} <value> and remove {flag} from serverFlags",
            )


def _flag_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _images(raw: Mapping[str, str], runtime: ServerRuntime) -> dict[str, str]:
    images = {name: _text(raw, name) for name in runtime.image_keys}
    for name, image in images.items():
        if name == runtime.built_image_key and not image:
            continue  # the stack builds it (StackConfig.builds_server_image)
        if not _IMAGE_PINNED.match(image) or image.endswith(":latest"):
            raise ConfigError(
                name,
                f"{image!r} is not pinned to an explicit tag or digest (imagePullPolicy is IfNotPresent)",
                "use a release tag such as :v0.2.0 or an @sha256: digest",
            )
    return images


def _check_runtime_keys(raw: Mapping[str, str], runtime: ServerRuntime) -> None:
    """Refuse a key only another runtime reads (its images, the Hugging Face token)."""
    for other in RUNTIMES.values():
        for name in set(other.keys) - set(runtime.keys):
            if is_set(raw, KEYS_BY_NAME[name]):
                raise ConfigError(
                    (name, "serverRuntime"),
                    (
                        f"{name} is set, but serverRuntime={runtime.name} does not use it (serverRuntime={other.name} "
                        f"does)"
                    ),
                    f"remove {name}, or pulumi config set serverRuntime {other.name}",
                )


def _api_key_secret(raw: Mapping[str, str], runtime: ServerRuntime) -> str:
    name = secret_id(_text(raw, "apiKeySecret"), "apiKeySecret")
    if name and runtime.api_key_env is None:
        servers = " or ".join(f"serverRuntime={other.name}" for other in RUNTIMES.values() if other.api_key_env)
        raise ConfigError(
            ("apiKeySecret", "serverRuntime"),
            f"serverRuntime={runtime.name} has no API key check (JetStream's front ends take none)",
            f"use {servers}, or remove apiKeySecret",
        )
    return name


def _label_name(raw: Mapping[str, str], name: str, limit: int, derived: str | None = None) -> str:
    value = _text(raw, name) or derived
    if not _DNS_LABEL.match(value) or len(value) > limit:
        raise ConfigError(
            name,
            f"{value!r} is not a DNS-1123 label of at most {limit} characters",
            "use lowercase letters, digits and '-', starting with a letter",
        )
    return value


def _names(raw: Mapping[str, str], stack: str) -> dict[str, str]:
    return {
        "appName": _label_name(raw, "appName", APP_NAME_LIMIT),
        "serviceName": _label_name(raw, "serviceName", APP_NAME_LIMIT),
        "namespace": _label_name(
            raw, "namespace", DNS_LABEL_LIMIT, stack_scoped_name("jetstream", stack, DNS_LABEL_LIMIT)
        ),
    }


def _zone(raw: Mapping[str, str]) -> tuple[str, str]:
    zone = _text(raw, "zone")
    if not _ZONE.fullmatch(zone):
        raise ConfigError("zone", f"{zone!r} is not a GCP zone", "e.g. us-east5-b (a zone with TPU v6e capacity)")
    location = _text(raw, "clusterLocation") or region_of(zone)
    check_zone_in_location(zone, location, cluster="the cluster's location", keys=("zone", "clusterLocation"))
    return zone, location


def _location_region(location: str) -> str:
    """The region of a cluster location, which is a region or a zone."""
    return region_of(location) if _ZONE.fullmatch(location) else location


def check_zone_in_location(zone: str, location: str, *, cluster: str, keys: tuple[str, ...] = ("zone",)) -> str:
    """`location`, or ConfigError when node pools in `zone` cannot join a cluster at `location` (GKE
    puts a cluster's node pools in zones of its region only, and would refuse them at apply).
    `cluster` names the cluster in the message."""
    region = _location_region(location)
    if region_of(zone) != region:
        raise ConfigError(
            keys,
            f"zone {zone} is outside {cluster} ({location}): GKE creates a cluster's node pools only in "
            f"zones of its region, {region}",
            f"pulumi config set zone <a zone of {region} with TPU v6e capacity>",
        )
    return location


def _reservation(raw: Mapping[str, str], provisioning: str) -> str:
    reservation = _text(raw, "tpuReservation")
    if provisioning == "reservation" and not reservation:
        raise ConfigError(
            ("tpuReservation", "tpuProvisioning"),
            "tpuProvisioning=reservation needs a reservation name",
            "pulumi config set tpuReservation <reservation-name>",
        )
    if provisioning != "reservation" and reservation:
        raise ConfigError(
            ("tpuReservation", "tpuProvisioning"),
            f"a reservation is set but tpuProvisioning={provisioning}",
            "pulumi config set tpuProvisioning reservation, or unset tpuReservation",
        )
    return reservation


def _scratch_bucket(raw: Mapping[str, str], project: str, stack: str) -> str:
    bucket = _text(raw, "scratchBucketName") or stack_scoped_name(f"{project}-scratch", stack, BUCKET_NAME_LIMIT)
    if not _BUCKET.match(bucket) or "goog" in bucket:
        raise ConfigError(
            "scratchBucketName",
            f"{bucket!r} is not a valid bucket name",
            "set scratchBucketName to 3-63 lowercase letters, digits, '-' or '_'",
        )
    return bucket


def _install_lws_controller(raw: Mapping[str, str], role: str, creates_cluster: bool) -> dict[str, bool]:
    """Whether the stack installs the cluster-wide LWS controller, and keeps it when destroyed.

    A string, not a boolean: Pulumi fills in a key's schema default before the program runs, so a
    boolean's "unset" cannot be told from true. auto installs where the stack creates the cluster;
    always also into an existing cluster, where the install outlives the stack (`keep_lws_controller`:
    deleting the CRD would delete every LeaderWorkerSet of the cluster, other stacks' too); never
    leaves it to the cluster's owner. A serving stack's platform installs it."""
    if _text(raw, "installLwsController").lower() in ("true", "false"):
        raise ConfigError(
            "installLwsController",
            f"is now one of {', '.join(LWS_INSTALLS)}, not a boolean",
            "pulumi config set installLwsController never (was false) or auto (was true)",
        )
    choice = _choice(raw, "installLwsController", LWS_INSTALLS)
    if role == SERVING and choice == LWS_ALWAYS:
        raise ConfigError(
            ("installLwsController", "role"),
            "a role=serving stack never installs the LWS controller: its platform stack does",
            "pulumi config set installLwsController auto (or never) here; the platform stack installs it",
        )
    install = choice == LWS_ALWAYS or choice == LWS_AUTO and creates_cluster
    return {"install_lws_controller": install, "keep_lws_controller": install and not creates_cluster}


def _authorized_networks(raw: Mapping[str, str]) -> tuple[str, ...]:
    """authorizedNetworks: comma-separated IPv4 CIDR blocks allowed to reach the control plane."""
    blocks = tuple(block.strip() for block in _text(raw, "authorizedNetworks").split(",") if block.strip())
    for block in blocks:
        try:
            ipaddress.IPv4Network(block)
        except ValueError:
            raise ConfigError(
                "authorizedNetworks",
                f"{block!r} is not an IPv4 CIDR block (host bits must be zero)",
                "pulumi config set authorizedNetworks 10.0.0.0/8,203.0.113.0/24",
            ) from None
    return blocks


def _lws_version(raw: Mapping[str, str]) -> str:
    version = _text(raw, "lwsVersion")
    if not re.fullmatch(r"v\d+\.\d+\.\d+", version):
        raise ConfigError("lwsVersion", f"{version!r} is not a release tag", "use a tag like v0.10.0")
    return version


# ---------------------------------------------------------------------------------------------
# Roles.

# Keys only the stack that owns the cluster uses (role=all or platform). A serving stack's TPU pools
# follow the release channel of the live cluster, read at deploy time (resources/gke.py).
CLUSTER_KEYS = (
    "clusterName",
    "existingClusterName",
    "clusterLocation",
    "releaseChannel",
    "deletionProtection",
    "systemMachineType",
    "systemNodeCount",
    "lwsVersion",
    "installLwsController",
    "privateEndpoint",
    "authorizedNetworks",
    "gatewayProxySubnetRange",
)
# What a platform stack uses; it creates its cluster, so existingClusterName is not among them.
PLATFORM_KEYS = ("role", "zone", "gateway", *(key for key in CLUSTER_KEYS if key != "existingClusterName"))
_STACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _unused_keys(role: str) -> tuple[tuple[str, ...], str, str]:
    """(keys a stack of this role does not use, why, what to do instead)."""
    if role == PLATFORM:
        return (
            tuple(name for name in KEYS_BY_NAME if name not in PLATFORM_KEYS),
            (
                "a platform stack creates the cluster and what serving stacks share on it (no TPU pool, no workload, no"
                " existing cluster)"
            ),
            "set it in a role=serving stack that names this one in clusterStack (existingClusterName: use role=all)",
        )
    if role == SERVING:
        # installLwsController=never stays accepted: it is what a serving stack installs (nothing);
        # always is refused with its own reason (_install_lws_controller).
        return (
            tuple(name for name in CLUSTER_KEYS if name != "installLwsController"),
            "a serving stack puts its TPU pools and workload on the cluster of clusterStack and creates no cluster",
            "set it in the platform stack, and remove it here",
        )
    return (
        ("clusterStack",),
        "only a role=serving stack uses another stack's cluster",
        "pulumi config set role serving, or remove clusterStack",
    )


def _check_role_keys(raw: Mapping[str, str], role: str) -> None:
    """Refuse a key the role does not use."""
    unused, why, suggestion = _unused_keys(role)
    for name in unused:
        if is_set(raw, KEYS_BY_NAME[name]):
            raise ConfigError(
                (name, "role"), f"{name} is set, but a role={role} stack does not use it: {why}", suggestion
            )


def _cluster_stack(raw: Mapping[str, str], role: str, stack: str) -> str:
    name = _text(raw, "clusterStack")
    if role != SERVING:
        return ""
    if not name:
        raise ConfigError(
            ("clusterStack", "role"),
            "role=serving needs the platform stack whose cluster it uses",
            f"pulumi config set clusterStack <organization>/{PROJECT}/platform (the names: pulumi stack ls --all)",
        )
    if not _STACK_NAME.fullmatch(name):
        raise ConfigError(
            "clusterStack",
            f"{name!r} is not a fully qualified stack name",
            (
                f"use <organization>/<project>/<stack>, e.g. my-org/{PROJECT}/platform (self-managed backends: "
                f"organization/{PROJECT}/platform)"
            ),
        )
    _, referenced_project, referenced_stack = name.split("/")
    if (referenced_project, referenced_stack) == (PROJECT, stack):
        raise ConfigError(
            "clusterStack",
            f"{name!r} is this stack itself",
            "name the platform stack (role=platform) whose cluster to use",
        )
    return name


def _cluster(raw: Mapping[str, str], stack: str, role: str) -> dict:
    """The settings of the cluster a role=all or platform stack creates (or, role=all, looks up)."""
    existing = _text(raw, "existingClusterName")
    zone, location = _zone(raw)
    return {
        "cluster_name": existing
        or _label_name(
            raw, "clusterName", CLUSTER_NAME_LIMIT, stack_scoped_name("jetstream", stack, CLUSTER_NAME_LIMIT)
        ),
        "existing_cluster": bool(existing),
        "zone": zone,
        "cluster_location": location,
        "release_channel": _choice(raw, "releaseChannel", RELEASE_CHANNELS),
        "deletion_protection": _boolean(raw, "deletionProtection"),
        "system_machine_type": _text(raw, "systemMachineType"),
        "system_node_count": _bounded("systemNodeCount", _integer(raw, "systemNodeCount"), SYSTEM_NODES_RANGE),
        "lws_version": _lws_version(raw),
        **_install_lws_controller(raw, role, creates_cluster=role != SERVING and not existing),
        **_control_plane_access(raw, existing),
    }


def _control_plane_access(raw: Mapping[str, str], existing: bool) -> dict:
    """privateEndpoint and authorizedNetworks, which only a cluster the stack creates takes."""
    access = {"private_endpoint": _boolean(raw, "privateEndpoint"), "authorized_networks": _authorized_networks(raw)}
    if existing and (access["private_endpoint"] or access["authorized_networks"]):
        key = "privateEndpoint" if access["private_endpoint"] else "authorizedNetworks"
        existing_name = _text(raw, "existingClusterName")
        raise ConfigError(
            (key, "existingClusterName"),
            f"{key} shapes the control plane of a cluster the stack creates, not of {existing_name!r}",
            "set it on the existing cluster with gcloud container clusters update, and remove it here",
        )
    return access


def check_same_project(project: str, platform_project: str, cluster_stack: str) -> str:
    """A serving stack deploys into its platform's project (the cluster's Workload Identity pool
    and the node service account live there); the platform's project, or ConfigError."""
    if project != platform_project:
        raise ConfigError(
            ("gcp:project", "clusterStack"),
            (
                f"gcp:project is {project!r} but the platform stack {cluster_stack} runs its cluster in "
                f"{platform_project!r}"
            ),
            f"pulumi config set gcp:project {platform_project}",
        )
    return platform_project


def parse_stack_config(raw: Mapping[str, str], *, project: str | None, stack: str) -> StackConfig | PlatformConfig:
    """Typed, validated config from the project's raw string values (keys without namespace):
    a PlatformConfig for role=platform, else a StackConfig."""
    check_unknown_keys(raw)
    if not project:
        raise ConfigError("gcp:project", "the GCP project is not set", "pulumi config set gcp:project <project-id>")
    role = _choice(raw, "role", ROLES)
    _check_role_keys(raw, role)
    cluster_stack = _cluster_stack(raw, role, stack)
    cluster = _cluster(raw, stack, role)
    if role == PLATFORM:
        del cluster["existing_cluster"]  # refused above: a platform creates its cluster
        return PlatformConfig(project=project, stack=stack, gateway=parse_gateway(raw, server_runtime=None), **cluster)
    if role == SERVING:  # the platform's cluster, read at deploy time (PlatformReference)
        cluster |= {"cluster_name": "", "cluster_location": ""}
    preset, tpu_slice = _model(raw), _tpu_slice(raw)
    runtime = RUNTIMES[_choice(raw, "serverRuntime", SERVER_RUNTIMES)]
    _check_runtime_keys(raw, runtime)
    provisioning = _choice(raw, "tpuProvisioning", PROVISIONING)
    names = _names(raw, stack)
    cfg = StackConfig(
        project=project,
        stack=stack,
        role=role,
        cluster_stack=cluster_stack,
        service_type=_choice(raw, "serviceType", SERVICE_TYPES),
        model=preset,
        tpu_slice=tpu_slice,
        mode=_choice(raw, "mode", MODES),
        quantization=_choice(raw, "quantization", QUANTIZATIONS),
        checkpoint_path=_checkpoint_path(raw, runtime),
        quantize_kv_cache=_boolean(raw, "quantizeKvCache"),
        per_device_batch_size=_bounded(
            "perDeviceBatchSize", _preset_int(raw, "perDeviceBatchSize", preset.per_device_batch_size), BATCH_RANGE
        ),
        max_prefill_length=_bounded(
            "maxPrefillLength", _preset_int(raw, "maxPrefillLength", preset.max_prefill_length), PREFILL_RANGE
        ),
        max_target_length=_bounded(
            "maxTargetLength", _preset_int(raw, "maxTargetLength", preset.max_target_length), TARGET_RANGE
        ),
        parallelism=_parallelism(raw),
        hbm_reserve_percent=_bounded("hbmReservePercent", _integer(raw, "hbmReservePercent"), HBM_RESERVE_RANGE),
        server_flags=_server_flags(raw, runtime.planned_flags),
        startup_probe_delay_seconds=_bounded(
            "startupProbeDelaySeconds",
            _preset_int(raw, "startupProbeDelaySeconds", preset.startup_probe_delay_seconds),
            STARTUP_DELAY_RANGE,
        ),
        wait_for_ready=_boolean(raw, "waitForReady"),
        runtime=runtime,
        images=_images(raw, runtime),
        hf_token_secret=secret_id(_text(raw, "hfTokenSecret"), "hfTokenSecret"),
        api_key_secret=_api_key_secret(raw, runtime),
        app_name=names["appName"],
        service_name=names["serviceName"],
        namespace=names["namespace"],
        tpu_provisioning=provisioning,
        tpu_reservation=_reservation(raw, provisioning),
        scratch_bucket=_scratch_bucket(raw, project, stack),
        scaling=parse_autoscaling(raw, runtime.scaling_metrics),
        gateway=parse_gateway(
            raw, server_runtime=runtime.name, creates_cluster=role != SERVING and not cluster["existing_cluster"]
        ),
        **cluster,
    )
    runtime.validate(cfg)
    if cfg.scaling.enabled:
        runtime.metrics_endpoint(cfg)  # refuses a config that turns the metrics off
    return cfg
