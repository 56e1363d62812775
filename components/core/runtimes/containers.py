"""Container pieces more than one runtime uses: pull policy, ports, the TPU request, the probes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.core import lws_model as lws
from components.core import tpu
from serving.protocol import HTTP_PORT

if TYPE_CHECKING:
    from components.core.config import StackConfig

PULL_POLICY = "IfNotPresent"  # images are pinned, so a node's cached copy is the right one
LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"  # expanded by Kubernetes from the env LWS injects
SERVER_CONTAINER = "jax-tpu"  # the MaxText/JetStream server's container name in the reference YAMLs
# The pod's own name in its environment, for per-pod cache directories: `$(POD_NAME)` in a later env
# value or argument is expanded by Kubernetes, and LWS pods keep their names across restarts.
POD_NAME_ENV = "POD_NAME"
POD_NAME = f"$({POD_NAME_ENV})"

# Probes of the server's health path (the reference YAMLs' values). The startup probe polls every
# second from the restore-time delay on and tolerates a restore up to STARTUP_FAILURE_THRESHOLD
# seconds longer than the estimate; liveness and readiness then check once a minute and restart or
# unready the pod after the preset's failure threshold (a busy server can miss a probe or two).
STARTUP_PERIOD_SECONDS = 1
STARTUP_FAILURE_THRESHOLD = 10000
HEALTH_PERIOD_SECONDS = 60


def port(number: int, name: str | None = None) -> tuple[lws.ContainerPort, ...]:
    return (lws.ContainerPort(container_port=number, name=name),)


def tpu_limits(cfg: StackConfig) -> lws.ResourceRequirements:
    """Every chip of the pod's host."""
    return lws.ResourceRequirements(limits={tpu.TPU_RESOURCE: cfg.tpu_slice.tpu_request})


def health_probe(path: str, period: int, failures: int, delay: int | None = None) -> lws.Probe:
    return lws.Probe(
        http_get=lws.HTTPGetAction(path=path, port=HTTP_PORT),
        period_seconds=period,
        initial_delay_seconds=delay,
        failure_threshold=failures,
    )


def server_probes(cfg: StackConfig, path: str, readiness_period: int = HEALTH_PERIOD_SECONDS) -> dict[str, lws.Probe]:
    """Startup (from the preset's restore-time delay on), liveness and readiness on `path`."""
    failures = cfg.model.probe_failure_threshold
    startup = health_probe(path, STARTUP_PERIOD_SECONDS, STARTUP_FAILURE_THRESHOLD, cfg.startup_probe_delay_seconds)
    return {
        "startup_probe": startup,
        "liveness_probe": health_probe(path, HEALTH_PERIOD_SECONDS, failures),
        "readiness_probe": health_probe(path, readiness_period, failures),
    }


def pod_name_env() -> lws.EnvVar:
    """POD_NAME_ENV from the downward API (the pod's metadata.name)."""
    return lws.EnvVar(
        name=POD_NAME_ENV, value_from=lws.EnvVarSource(field_ref=lws.ObjectFieldSelector(field_path="metadata.name"))
    )


def generate_request(http_port: int) -> str:
    """A first request to JetStream's /generate (jetstream-http and the bundled server serve it)."""
    body = '{"prompt": "What are the top 5 programming languages", "max_tokens": 200}'
    return f"curl -X POST localhost:{http_port}/generate -H 'Content-type: application/json' -d '{body}'"
