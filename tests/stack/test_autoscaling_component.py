"""LeaderWorkerSetAutoscaler under Pulumi mocks: one HPA on the LWS by name, the adapter and its
least-privilege identity, the PodMonitoring; nothing at all when autoscaling is off."""

from __future__ import annotations

import asyncio

import pulumi
import pulumi.runtime.settings
import pulumi_kubernetes as k8s
import pytest

from components.core import autoscaling
from components.core.autoscaling import MetricsEndpoint, parse_autoscaling
from components.resources.autoscaling import AutoscalingArgs, LeaderWorkerSetAutoscaler

from pulumi_harness import GCP_PROJECT, PROJECT, Recording, RecordingMocks, RecordingMonitor

COMPONENT = "jetstream:autoscaling:LeaderWorkerSetAutoscaler"
HPA = "kubernetes:autoscaling/v2:HorizontalPodAutoscaler"
POD_MONITORING = "kubernetes:monitoring.googleapis.com/v1:PodMonitoring"
CONFIG_FILE = "kubernetes:yaml/v2:ConfigFile"
IAM_MEMBER = "gcp:projects/iAMMember:IAMMember"
K8S_PROVIDER = "pulumi:providers:kubernetes"
GET_PROJECT = "gcp:organizations/getProject:getProject"
PROJECT_NUMBER = "123456789012"
LWS_NAME = "jetstream-pathways"
NAMESPACE = "jetstream"


class ProjectMocks(RecordingMocks):
    """The harness's mocks, plus the project number GCP would return for the project."""

    def call(self, args: pulumi.runtime.MockCallArgs):
        if args.token == GET_PROJECT:
            self.calls.append((args.token, dict(args.args)))
            return {"projectId": args.args["projectId"], "number": PROJECT_NUMBER}
        return super().call(args)


def run_autoscaler(raw: dict[str, str]) -> Recording:
    """Create the component (with a provider and a stand-in for the LWS it waits on) under mocks."""
    mocks = ProjectMocks()
    monitor = RecordingMonitor(mocks)
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.settings.ROOT.set(None)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack="test", preview=False, monitor=monitor)
    args = AutoscalingArgs(scaling=parse_autoscaling(raw), project=GCP_PROJECT, namespace=NAMESPACE, lws_name=LWS_NAME,
                           endpoint=MetricsEndpoint(port=9090, path="/"), startup_delay_seconds=900)

    @pulumi.runtime.test
    def program():
        provider = k8s.Provider("k8s", kubeconfig="apiVersion: v1")
        workload = k8s.core.v1.ConfigMap("workload", opts=pulumi.ResourceOptions(provider=provider))
        autoscaler = LeaderWorkerSetAutoscaler("autoscaler", args, provider=provider, depends_on=[workload])
        return autoscaler.urn

    program()
    return Recording(resources=monitor.registered, outputs={}, secret_outputs=set(), calls=mocks.calls)


@pytest.fixture(scope="module")
def on() -> Recording:
    return run_autoscaler({"replicas": "1", "maxReplicas": "3", "autoscalingMetric": "slots-used"})


def test_exactly_one_hpa_targets_the_leader_worker_set_by_name(on):
    hpa = on.one(HPA)
    assert hpa.inputs["metadata"] == {"name": LWS_NAME, "namespace": NAMESPACE}
    spec = hpa.inputs["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "name": LWS_NAME}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 3)
    assert spec["metrics"][0]["pods"]["metric"]["name"] == "prometheus.googleapis.com|jetstream_slots_used_percentage|gauge"
    assert spec["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "800m"}
    assert spec["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 1800}}


def test_pod_monitoring_scrapes_the_leaders(on):
    pod_monitoring = on.one(POD_MONITORING)
    assert pod_monitoring.inputs["metadata"] == {"name": LWS_NAME, "namespace": NAMESPACE}
    assert pod_monitoring.inputs["spec"]["selector"]["matchLabels"] == autoscaling.leader_pod_labels(LWS_NAME)
    assert pod_monitoring.inputs["spec"]["endpoints"] == [{"port": 9090, "path": "/", "interval": "15s"}]


def test_adapter_is_the_pinned_production_manifest(on):
    adapter = on.one(CONFIG_FILE)
    assert adapter.inputs["file"] == autoscaling.ADAPTER_MANIFEST_URL
    assert f"/{autoscaling.ADAPTER_COMMIT}/" in autoscaling.ADAPTER_MANIFEST_URL
    assert autoscaling.ADAPTER_MANIFEST_URL.endswith("/custom-metrics-stackdriver-adapter/deploy/production/adapter_new_resource_model.yaml")


def test_adapter_identity_is_monitoring_viewer_for_its_workload_identity_principal_only(on):
    access = on.one(IAM_MEMBER)
    assert access.inputs == {
        "project": GCP_PROJECT,
        "role": "roles/monitoring.viewer",
        "member": f"principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/"
                  f"{GCP_PROJECT}.svc.id.goog/subject/ns/custom-metrics/sa/custom-metrics-stackdriver-adapter",
    }
    assert (GET_PROJECT, {"projectId": GCP_PROJECT}) in on.calls


def test_children_are_parented_and_use_the_explicit_provider(on):
    component = on.one(COMPONENT)
    provider = on.one(K8S_PROVIDER)
    for type_ in (HPA, POD_MONITORING, CONFIG_FILE, IAM_MEMBER):
        child = on.one(type_)
        assert child.parent == component.urn, type_
        if type_ != IAM_MEMBER:
            assert child.provider.startswith(provider.urn), type_


def test_hpa_waits_for_the_adapter_its_access_and_the_workload(on):
    hpa = on.one(HPA)
    workload = on.one("kubernetes:core/v1:ConfigMap")
    assert {on.one(CONFIG_FILE).urn, on.one(IAM_MEMBER).urn, workload.urn} <= set(hpa.dependencies)
    assert workload.urn in on.one(POD_MONITORING).dependencies


@pytest.mark.parametrize("raw", [{}, {"replicas": "3"}, {"replicas": "2", "maxReplicas": "2"}])
def test_nothing_is_created_when_autoscaling_is_off(raw):
    recording = run_autoscaler(raw)
    component = recording.one(COMPONENT)
    assert [resource.type for resource in recording.resources if resource.parent == component.urn] == []
    assert not any(token == GET_PROJECT for token, _ in recording.calls)
