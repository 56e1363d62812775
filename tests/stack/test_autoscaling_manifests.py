"""Autoscaling manifests: the HPA with kubernetes-validate, the PodMonitoring with its CRD's schema,
a LeaderWorkerSet with replicas > 1 with the LWS CRD schema, and the metrics both servers export."""

from __future__ import annotations

import copy
import dataclasses

import jsonschema
import kubernetes_validate
import pytest
from prometheus_client.parser import text_string_to_metric_families

from components.core import lws_model, manifests
from components.core.autoscaling import METRICS, MetricsEndpoint
from components.core.config_scaling import parse_autoscaling
from components.core.errors import ConfigError
from components.core.manifests import autoscaling_manifests
from components.core.runtimes import bundled, pathways
from serving.server.metrics import ServerMetrics
from tests.stack.stack_helpers import bundled_example, example, lws_validator, pod_monitoring_validator

K8S_VERSION = "1.33.0"
STACKS = ("llama3-405b-v6e16", "llama2-70b-disagg", "llama3-8b-v6e8")
ON = {"replicas": "1", "maxReplicas": "3"}


def rendered(stack: str, raw: dict[str, str], bundled: bool = False) -> tuple[list[dict], object]:
    cfg, _ = bundled_example(stack) if bundled else example(stack)
    endpoint = cfg.runtime.metrics_endpoint(cfg)
    documents = autoscaling_manifests(
        parse_autoscaling(raw),
        namespace=cfg.names.namespace,
        lws_name=cfg.names.app_name,
        endpoint=endpoint,
        startup_delay_seconds=cfg.startup_probe_delay_seconds,
    )
    return documents, cfg


@pytest.mark.parametrize("stack", STACKS)
def test_nothing_is_rendered_when_autoscaling_is_off(stack):
    for raw in ({}, {"replicas": "2"}, {"replicas": "3", "maxReplicas": "3"}):
        documents, cfg = rendered(stack, raw)
        assert documents == []
        assert pathways.jetstream_server_flags(dataclasses.replace(cfg, scaling=parse_autoscaling(raw))) == {}


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("metric", list(METRICS))
def test_hpa_validates_with_kubernetes_validate(stack, metric):
    (_, hpa), _ = rendered(stack, {**ON, "autoscalingMetric": metric})
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


def test_kubernetes_validate_catches_a_bad_hpa():
    (_, hpa), _ = rendered("llama3-405b-v6e16", ON)
    broken = copy.deepcopy(hpa)
    broken["spec"]["stabilizationWindowSeconds"] = broken["spec"].pop("behavior")["scaleDown"][
        "stabilizationWindowSeconds"
    ]  # misplaced
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_hpa_targets_the_leader_worker_set_by_name():
    (_, hpa), cfg = rendered(
        "llama2-70b-disagg",
        {"replicas": "2", "maxReplicas": "5", "autoscalingMetric": "slots-used", "autoscalingTarget": "0.7"},
    )
    lws = manifests.leader_worker_set(*example("llama2-70b-disagg")).to_dict()
    assert hpa["metadata"]["namespace"] == lws["metadata"]["namespace"] == cfg.names.namespace
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": lws["apiVersion"],
        "kind": lws["kind"],
        "name": lws["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "prometheus.googleapis.com|jetstream_slots_used_percentage|gauge"},
                "target": {"type": "AverageValue", "averageValue": "700m"},
            },
        }
    ]
    # llama2-70b restores its checkpoint for 240 s: two warm-ups before a replica goes.
    assert hpa["spec"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 480}}


@pytest.mark.parametrize("stack", STACKS)
def test_pod_monitoring_validates_against_the_strict_crd_schema(stack):
    (pod_monitoring, _), _ = rendered(stack, ON)
    pod_monitoring_validator().validate(pod_monitoring)


@pytest.mark.parametrize(
    "misplaced",
    [
        lambda doc: doc["spec"].update(interval="15s"),  # belongs to an endpoint
        lambda doc: doc["spec"]["endpoints"][0].update(port=[9090]),
        lambda doc: doc["spec"]["selector"].update(labels={"app": "x"}),
        lambda doc: doc["spec"].pop("endpoints"),
    ],
)
def test_strict_pod_monitoring_schema_rejects_a_wrong_document(misplaced):
    (pod_monitoring, _), _ = rendered("llama3-405b-v6e16", ON)
    broken = copy.deepcopy(pod_monitoring)
    misplaced(broken)
    with pytest.raises(jsonschema.ValidationError):
        pod_monitoring_validator().validate(broken)


def test_pod_monitoring_scrapes_the_leaders_the_hpa_averages_over():
    (pod_monitoring, hpa), cfg = rendered("llama3-405b-v6e16", ON)
    assert pod_monitoring["metadata"]["namespace"] == hpa["metadata"]["namespace"] == cfg.names.namespace
    # LWS's scale subresource hands the HPA status.hpaPodSelector: name=<lws>, worker-index=0.
    assert pod_monitoring["spec"]["selector"] == {
        "matchLabels": {
            "leaderworkerset.sigs.k8s.io/name": cfg.names.app_name,
            "leaderworkerset.sigs.k8s.io/worker-index": "0",
        }
    }
    assert pod_monitoring["spec"]["endpoints"] == [{"port": 9090, "path": "/", "interval": "15s"}]


def test_bundled_server_is_scraped_on_the_http_port_the_stack_starts_it_on():
    (pod_monitoring, _), cfg = rendered("llama3-8b-v6e8", ON, bundled=True)
    [endpoint] = pod_monitoring["spec"]["endpoints"]
    assert endpoint == {"port": 8000, "path": "/metrics", "interval": "15s"}
    assert ("--http-port", str(endpoint["port"])) in zip(bundled.COMMAND, bundled.COMMAND[1:], strict=False)
    pod_monitoring_validator().validate(pod_monitoring)


def _with_server_flags(flags: dict[str, str]):
    cfg, _ = example("llama3-405b-v6e16")
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, flags=flags))


def test_jetstream_gets_its_prometheus_flag_only_when_autoscaling():
    cfg, _ = example("llama3-405b-v6e16")
    assert pathways.jetstream_server_flags(dataclasses.replace(cfg, scaling=parse_autoscaling(ON))) == {
        "prometheus_port": "9090"
    }


def test_a_prometheus_port_in_server_flags_is_the_one_scraped():
    cfg = _with_server_flags({"prometheus_port": "9100"})
    assert cfg.runtime.metrics_endpoint(cfg) == MetricsEndpoint(port=9100, path="/")


@pytest.mark.parametrize("port", ["0", "off", "70000"])
def test_server_flags_that_turn_jetstream_metrics_off_are_refused(port):
    cfg = _with_server_flags({"prometheus_port": port})
    with pytest.raises(ConfigError) as raised:
        cfg.runtime.metrics_endpoint(cfg)
    assert raised.value.keys == ("serverFlags", "maxReplicas")


@pytest.mark.parametrize("stack", STACKS)
def test_leader_worker_set_with_several_replicas_validates_against_the_crd(stack):
    cfg, plan = example(stack)
    scaled = dataclasses.replace(cfg, scaling=parse_autoscaling({"replicas": "3", "maxReplicas": "6"}))
    replicated = manifests.leader_worker_set(scaled, plan).to_dict()
    assert replicated["spec"]["replicas"] == 3
    lws_validator().validate(replicated)


def test_the_crd_schema_rejects_a_non_integer_replica_count():
    cfg, plan = example("llama3-405b-v6e16")
    lws = manifests.leader_worker_set(cfg, plan).to_dict()
    lws["spec"]["replicas"] = "3"
    with pytest.raises(jsonschema.ValidationError):
        lws_validator().validate(lws)


def test_scale_target_is_the_lws_api():
    (_, hpa), _ = rendered("llama3-405b-v6e16", ON)
    target = hpa["spec"]["scaleTargetRef"]
    assert (
        (target["apiVersion"], target["kind"])
        == (lws_model.API_VERSION, lws_model.KIND)
        == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    )


def test_both_metrics_are_gauges_of_the_bundled_server():
    metrics = ServerMetrics(model_name="smollm2-135m")
    metrics.watch(
        prefill_backlog=lambda: 7,
        transfer_backlog=lambda: 0,
        generate_backlog=lambda: 0,
        slots_used_percentage=lambda: 0.25,
        requests_waiting=lambda: 7,
        requests_running=lambda: 1,
        kv_cache_utilization=lambda: 0,
    )
    families = {family.name: family for family in text_string_to_metric_families(metrics.exposition().decode())}
    for metric in METRICS.values():
        assert families[metric.prometheus_name].type == "gauge"
    assert families["jetstream_prefill_backlog_size"].samples[0].value == 7
    assert (
        families["jetstream_slots_used_percentage"].samples[0].value == 0.25
    )  # a fraction, like the slots-used target
