"""Kubernetes manifests as pure functions: (config, plan) -> dict.

The LeaderWorkerSet is built through the typed model in `lws_model` and follows the seed's
reference YAMLs container for container: a leader pod with the Pathways proxy, the Pathways
resource manager, the JetStream/MaxText server (`jax-tpu`) and the JetStream HTTP front end, and
one Pathways worker per TPU host. The Service selects the leader through the same label set.
`JetStreamServer` wraps these dicts; `components.render` prints them; the tests diff them against
the reference YAMLs.
"""

from __future__ import annotations

from components import lws_model as lws
from components import tpu
from components.config import StackConfig
from components.planner import Plan

PROXY_PORT = 38681
RESOURCE_MANAGER_PORT = 38677
WORKER_PORT = 38679
GRPC_PORT = 9000
HTTP_PORT = 8000
HEALTH_PATH = "/healthcheck"
PULL_POLICY = "IfNotPresent"  # images are pinned, so a node's cached copy is the right one
LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"  # expanded by Kubernetes from the env LWS injects
NODE_POOL_LABEL = "cloud.google.com/gke-nodepool"
DISAGGREGATED_SERVER = "ExperimentalMaxtextDisaggregatedServer_8"
# The bundled server (serving/ in this repository) serves HTTP itself, so it replaces both
# jax-tpu's JetStream command and the jetstream-http sidecar.
BUNDLED_COMMAND = ("python", "-m", "serving", "--host", "0.0.0.0",
                   "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT))


def app_labels(cfg: StackConfig) -> dict[str, str]:
    """The one label set: on the leader pod template and as the Service selector."""
    return {"app": cfg.app_name}


# ---------------------------------------------------------------------------------------------
# Server command line.


def _derived_flags(cfg: StackConfig) -> dict[str, str]:
    flags = {
        "tokenizer_path": cfg.model.tokenizer_path,
        "model_name": cfg.model.maxtext_model_name,
        "load_parameters_path": cfg.checkpoint_path,
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
    return flags


def _mode_flags(cfg: StackConfig) -> dict[str, str]:
    if cfg.mode == "disaggregated":
        return {"stack_prefill_result_cache": "True", "inference_server": DISAGGREGATED_SERVER, **cfg.model.disaggregated_flags}
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


def _port(number: int) -> tuple[lws.ContainerPort, ...]:
    return (lws.ContainerPort(container_port=number),)


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


def jax_server(cfg: StackConfig) -> lws.Container:
    disaggregated = cfg.mode == "disaggregated"
    bundled = cfg.server_runtime == "bundled"
    return lws.Container(
        name="jax-tpu",
        image=cfg.images["bundledServerImage" if bundled else "jetstreamImage"],
        command=BUNDLED_COMMAND if bundled else None,
        args=maxtext_args(cfg),
        env=(lws.EnvVar(name="LOG_LEVEL", value="INFO"),) if disaggregated else None,
        image_pull_policy=PULL_POLICY,
        # The seed's disaggregated server runs with these capabilities (KV transfer between slices).
        security_context=lws.SecurityContext(capabilities=lws.Capabilities(add=("SYS_PTRACE", "NET_ADMIN", "SYS_TIME"))) if disaggregated else None,
        ports=(*_port(GRPC_PORT), *(_port(HTTP_PORT) if bundled else ())),
        startup_probe=_health_probe(period=1, failures=10000, delay=cfg.startup_probe_delay_seconds),
        liveness_probe=_health_probe(period=60, failures=cfg.model.probe_failure_threshold),
        readiness_probe=_health_probe(period=60, failures=cfg.model.probe_failure_threshold),
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


def _leader_containers(cfg: StackConfig, plan: Plan) -> tuple[lws.Container, ...]:
    pathways = (pathways_proxy(cfg), pathways_resource_manager(cfg, plan))
    if cfg.server_runtime == "bundled":
        return (*pathways, jax_server(cfg))
    return (*pathways, jax_server(cfg), jetstream_http(cfg))


def leader_worker_set_model(cfg: StackConfig, plan: Plan) -> lws.LeaderWorkerSet:
    disaggregated = cfg.mode == "disaggregated"
    # One LWS group per node pool (slice); in disaggregated mode one subgroup per slice.
    exclusivity = lws.SUBGROUP_EXCLUSIVE_TOPOLOGY if disaggregated else lws.EXCLUSIVE_TOPOLOGY
    return lws.LeaderWorkerSet(
        metadata=lws.ObjectMeta(name=cfg.app_name, namespace=cfg.namespace, annotations={exclusivity: NODE_POOL_LABEL}),
        spec=lws.LeaderWorkerSetSpec(
            replicas=1,
            leader_worker_template=lws.LeaderWorkerTemplate(
                sub_group_policy=lws.SubGroupPolicy(sub_group_size=plan.hosts_per_slice) if disaggregated else None,
                leader_template=lws.PodTemplateSpec(
                    metadata=lws.ObjectMeta(labels=app_labels(cfg)),
                    spec=_pod_spec(cfg, _leader_containers(cfg, plan)),
                ),
                size=cfg.tpu_slice.lws_size(plan.slices),
                worker_template=lws.PodTemplateSpec(spec=_pod_spec(cfg, (pathways_worker(cfg),))),
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


def serving_manifests(cfg: StackConfig, plan: Plan) -> list[dict]:
    """The workload objects, in apply order."""
    return [leader_worker_set(cfg, plan), service(cfg)]


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
