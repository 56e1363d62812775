"""The HPA of the LeaderWorkerSet, its metrics, and the adapter between them.

Thin wrappers over the core (the control loop is documented in `components.core.autoscaling`, the
objects in `components.core.manifests`):

MetricsAdapter, once per cluster (it serves the custom metrics API of the whole cluster):
  * the Custom Metrics Stackdriver Adapter, `kubernetes.yaml.v2.ConfigFile` of its production
    manifest pinned to a commit (namespace custom-metrics, KSA custom-metrics-stackdriver-adapter);
  * its identity: one `gcp.projects.IAMMember` granting `roles/monitoring.viewer` (read-only,
    the least Cloud Monitoring offers) to that KSA's Workload Identity principal, no key and no GSA.
    The principal names the pool PROJECT.svc.id.goog, which exists only once the project's first
    Workload Identity cluster does, so the binding waits for what the component's `depends_on`
    names (program.py: the cluster the stack creates); otherwise IAM refuses it on a first apply.
    The principal is the same for every cluster of the project (one pool per project), so every
    stack that installs an adapter declares the same binding: it is kept when a stack is destroyed
    (`retain_on_delete`), or destroying one stack would stop every other stack's HPA.

LeaderWorkerSetAutoscaler, per workload, from the manifests `components.core.manifests.scaling_manifests`
builds (the ones the offline render prints):
  * the `PodMonitoring` (a CustomResource; GKE's managed collection installs its CRD);
  * the `autoscaling/v2` HorizontalPodAutoscaler targeting the LeaderWorkerSet by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s

from components.core import autoscaling
from components.resources.options import child_after


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsAdapterArgs:
    project: str  # GCP project whose Cloud Monitoring holds the scraped metrics


class MetricsAdapter(pulumi.ComponentResource):
    """The custom metrics API the HPA reads JetStream's metrics from; pass the cluster's provider and, in
    `opts.depends_on`, the cluster the stack creates (its Workload Identity binding waits for it)."""

    install: k8s.yaml.v2.ConfigFile
    access: gcp.projects.IAMMember

    def __init__(self, name: str, args: MetricsAdapterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:autoscaling:MetricsAdapter", name, None, opts)
        self.install = k8s.yaml.v2.ConfigFile(
            f"{name}-manifests", file=autoscaling.ADAPTER_MANIFEST_URL, opts=pulumi.ResourceOptions(parent=self)
        )
        # after the component's depends_on: the cluster that creates the identity pool
        self.access = self._access(name, args.project, child_after(self, opts))
        self.register_outputs({"manifestUrl": autoscaling.ADAPTER_MANIFEST_URL})

    def _access(self, name: str, project: str, after_pool: pulumi.ResourceOptions) -> gcp.projects.IAMMember:
        """roles/monitoring.viewer for the adapter's KSA, through its Workload Identity principal."""
        number = gcp.organizations.get_project_output(project_id=project, opts=pulumi.InvokeOptions(parent=self)).number
        return gcp.projects.IAMMember(
            f"{name}-monitoring-viewer",
            gcp.projects.IAMMemberArgs(
                project=project,
                role=autoscaling.ADAPTER_ROLE,
                member=number.apply(lambda project_number: autoscaling.adapter_principal(project, project_number)),
            ),
            opts=pulumi.ResourceOptions.merge(after_pool, pulumi.ResourceOptions(retain_on_delete=True)),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeaderWorkerSetAutoscalerArgs:
    pod_monitoring: Mapping[str, Any]  # manifests.pod_monitoring
    horizontal_pod_autoscaler: Mapping[str, Any]  # manifests.horizontal_pod_autoscaler


class LeaderWorkerSetAutoscaler(pulumi.ComponentResource):
    """Scales the LeaderWorkerSet between replicas and maxReplicas on JetStream's own metrics.

    Pass the cluster's provider and, in `opts.depends_on`, the workload (namespace and
    LeaderWorkerSet) and the MetricsAdapter, so the HPA's first reads find the metrics API.
    """

    pod_monitoring: k8s.apiextensions.CustomResource
    hpa: k8s.autoscaling.v2.HorizontalPodAutoscaler

    def __init__(self, name: str, args: LeaderWorkerSetAutoscalerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:autoscaling:LeaderWorkerSetAutoscaler", name, None, opts)
        child = child_after(self, opts)
        monitoring = args.pod_monitoring
        self.pod_monitoring = k8s.apiextensions.CustomResource(
            f"{name}-podmonitoring",
            api_version=monitoring["apiVersion"],
            kind=monitoring["kind"],
            metadata=k8s.meta.v1.ObjectMetaArgs(**monitoring["metadata"]),
            spec=monitoring["spec"],
            opts=child,
        )
        hpa = args.horizontal_pod_autoscaler
        self.hpa = k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{name}-hpa",
            metadata=k8s.meta.v1.ObjectMetaArgs(**hpa["metadata"]),
            spec=hpa["spec"],
            opts=child,
        )
        self.register_outputs({"hpaName": hpa["metadata"]["name"]})
