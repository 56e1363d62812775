"""The stack's config keys: one table (`CONFIG_KEYS`), the choices and sentinels they declare.

Pulumi applies a key's schema default before the program runs, and a key declared without one is
required, so "take it from somewhere else" needs a sentinel default: integer keys use 0 for "the
model preset's value", name keys use "" for "derived from the stack name" (naming.py). For the
same reason a key counts as set only when its value differs from its default (`config_keys.is_set`).
`Pulumi.yaml`'s `config:` block and docs/stack/config-keys.md are generated from this table
(`python -m components.config_docs`). Declarations only: the values are parsed in
`config_values.py`, `config_runtime.py`, `config_roles.py` and the feature modules that own keys
(`config_scaling.py`, `config_gateway.py`).
"""

from __future__ import annotations

from components.core import config_gateway, config_scaling, models, tpu
from components.core.config_keys import ConfigKey
from components.core.runtimes import RUNTIMES
from components.core.runtimes.pathways import DEFAULT_IMAGES
from components.core.runtimes.vllm import DEFAULT_IMAGE as DEFAULT_VLLM_IMAGE

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
# Keys a serving stack cannot do without (Pulumi.yaml gives them "" so a platform stack needs none).
REQUIRED_TO_SERVE = ("model", "topology", "checkpointPath")
PRESET_DEFAULT = 0  # integer sentinel: take the value from the model preset
DERIVED = ""  # name sentinel: derive the name from the stack (`stack_scoped_name`)
AXIS_KEYS = {"fsdp": "fsdpParallelism", "autoregressive": "autoregressiveParallelism", "tensor": "tensorParallelism"}

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
    # GKE Inference Gateway (components/core/config_gateway.py).
    *config_gateway.CONFIG_KEYS,
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
