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

Both layouts share the pod placement (`_pod_spec`): the slice's node selector plus the stack's
deployment label (its own TPU pools only), the TPU toleration, the service account.

Disaggregated mode (Pathways only) puts each slice in its own LWS subgroup of `hosts` pods with
`subgroup-exclusive-topology` on the node pool. The Pathways leader holds no TPU, so it is
excluded from the subgroups (`subGroupPolicyType: LeaderExcluded`): with LWS's default policy
the leader is subgroup 0 and, on single-host slices (subGroupSize 1), the two workers become
subgroups 1 and 2, three exclusive subgroups for two node pools (components/core/scheduling.py
proves placements like this before any resource exists).

The Service selects the leader pods only, through the `app` label that only the leader template
carries (as in the reference): one leader per LeaderWorkerSet replica (`replicas`), so it balances
over every replica. With autoscaling on, the PodMonitoring and the HPA
(components/core/autoscaling.py) come after the workload. The Namespace and the ServiceAccount the pods run as are built
here too, so `components.render` prints everything `kubectl apply -f -` needs and
`JetStreamServer` wraps the same dicts.
"""

from __future__ import annotations

from typing import Any, Mapping

from components.core import gateway as inference_gateway
from components.core import lws_model as lws
from components.core import tpu
from components.core.autoscaling import autoscaling_manifests, jetstream_server_flags, metrics_endpoint
from components.core.config import BUNDLED_IMAGE_TAG, INTERNAL_LOAD_BALANCER, StackConfig
from components.core.node_pools import DEPLOYMENT_LABEL, NODE_POOL_LABEL
from components.core.planner import Plan
from components.core.ports import GRPC_PORT, HTTP_PORT

PROXY_PORT = 38681
RESOURCE_MANAGER_PORT = 38677
WORKER_PORT = 38679
HEALTH_PATH = "/healthcheck"
PULL_POLICY = "IfNotPresent"  # images are pinned, so a node's cached copy is the right one
LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"  # expanded by Kubernetes from the env LWS injects
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
# The dtype the bundled server computes and keeps its unquantized KV cache in; the planner
# counts its size (planner.BUNDLED_ACTIVATION_BYTES), so the stack always passes it.
BUNDLED_DTYPE = "bfloat16"

# Probes of the server's /healthcheck (the seed's values). The startup probe polls every second
# from the restore-time delay on and tolerates a restore up to STARTUP_FAILURE_THRESHOLD seconds
# longer than the estimate; liveness and readiness then check once a minute and restart or
# unready the pod after the preset's failure threshold (a busy server can miss a probe or two).
STARTUP_PERIOD_SECONDS = 1
STARTUP_FAILURE_THRESHOLD = 10000
HEALTH_PERIOD_SECONDS = 60

# pulumi-kubernetes await annotations. A Service's await waits up to 10 minutes for endpoints,
# and the leader pod exists only once the TPU slice, the LWS controller and the LWS are up, so
# the Service never waits for them; with waitForReady the LeaderWorkerSet waits for its Available
# condition instead (provider/pkg/await: pulumi.com/skipAwait, pulumi.com/waitFor).
SKIP_AWAIT = "pulumi.com/skipAwait"
WAIT_FOR = "pulumi.com/waitFor"
# pulumi-kubernetes applies server-side; with this annotation an apply that meets another field
# manager's field takes it instead of failing. The LeaderWorkerSet needs it for spec.replicas: an
# HPA writes it through the scale subresource (field manager kube-controller-manager), so once
# autoscaling is turned off (maxReplicas back to replicas, ignoreChanges on spec.replicas gone) the
# next apply of spec.replicas would otherwise fail with a field conflict. While autoscaling is on,
# ignoreChanges keeps spec.replicas out of the apply (the provider drops an ignored field another
# manager owns; provider/pkg/await/await.go, handleSSAIgnoreFields), so forcing never undoes the
# HPA. Always set: the stack cannot know whether an earlier update had autoscaling on.
PATCH_FORCE = "pulumi.com/patchForce"
# serviceType=InternalLoadBalancer: a LoadBalancer Service with GKE's internal annotation gets an
# internal passthrough Network Load Balancer (an IP in the VPC, never a public one). Its IP is what
# clients need, so instead of skipping the await the Service waits for that IP only: a waitFor
# annotation replaces the Service's default await (pulumi-kubernetes >= 4.18.4), so `pulumi up`
# waits the minute or two GKE takes to create the forwarding rule, not for the pods.
INTERNAL_LB_ANNOTATION = "networking.gke.io/load-balancer-type"
LOAD_BALANCER_IP_PATH = "{.status.loadBalancer.ingress[0].ip}"
HTTP_PORT_NAME = "jetstream-http"
GRPC_PORT_NAME = "jetstream-grpc"
OPENAI_PATH = "/v1"
CLIENT_OUTPUTS = ("httpUrl", "grpcTarget", "openaiBaseUrl")  # the stack outputs of client_endpoints
# waitForReady timeout: the slice's nodes joining, multi-GB image pulls and the LWS controller's
# reconcile before the startup delay even starts, then the restore at up to twice the preset's
# estimate.
READY_MARGIN_SECONDS = 30 * 60
READY_RESTORE_FACTOR = 2


def app_labels(cfg: StackConfig) -> dict[str, str]:
    """The one label set: on the leader pod template and as the Service selector."""
    return {"app": cfg.app_name}


def ready_timeout_seconds(cfg: StackConfig) -> int:
    """How long `pulumi up` waits for the LeaderWorkerSet to become Available (waitForReady)."""
    return READY_MARGIN_SECONDS + READY_RESTORE_FACTOR * cfg.startup_probe_delay_seconds


# ---------------------------------------------------------------------------------------------
# Server command line.


def _derived_flags(cfg: StackConfig, axis_flags: Mapping[str, int]) -> dict[str, str]:
    flags = {
        "tokenizer_path": cfg.model.tokenizer_path,
        "model_name": cfg.model.maxtext_model_name,
        "load_parameters_path": local_checkpoint(cfg) if cfg.bundled else cfg.checkpoint_path,
        "max_prefill_predict_length": str(cfg.max_prefill_length),
        "max_target_length": str(cfg.max_target_length),
        # The axes the plan used (a -1 stays -1: the server fills it in exactly as the planner did).
        **{f"ici_{axis}_parallelism": str(size) for axis, size in axis_flags.items()},
        "per_device_batch_size": str(cfg.per_device_batch_size),
        "quantize_kvcache": "true" if cfg.quantize_kv_cache else "false",
    }
    if cfg.quantization == "int8":
        flags |= {"quantization": "int8", "checkpoint_is_quantized": "true"}
    return flags


def _bundled_memory_flags(cfg: StackConfig) -> dict[str, str]:
    """Every flag that decides the bundled server's memory, stated rather than left to its
    defaults, so the planner's figures stay true when those defaults change."""
    int8 = cfg.quantization == "int8"
    # A .npz int8 checkpoint is the offline converter's output; GGUF tensors are dequantized on
    # load and quantized to int8 by the server.
    return {
        "weight_dtype": BUNDLED_DTYPE,
        "dtype": BUNDLED_DTYPE,
        "quantization": "int8" if int8 else "",
        "checkpoint_is_quantized": "true" if int8 and not cfg.checkpoint_file.endswith(".gguf") else "false",
        "quantize_kvcache": "true" if cfg.quantize_kv_cache else "false",
    }


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


def maxtext_args(cfg: StackConfig, axis_flags: Mapping[str, int]) -> tuple[str, ...]:
    """jax-tpu args: the base config, then key=value flags in the recipe's order.

    `axis_flags` are the ici_* values the plan used (Plan.axis_flags). Recipe flags come in
    `flag_order`; mode flags (and, for the bundled server, its memory flags; for JetStream with
    autoscaling, its Prometheus port) are always present; `serverFlags` overrides replace a value
    in place or are appended.
    """
    runtime_flags = _bundled_memory_flags(cfg) if cfg.bundled else jetstream_server_flags(cfg.scaling)
    always = {**_mode_flags(cfg), **runtime_flags}
    values = {**cfg.model.fixed_flags, **_derived_flags(cfg, axis_flags), **always}
    order = [key for key in cfg.model.flag_order if key in values]
    order += [key for key in always if key not in order]
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
    failures = cfg.model.probe_failure_threshold
    return {
        "startup_probe": _health_probe(period=STARTUP_PERIOD_SECONDS, failures=STARTUP_FAILURE_THRESHOLD, delay=cfg.startup_probe_delay_seconds),
        "liveness_probe": _health_probe(period=HEALTH_PERIOD_SECONDS, failures=failures),
        "readiness_probe": _health_probe(period=HEALTH_PERIOD_SECONDS, failures=failures),
    }


def jax_server(cfg: StackConfig, plan: Plan) -> lws.Container:
    """The seed's JetStream/MaxText server on the Pathways leader (serverRuntime=jetstream)."""
    disaggregated = cfg.mode == "disaggregated"
    return lws.Container(
        name=SERVER_CONTAINER,
        image=cfg.images["jetstreamImage"],
        args=maxtext_args(cfg, plan.axis_flags),
        env=(lws.EnvVar(name="LOG_LEVEL", value="INFO"),) if disaggregated else None,
        image_pull_policy=PULL_POLICY,
        # The seed's disaggregated server runs with these capabilities (KV transfer between slices).
        security_context=lws.SecurityContext(capabilities=lws.Capabilities(add=("SYS_PTRACE", "NET_ADMIN", "SYS_TIME"))) if disaggregated else None,
        ports=_port(GRPC_PORT),
        **_server_probes(cfg),
    )


def bundled_server(cfg: StackConfig, plan: Plan, image: Any, leader: bool) -> lws.Container:
    """This repository's server, one per TPU host (serverRuntime=bundled).

    Every pod runs the same command line; only the leader (process 0) binds HTTP and gRPC, so
    only it declares those ports and carries the /healthcheck probes. A worker whose leader is
    gone exits non-zero, and a leader that loses a worker fails /healthcheck: either way LWS
    recreates the whole group.
    """
    front_ends = (*_port(HTTP_PORT, "http"), *_port(GRPC_PORT, "grpc")) if leader else ()
    return lws.Container(
        name=SERVER_CONTAINER,
        image=image,
        command=BUNDLED_COMMAND,
        args=maxtext_args(cfg, plan.axis_flags),
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


def server_image(cfg: StackConfig) -> str:
    """The bundled server's image: the configured one, or the tag the stack's own build pushes
    (`pulumi up` runs that build by digest instead, see resources/server_image.py)."""
    return cfg.images.get("bundledServerImage") or f"{cfg.bundled_image_repository}:{BUNDLED_IMAGE_TAG}"


# ---------------------------------------------------------------------------------------------
# Objects.

TPU_TOLERATION = lws.Toleration(key=tpu.TPU_RESOURCE, operator="Exists", effect="NoSchedule")


def node_selector(cfg: StackConfig) -> dict[str, str]:
    """The slice's accelerator and topology, on this stack's own TPU pools only."""
    return {**cfg.tpu_slice.node_selector, DEPLOYMENT_LABEL: cfg.deployment_id}


def _pod_spec(cfg: StackConfig, containers: tuple[lws.Container, ...], **extra) -> lws.PodSpec:
    """A pod on this stack's TPU nodes, running as the stack's Kubernetes service account."""
    return lws.PodSpec(
        node_selector=node_selector(cfg),
        tolerations=(TPU_TOLERATION,),
        service_account_name=cfg.kubernetes_service_account,
        containers=containers,
        **extra,
    )


def _bundled_pod_spec(cfg: StackConfig, plan: Plan, image: Any, leader: bool) -> lws.PodSpec:
    return _pod_spec(
        cfg, (bundled_server(cfg, plan, image, leader),),
        init_containers=(checkpoint_copy(cfg),),
        volumes=(lws.Volume(name=MODELS_VOLUME, empty_dir=lws.EmptyDirVolumeSource()),),
    )


def lws_size(cfg: StackConfig, plan: Plan) -> int:
    """Pods per LWS group: Pathways adds a leader to the TPU hosts; the bundled leader is a TPU host."""
    if cfg.bundled:
        return plan.slices * plan.hosts_per_slice
    return cfg.tpu_slice.lws_size(plan.slices)


def _pod_templates(cfg: StackConfig, plan: Plan, image: Any) -> tuple[lws.PodSpec, lws.PodSpec]:
    """(leader, worker) pod specs of the runtime's layout."""
    if cfg.bundled:
        return _bundled_pod_spec(cfg, plan, image, leader=True), _bundled_pod_spec(cfg, plan, image, leader=False)
    leader = (pathways_proxy(cfg), pathways_resource_manager(cfg, plan), jax_server(cfg, plan), jetstream_http(cfg))
    return _pod_spec(cfg, leader), _pod_spec(cfg, (pathways_worker(cfg),))


def _sub_group_policy(cfg: StackConfig, plan: Plan) -> lws.SubGroupPolicy | None:
    """One subgroup per slice in disaggregated mode (Pathways only, config.py refuses it with the
    bundled server); the leader holds no TPU, so it belongs to none of them."""
    if cfg.mode != "disaggregated":
        return None
    return lws.SubGroupPolicy(sub_group_policy_type=lws.LEADER_EXCLUDED, sub_group_size=plan.hosts_per_slice)


def _lws_annotations(cfg: StackConfig) -> dict[str, str]:
    # One LWS group per node pool (slice); in disaggregated mode one subgroup per slice.
    exclusivity = lws.SUBGROUP_EXCLUSIVE_TOPOLOGY if cfg.mode == "disaggregated" else lws.EXCLUSIVE_TOPOLOGY
    await_available = {WAIT_FOR: f"condition={lws.AVAILABLE}"} if cfg.wait_for_ready else {}
    return {exclusivity: NODE_POOL_LABEL, PATCH_FORCE: "true", **await_available}


def leader_worker_set_model(cfg: StackConfig, plan: Plan, image: Any = None) -> lws.LeaderWorkerSet:
    """The LeaderWorkerSet; `image` replaces the bundled server's image (the stack's own build,
    by digest, an Output under Pulumi)."""
    leader_spec, worker_spec = _pod_templates(cfg, plan, server_image(cfg) if image is None else image)
    return lws.LeaderWorkerSet(
        metadata=lws.ObjectMeta(name=cfg.app_name, namespace=cfg.namespace, annotations=_lws_annotations(cfg)),
        spec=lws.LeaderWorkerSetSpec(
            replicas=cfg.scaling.replicas,  # the HPA changes it when autoscaling (JetStreamServer ignores that drift)
            leader_worker_template=lws.LeaderWorkerTemplate(
                sub_group_policy=_sub_group_policy(cfg, plan),
                # The app label only on the leader: the Service reaches the leader pod only.
                leader_template=lws.PodTemplateSpec(metadata=lws.ObjectMeta(labels=app_labels(cfg)), spec=leader_spec),
                size=lws_size(cfg, plan),
                worker_template=lws.PodTemplateSpec(spec=worker_spec),
            ),
        ),
    )


def leader_worker_set(cfg: StackConfig, plan: Plan, image: Any = None) -> dict:
    return leader_worker_set_model(cfg, plan, image).to_dict()


def service(cfg: StackConfig) -> dict:
    """HTTP (JetStream's /generate and the bundled server's OpenAI API) and gRPC (JetStream's
    Orchestrator service) of every replica's leader. The gRPC target port is 9000 in both runtimes:
    MaxText's maxengine_server starts JetStream's gRPC server on 9000 in jax-tpu, and the bundled
    server is started with --grpc-port 9000 (BUNDLED_COMMAND)."""
    internal = cfg.service_type == INTERNAL_LOAD_BALANCER
    annotations = {WAIT_FOR: f"jsonpath={LOAD_BALANCER_IP_PATH}", INTERNAL_LB_ANNOTATION: "Internal"} if internal else {SKIP_AWAIT: "true"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": cfg.service_name, "namespace": cfg.namespace, "annotations": annotations},
        "spec": {
            "type": "LoadBalancer" if internal else "ClusterIP",
            "selector": app_labels(cfg),
            "ports": [
                {"protocol": "TCP", "name": HTTP_PORT_NAME, "port": HTTP_PORT, "targetPort": HTTP_PORT},
                {"protocol": "TCP", "name": GRPC_PORT_NAME, "port": GRPC_PORT, "targetPort": GRPC_PORT},
            ],
        },
    }


def service_host(*, service_type: str, name: str, namespace: str, load_balancer_ip: str | None) -> str:
    """Where clients reach the live Service: the internal load balancer's IP, or the cluster DNS name."""
    if service_type == "LoadBalancer":
        if not load_balancer_ip:
            raise ValueError(f"Service {namespace}/{name} has no load balancer IP yet (status.loadBalancer.ingress is empty)")
        return load_balancer_ip
    return f"{name}.{namespace}.svc.cluster.local"


def client_endpoints(host: str, ports: Mapping[str, int], *, openai: bool) -> dict[str, str]:
    """The stack outputs clients use, from the live Service's host and its ports by name.

    `openai`: the server behind the HTTP port serves the OpenAI API (the bundled server does;
    JetStream's jetstream-http front end serves /generate only, so its openaiBaseUrl is "").
    """
    http = f"http://{host}:{ports[HTTP_PORT_NAME]}"
    return dict(zip(CLIENT_OUTPUTS, (http, f"{host}:{ports[GRPC_PORT_NAME]}", f"{http}{OPENAI_PATH}" if openai else "")))


def namespace(cfg: StackConfig) -> dict | None:
    """The stack's Namespace, or None for `default` (which every cluster has)."""
    if cfg.namespace == "default":
        return None
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.namespace}}


def service_account(cfg: StackConfig, gsa_email: Any = None) -> dict:
    """The Kubernetes service account of the pods.

    With Workload Identity (the bundled server) it is bound to the workload GSA: `gsa_email`
    defaults to the email GCP derives for it; `JetStreamServer` passes the created account's email
    (a Pulumi Output, so the KSA waits for the GSA). Pathways pods act as the node service account
    (node_pools.py), so their KSA carries no binding.
    """
    metadata: dict[str, Any] = {"name": cfg.kubernetes_service_account, "namespace": cfg.namespace}
    if cfg.pods_use_workload_identity:
        metadata["annotations"] = {GSA_ANNOTATION: cfg.workload_service_account_email if gsa_email is None else gsa_email}
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}


def serving_manifests(cfg: StackConfig, plan: Plan) -> list[dict]:
    """The workload objects, in apply order."""
    return [leader_worker_set(cfg, plan), service(cfg)]


def scaling_manifests(cfg: StackConfig) -> list[dict]:
    """The PodMonitoring and the HPA of the LeaderWorkerSet; nothing unless autoscaling."""
    if not cfg.scaling.enabled:
        return []
    return autoscaling_manifests(cfg.scaling, namespace=cfg.namespace, lws_name=cfg.app_name,
                                 endpoint=metrics_endpoint(bundled=cfg.bundled, server_flags=cfg.server_flags),
                                 startup_delay_seconds=cfg.startup_probe_delay_seconds)


def routed_pool(cfg: StackConfig) -> inference_gateway.RoutedPool:
    """What the stack's gateway routes to: the Service's leader pods on the HTTP port."""
    return inference_gateway.RoutedPool(
        name=cfg.app_name,
        namespace=cfg.namespace,
        selector=app_labels(cfg),
        target_port=HTTP_PORT,
        health_path=HEALTH_PATH,
        gateway_class=cfg.gateway.gateway_class,
        protocol=inference_gateway.PROTOCOL_RUNTIMES[cfg.server_runtime],
    )


def gateway_manifests(cfg: StackConfig) -> list[dict]:
    """The Gateway, HTTPRoute, InferencePool, endpoint picker and GKE policies; nothing with gateway=none."""
    return inference_gateway.gateway_manifests(routed_pool(cfg)) if cfg.gateway.enabled else []


def through_gateway(endpoints: Mapping[str, str], gateway_url: str) -> dict[str, str]:
    """The client endpoints with HTTP and the OpenAI API through the gateway; gRPC stays on the
    Service (the HTTPRoute carries HTTP only)."""
    return {**endpoints, "httpUrl": gateway_url, "openaiBaseUrl": f"{gateway_url}{OPENAI_PATH}"}


def all_manifests(cfg: StackConfig, plan: Plan) -> list[dict]:
    """Everything a fresh cluster (with the LWS controller) needs, in apply order (the metrics
    adapter that autoscaling also needs is installed from its own manifest, see autoscaling.py;
    the gateway's cluster-wide parts, components/core/gateway.py, come with the cluster)."""
    prerequisites = [document for document in (namespace(cfg), service_account(cfg)) if document is not None]
    return [*prerequisites, *serving_manifests(cfg, plan), *scaling_manifests(cfg), *gateway_manifests(cfg)]


def head_pod(cfg: StackConfig) -> str:
    """Name of the leader pod of the first LWS group (replica 0)."""
    return f"{cfg.app_name}-0"


def service_url(cfg: StackConfig) -> str:
    return f"http://{cfg.service_name}.{cfg.namespace}.svc.cluster.local:{HTTP_PORT}"


def port_forward_command(cfg: StackConfig) -> str:
    return f"kubectl -n {cfg.namespace} port-forward pod/{head_pod(cfg)} {HTTP_PORT}:{HTTP_PORT}"


def curl_example() -> str:
    body = '{"prompt": "What are the top 5 programming languages", "max_tokens": 200}'
    return f"curl -X POST localhost:{HTTP_PORT}/generate -H 'Content-type: application/json' -d '{body}'"
