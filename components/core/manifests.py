"""Kubernetes manifests as pure functions: (config, plan) -> dict.

The LeaderWorkerSet is built through the typed model in `lws_model`, in one of two layouts:

* `serverRuntime=jetstream` (default) follows the seed's reference YAMLs container for container:
  a leader pod with the Pathways proxy, the Pathways resource manager, the JetStream/MaxText server
  (`jax-tpu`, single controller) and the JetStream HTTP front end, and one Pathways worker per TPU
  host (`size = hosts + 1`). The tests diff it against the reference YAMLs.
* `serverRuntime=bundled` is multi-controller JAX with this repository's server: one pod per TPU
  host of the slice, the leader included (`size = hosts`), every pod running the same
  `python -m serving ...` command with the host's chips. LWS gives each pod LWS_LEADER_ADDRESS,
  LWS_GROUP_SIZE (= size = the number of server processes) and LWS_WORKER_INDEX, from which the
  server joins `jax.distributed` at the leader on JAX_COORDINATOR_PORT (control channel on the
  next port); process 0, the leader, serves HTTP and gRPC and carries the probes. Because the
  leader requests TPUs, LWS also injects TPU_WORKER_HOSTNAMES / TPU_WORKER_ID with the leader as
  TPU worker 0 (into the first container requesting `google.com/tpu`, the server). The server reads
  a local checkpoint file, so an init container copies the `checkpointPath` object into an
  emptyDir at /models first (the pod's Workload Identity can read the checkpoint bucket).

The Service selects the leader pod only, through the `app` label that only the leader template
carries (as in the reference). The Namespace and the Workload Identity ServiceAccount the pods
run as are built here too, so `components.render` prints everything `kubectl apply -f -` needs and
`JetStreamServer` wraps the same dicts.
"""

from __future__ import annotations

from components.core import lws_model as lws
from components.core import tpu
from components.core.config import StackConfig
from components.core.planner import Plan

PROXY_PORT = 38681
RESOURCE_MANAGER_PORT = 38677
WORKER_PORT = 38679
GRPC_PORT = 9000
HTTP_PORT = 8000
HEALTH_PATH = "/healthcheck"
PULL_POLICY = "IfNotPresent"  # images are pinned, so a node's cached copy is the right one
LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"  # expanded by Kubernetes from the env LWS injects
NODE_POOL_LABEL = "cloud.google.com/gke-nodepool"
# Equal to serving.server.settings.DISAGGREGATED_SERVER (components import only the pure, JAX-free
# serving.engine.parallelism from the server; tests/contract checks the two agree).
DISAGGREGATED_SERVER = "ExperimentalMaxtextDisaggregatedServer_8"
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"  # Workload Identity: KSA -> GSA
# The bundled server (serving/ in this repository) serves HTTP itself, so it replaces both
# jax-tpu's JetStream command and the jetstream-http sidecar.
BUNDLED_COMMAND = ("python", "-m", "serving", "--host", "0.0.0.0",
                   "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT))
SERVER_CONTAINER = "jax-tpu"
# Multi-controller JAX of the bundled server (serving/server/multihost.py): the coordinator listens on
# the leader at COORDINATOR_PORT, the leader's control channel on the port after it.
COORDINATOR_PORT = 8476
CONTROL_PORT = COORDINATOR_PORT + 1
MODELS_DIR = "/models"
MODELS_VOLUME = "models"


def app_labels(cfg: StackConfig) -> dict[str, str]:
    """The one label set: on the leader pod template and as the Service selector."""
    return {"app": cfg.app_name}


# ---------------------------------------------------------------------------------------------
# Server command line.


def _derived_flags(cfg: StackConfig) -> dict[str, str]:
    flags = {
        "tokenizer_path": cfg.model.tokenizer_path,
        "model_name": cfg.model.maxtext_model_name,
        "load_parameters_path": local_checkpoint(cfg) if cfg.bundled else cfg.checkpoint_path,
        "max_prefill_predict_length": str(cfg.max_prefill_length),
        "max_target_length": str(cfg.max_target_length),
        # Passed as configured (a -1 stays -1): MaxText fills it in exactly as the planner did.
        "ici_fsdp_parallelism": str(cfg.fsdp_parallelism),
        "ici_autoregressive_parallelism": str(cfg.autoregressive_parallelism),
        "ici_tensor_parallelism": str(cfg.tensor_parallelism),
        "per_device_batch_size": str(cfg.per_device_batch_size),
        "quantize_kvcache": "true" if cfg.quantize_kv_cache else "false",
    }
    if cfg.quantization == "int8":
        flags |= {"quantization": "int8", "checkpoint_is_quantized": "true"}
        if cfg.bundled and cfg.checkpoint_file.endswith(".gguf"):
            # The bundled server dequantizes GGUF tensors on load, then quantizes them to int8.
            flags["checkpoint_is_quantized"] = "false"
    return flags


def local_checkpoint(cfg: StackConfig) -> str:
    """Where the bundled server finds the checkpoint the init container copied."""
    return f"{MODELS_DIR}/{cfg.checkpoint_file}"


def _mode_flags(cfg: StackConfig) -> dict[str, str]:
    if cfg.mode == "disaggregated":
        return {"stack_prefill_result_cache": "True", "inference_server": DISAGGREGATED_SERVER, **cfg.model.disaggregated_flags}
    if cfg.bundled:
        # Multi-controller: one server process per TPU host, no Pathways.
        return {"enable_single_controller": "false"}
    # Interleaved serving on Pathways: one JAX controller drives every host of the slice.
    return {"enable_single_controller": "true"}


def maxtext_args(cfg: StackConfig) -> tuple[str, ...]:
    """jax-tpu args: the base config, then key=value flags in the recipe's order.

    Recipe flags come in `flag_order`; mode flags are always present; `serverFlags` overrides
    replace a value in place or are appended.
    """
    mode_flags = _mode_flags(cfg)
    values = {**cfg.model.fixed_flags, **_derived_flags(cfg), **mode_flags}
    order = [key for key in cfg.model.flag_order if key in values]
    order += [key for key in mode_flags if key not in order]
    values |= cfg.server_flags
    order += [key for key in cfg.server_flags if key not in order]
    return (cfg.model.maxtext_config, *(f"{key}={values[key]}" for key in order))


# ---------------------------------------------------------------------------------------------
# Containers.


def _scratch_arg(cfg: StackConfig) -> str:
    return f"--gcs_scratch_location={cfg.scratch_location}"


def _port(number: int, name: str | None = None) -> tuple[lws.ContainerPort, ...]:
    return (lws.ContainerPort(container_port=number, name=name),)


def _health_probe(period: int, failures: int, delay: int | None = None) -> lws.Probe:
    return lws.Probe(
        http_get=lws.HTTPGetAction(path=HEALTH_PATH, port=HTTP_PORT),
        period_seconds=period,
        initial_delay_seconds=delay,
        failure_threshold=failures,
    )


def pathways_proxy(cfg: StackConfig) -> lws.Container:
    return lws.Container(
        name="pathways-proxy",
        image=cfg.images["pathwaysProxyImage"],
        args=(f"--resource_manager_address={LEADER_ADDRESS}:{RESOURCE_MANAGER_PORT}", f"--server_port={PROXY_PORT}", _scratch_arg(cfg)),
        image_pull_policy=PULL_POLICY,
        ports=_port(PROXY_PORT),
    )


def pathways_resource_manager(cfg: StackConfig, plan: Plan) -> lws.Container:
    return lws.Container(
        name="pathways-rm",
        env=(lws.EnvVar(name="HOST_ADDRESS", value=LEADER_ADDRESS), lws.EnvVar(name="TPU_SKIP_MDS_QUERY", value="true")),
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
        ports=_port(RESOURCE_MANAGER_PORT),
    )


def _server_probes(cfg: StackConfig) -> dict[str, lws.Probe]:
    return {
        "startup_probe": _health_probe(period=1, failures=10000, delay=cfg.startup_probe_delay_seconds),
        "liveness_probe": _health_probe(period=60, failures=cfg.model.probe_failure_threshold),
        "readiness_probe": _health_probe(period=60, failures=cfg.model.probe_failure_threshold),
    }


def jax_server(cfg: StackConfig) -> lws.Container:
    """The seed's JetStream/MaxText server on the Pathways leader (serverRuntime=jetstream)."""
    disaggregated = cfg.mode == "disaggregated"
    return lws.Container(
        name=SERVER_CONTAINER,
        image=cfg.images["jetstreamImage"],
        args=maxtext_args(cfg),
        env=(lws.EnvVar(name="LOG_LEVEL", value="INFO"),) if disaggregated else None,
        image_pull_policy=PULL_POLICY,
        # The seed's disaggregated server runs with these capabilities (KV transfer between slices).
        security_context=lws.SecurityContext(capabilities=lws.Capabilities(add=("SYS_PTRACE", "NET_ADMIN", "SYS_TIME"))) if disaggregated else None,
        ports=_port(GRPC_PORT),
        **_server_probes(cfg),
    )


def bundled_server(cfg: StackConfig, leader: bool) -> lws.Container:
    """This repository's server, one per TPU host (serverRuntime=bundled).

    Every pod runs the same command line; only the leader (process 0) binds HTTP and gRPC, so
    only it declares those ports and carries the /healthcheck probes. A worker whose leader is
    gone exits non-zero, and a leader that loses a worker fails /healthcheck: either way LWS
    recreates the whole group.
    """
    front_ends = (*_port(HTTP_PORT, "http"), *_port(GRPC_PORT, "grpc")) if leader else ()
    return lws.Container(
        name=SERVER_CONTAINER,
        image=cfg.images["bundledServerImage"],
        command=BUNDLED_COMMAND,
        args=maxtext_args(cfg),
        env=(lws.EnvVar(name="JAX_COORDINATOR_PORT", value=str(COORDINATOR_PORT)),),
        image_pull_policy=PULL_POLICY,
        ports=(*front_ends, *_port(COORDINATOR_PORT, "jax-coordinator"), *_port(CONTROL_PORT, "jax-control")),
        resources=lws.ResourceRequirements(limits={tpu.TPU_RESOURCE: cfg.tpu_slice.tpu_request}),
        volume_mounts=(lws.VolumeMount(name=MODELS_VOLUME, mount_path=MODELS_DIR, read_only=True),),
        **(_server_probes(cfg) if leader else {}),
    )


def checkpoint_copy(cfg: StackConfig) -> lws.Container:
    """Init container: the checkpoint object from GCS into the pod's /models (Workload Identity)."""
    return lws.Container(
        name="fetch-checkpoint",
        image=cfg.images["checkpointCopyImage"],
        command=("gcloud", "storage", "cp", cfg.checkpoint_path, local_checkpoint(cfg)),
        image_pull_policy=PULL_POLICY,
        volume_mounts=(lws.VolumeMount(name=MODELS_VOLUME, mount_path=MODELS_DIR),),
    )


def jetstream_http(cfg: StackConfig) -> lws.Container:
    return lws.Container(name="jetstream-http", image=cfg.images["jetstreamHttpImage"], image_pull_policy=PULL_POLICY, ports=_port(HTTP_PORT))


def pathways_worker(cfg: StackConfig) -> lws.Container:
    return lws.Container(
        name="worker",
        args=(f"--server_port={WORKER_PORT}", f"--resource_manager_address={LEADER_ADDRESS}:{RESOURCE_MANAGER_PORT}", _scratch_arg(cfg)),
        image=cfg.images["pathwaysServerImage"],
        image_pull_policy=PULL_POLICY,
        ports=_port(WORKER_PORT),
        resources=lws.ResourceRequirements(limits={tpu.TPU_RESOURCE: cfg.tpu_slice.tpu_request}),
    )


# ---------------------------------------------------------------------------------------------
# Objects.

TPU_TOLERATION = lws.Toleration(key=tpu.TPU_RESOURCE, operator="Exists", effect="NoSchedule")


def _pod_spec(cfg: StackConfig, containers: tuple[lws.Container, ...]) -> lws.PodSpec:
    return lws.PodSpec(
        node_selector=cfg.tpu_slice.node_selector,
        tolerations=(TPU_TOLERATION,),
        service_account_name=cfg.kubernetes_service_account,  # Workload Identity -> GCS access
        containers=containers,
    )


def _bundled_pod_spec(cfg: StackConfig, leader: bool) -> lws.PodSpec:
    return lws.PodSpec(
        node_selector=cfg.tpu_slice.node_selector,
        tolerations=(TPU_TOLERATION,),
        service_account_name=cfg.kubernetes_service_account,  # Workload Identity -> GCS access
        containers=(bundled_server(cfg, leader),),
        init_containers=(checkpoint_copy(cfg),),
        volumes=(lws.Volume(name=MODELS_VOLUME, empty_dir=lws.EmptyDirVolumeSource()),),
    )


def lws_size(cfg: StackConfig, plan: Plan) -> int:
    """Pods per LWS group: Pathways adds a leader to the TPU hosts; the bundled leader is a TPU host."""
    if cfg.bundled:
        return plan.slices * plan.hosts_per_slice
    return cfg.tpu_slice.lws_size(plan.slices)


def _pod_templates(cfg: StackConfig, plan: Plan) -> tuple[lws.PodSpec, lws.PodSpec]:
    """(leader, worker) pod specs of the runtime's layout."""
    if cfg.bundled:
        return _bundled_pod_spec(cfg, leader=True), _bundled_pod_spec(cfg, leader=False)
    leader = (pathways_proxy(cfg), pathways_resource_manager(cfg, plan), jax_server(cfg), jetstream_http(cfg))
    return _pod_spec(cfg, leader), _pod_spec(cfg, (pathways_worker(cfg),))


def leader_worker_set_model(cfg: StackConfig, plan: Plan) -> lws.LeaderWorkerSet:
    disaggregated = cfg.mode == "disaggregated"  # config refuses it with serverRuntime=bundled
    # One LWS group per node pool (slice); in disaggregated mode one subgroup per slice.
    exclusivity = lws.SUBGROUP_EXCLUSIVE_TOPOLOGY if disaggregated else lws.EXCLUSIVE_TOPOLOGY
    leader_spec, worker_spec = _pod_templates(cfg, plan)
    return lws.LeaderWorkerSet(
        metadata=lws.ObjectMeta(name=cfg.app_name, namespace=cfg.namespace, annotations={exclusivity: NODE_POOL_LABEL}),
        spec=lws.LeaderWorkerSetSpec(
            replicas=1,
            leader_worker_template=lws.LeaderWorkerTemplate(
                sub_group_policy=lws.SubGroupPolicy(sub_group_size=plan.hosts_per_slice) if disaggregated else None,
                # The app label only on the leader: the Service reaches the leader pod only.
                leader_template=lws.PodTemplateSpec(metadata=lws.ObjectMeta(labels=app_labels(cfg)), spec=leader_spec),
                size=lws_size(cfg, plan),
                worker_template=lws.PodTemplateSpec(spec=worker_spec),
            ),
        ),
    )


def leader_worker_set(cfg: StackConfig, plan: Plan) -> dict:
    return leader_worker_set_model(cfg, plan).to_dict()


def service(cfg: StackConfig) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": cfg.service_name, "namespace": cfg.namespace},
        "spec": {
            "selector": app_labels(cfg),
            "ports": [{"protocol": "TCP", "name": "jetstream-http", "port": HTTP_PORT, "targetPort": HTTP_PORT}],
        },
    }


def namespace(cfg: StackConfig) -> dict | None:
    """The stack's Namespace, or None for `default` (which every cluster has)."""
    if cfg.namespace == "default":
        return None
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.namespace}}


def service_account(cfg: StackConfig, gsa_email=None) -> dict:
    """The Kubernetes service account of the pods, bound to the GSA through Workload Identity.

    `gsa_email` defaults to the email GCP derives for the stack's GSA; `JetStreamServer` passes
    the created account's email (a Pulumi Output, so the KSA waits for the GSA).
    """
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": cfg.kubernetes_service_account, "namespace": cfg.namespace,
                     "annotations": {GSA_ANNOTATION: cfg.google_service_account_email if gsa_email is None else gsa_email}},
    }


def serving_manifests(cfg: StackConfig, plan: Plan) -> list[dict]:
    """The workload objects, in apply order."""
    return [leader_worker_set(cfg, plan), service(cfg)]


def all_manifests(cfg: StackConfig, plan: Plan) -> list[dict]:
    """Everything a fresh cluster (with the LWS controller) needs, in apply order."""
    prerequisites = [document for document in (namespace(cfg), service_account(cfg)) if document is not None]
    return [*prerequisites, *serving_manifests(cfg, plan)]


def head_pod(cfg: StackConfig) -> str:
    """Name of the leader pod of the first (only) LWS group."""
    return f"{cfg.app_name}-0"


def service_url(cfg: StackConfig) -> str:
    return f"http://{cfg.service_name}.{cfg.namespace}.svc.cluster.local:{HTTP_PORT}"


def port_forward_command(cfg: StackConfig) -> str:
    return f"kubectl -n {cfg.namespace} port-forward pod/{head_pod(cfg)} {HTTP_PORT}:{HTTP_PORT}"


def curl_example() -> str:
    body = '{"prompt": "What are the top 5 programming languages", "max_tokens": 200}'
    return f"curl -X POST localhost:{HTTP_PORT}/generate -H 'Content-type: application/json' -d '{body}'"
