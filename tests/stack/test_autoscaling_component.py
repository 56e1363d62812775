"""MetricsAdapter and LeaderWorkerSetAutoscaler under Pulumi mocks, on their own: the pinned adapter
and its least-privilege identity; the PodMonitoring and the one HPA, exactly the manifests the core
builds, waiting for what they are given. (The stack wires them: test_stack_program.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pulumi
import pulumi.runtime.settings
import pulumi_kubernetes as k8s
import pytest

from components.core import autoscaling, manifests
from components.resources.autoscaling import (
    LeaderWorkerSetAutoscaler,
    LeaderWorkerSetAutoscalerArgs,
    MetricsAdapter,
    MetricsAdapterArgs,
)
from tests.stack.pulumi_harness import GCP_PROJECT, PROJECT, PROJECT_NUMBER, Recording, RecordingMocks, RecordingMonitor
from tests.stack.stack_helpers import example

ADAPTER = "jetstream:autoscaling:MetricsAdapter"
AUTOSCALER = "jetstream:autoscaling:LeaderWorkerSetAutoscaler"
HPA = "kubernetes:autoscaling/v2:HorizontalPodAutoscaler"
POD_MONITORING = "kubernetes:monitoring.googleapis.com/v1:PodMonitoring"
CONFIG_FILE = "kubernetes:yaml/v2:ConfigFile"
IAM_MEMBER = "gcp:projects/iAMMember:IAMMember"
K8S_PROVIDER = "pulumi:providers:kubernetes"
GET_PROJECT = "gcp:organizations/getProject:getProject"


def run_components(create: Callable[[k8s.Provider, pulumi.Resource], None]) -> Recording:
    """Run `create(provider, workload)` under the harness's mocks (the workload: a stand-in the
    components may wait on)."""
    mocks = RecordingMocks()
    monitor = RecordingMonitor(mocks)
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.settings.ROOT.set(None)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack="test", preview=False, monitor=monitor)

    @pulumi.runtime.test
    def program():
        provider = k8s.Provider("k8s", kubeconfig="apiVersion: v1")
        create(provider, k8s.core.v1.ConfigMap("workload", opts=pulumi.ResourceOptions(provider=provider)))

    program()
    return Recording(resources=monitor.registered, outputs={}, secret_outputs=set(), calls=mocks.calls)


@pytest.fixture(scope="module")
def adapter() -> Recording:
    return run_components(
        lambda provider, _: MetricsAdapter(
            "adapter", MetricsAdapterArgs(project=GCP_PROJECT), pulumi.ResourceOptions(provider=provider)
        )
    )


SCALED_STACK = "llama3-8b-autoscale"


@pytest.fixture(scope="module")
def autoscaler() -> Recording:
    cfg, _ = example(SCALED_STACK)
    pod_monitoring, hpa = manifests.scaling_manifests(cfg)

    def create(provider, workload):
        LeaderWorkerSetAutoscaler(
            "autoscaler",
            LeaderWorkerSetAutoscalerArgs(pod_monitoring=pod_monitoring, horizontal_pod_autoscaler=hpa),
            pulumi.ResourceOptions(provider=provider, depends_on=[workload]),
        )

    return run_components(create)


def test_adapter_is_the_pinned_production_manifest(adapter):
    install = adapter.one(CONFIG_FILE)
    assert install.inputs["file"] == autoscaling.ADAPTER_MANIFEST_URL
    assert f"/{autoscaling.ADAPTER_COMMIT}/" in autoscaling.ADAPTER_MANIFEST_URL
    assert autoscaling.ADAPTER_MANIFEST_URL.endswith(
        "/custom-metrics-stackdriver-adapter/deploy/production/adapter_new_resource_model.yaml"
    )


def test_adapter_identity_is_monitoring_viewer_for_its_workload_identity_principal_only(adapter):
    access = adapter.one(IAM_MEMBER)
    assert access.inputs == {
        "project": GCP_PROJECT,
        "role": "roles/monitoring.viewer",
        "member": f"principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/"
        f"{GCP_PROJECT}.svc.id.goog/subject/ns/custom-metrics/sa/custom-metrics-stackdriver-adapter",
    }
    assert (GET_PROJECT, {"projectId": GCP_PROJECT}) in adapter.calls


def test_adapter_children_are_parented_and_the_install_uses_the_explicit_provider(adapter):
    component, provider = adapter.one(ADAPTER), adapter.one(K8S_PROVIDER)
    assert adapter.one(CONFIG_FILE).parent == adapter.one(IAM_MEMBER).parent == component.urn
    assert adapter.one(CONFIG_FILE).provider.startswith(provider.urn)


def test_autoscaler_applies_exactly_the_manifests_the_core_builds(autoscaler):
    cfg, _ = example(SCALED_STACK)
    pod_monitoring, hpa = manifests.scaling_manifests(cfg)
    assert autoscaler.one(HPA).inputs == {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        **{key: hpa[key] for key in ("metadata", "spec")},
    }
    applied = autoscaler.one(POD_MONITORING).inputs
    assert {key: applied[key] for key in ("apiVersion", "kind", "metadata", "spec")} == pod_monitoring
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "name": cfg.names.app_name,
    }


def test_autoscaler_children_wait_for_what_the_component_waits_for(autoscaler):
    component, provider, workload = (
        autoscaler.one(AUTOSCALER),
        autoscaler.one(K8S_PROVIDER),
        autoscaler.one("kubernetes:core/v1:ConfigMap"),
    )
    for type_ in (HPA, POD_MONITORING):
        child = autoscaler.one(type_)
        assert child.parent == component.urn and child.provider.startswith(provider.urn), type_
        assert workload.urn in child.dependencies, type_
