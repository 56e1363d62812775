"""LeaderWorkerSetAutoscaler: the HPA of the LeaderWorkerSet, its metrics and the adapter between.

A thin wrapper over `components.core.autoscaling` (what is created and why is documented there):
  * the Custom Metrics Stackdriver Adapter, `kubernetes.yaml.v2.ConfigFile` of its production
    manifest pinned to a commit (namespace custom-metrics, KSA custom-metrics-stackdriver-adapter);
  * its identity: one `gcp.projects.IAMMember` granting `roles/monitoring.viewer` (read-only,
    the least Cloud Monitoring offers) to that KSA's Workload Identity principal, no key and no GSA;
  * the `PodMonitoring` (a CustomResource; GKE's managed collection installs its CRD);
  * the `autoscaling/v2` HorizontalPodAutoscaler targeting the LeaderWorkerSet by name.
With autoscaling off it creates nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s

from components.core import autoscaling
from components.core.autoscaling import Autoscaling, MetricsEndpoint


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoscalingArgs:
    scaling: Autoscaling  # replicas, maxReplicas, metric and target (autoscaling.parse_autoscaling)
    project: str  # GCP project whose Cloud Monitoring holds the scraped metrics
    namespace: str  # namespace of the LeaderWorkerSet
    lws_name: str  # the LeaderWorkerSet the HPA scales
    endpoint: MetricsEndpoint  # the leaders' metrics (autoscaling.metrics_endpoint)
    startup_delay_seconds: int  # the replicas' warm-up; sets the HPA's scale-down window


class LeaderWorkerSetAutoscaler(pulumi.ComponentResource):
    """Scales the LeaderWorkerSet between replicas and maxReplicas on JetStream's own metrics."""

    adapter: k8s.yaml.v2.ConfigFile | None
    adapter_access: gcp.projects.IAMMember | None
    pod_monitoring: k8s.apiextensions.CustomResource | None
    hpa: k8s.autoscaling.v2.HorizontalPodAutoscaler | None

    def __init__(self, name: str, args: AutoscalingArgs, provider: k8s.Provider,
                 depends_on: Sequence[pulumi.Resource] = (), opts: pulumi.ResourceOptions | None = None):
        """`depends_on`: what the namespace and the LeaderWorkerSet come from (e.g. JetStreamServer)."""
        super().__init__("jetstream:autoscaling:LeaderWorkerSetAutoscaler", name, None, opts)
        self.adapter = self.adapter_access = self.pod_monitoring = self.hpa = None
        documents = autoscaling.autoscaling_manifests(args.scaling, namespace=args.namespace, lws_name=args.lws_name,
                                                      endpoint=args.endpoint, startup_delay_seconds=args.startup_delay_seconds)
        if documents:
            pod_monitoring, hpa = documents
            k8s_child = pulumi.ResourceOptions(parent=self, provider=provider)
            self.adapter = k8s.yaml.v2.ConfigFile(f"{name}-metrics-adapter", file=autoscaling.ADAPTER_MANIFEST_URL, opts=k8s_child)
            self.adapter_access = self._adapter_access(name, args.project)
            in_namespace = pulumi.ResourceOptions.merge(k8s_child, pulumi.ResourceOptions(depends_on=list(depends_on)))
            self.pod_monitoring = k8s.apiextensions.CustomResource(
                f"{name}-podmonitoring", api_version=pod_monitoring["apiVersion"], kind=pod_monitoring["kind"],
                metadata=k8s.meta.v1.ObjectMetaArgs(**pod_monitoring["metadata"]), spec=pod_monitoring["spec"], opts=in_namespace,
            )
            # After the adapter and its access, so the HPA's first reads find the metrics API.
            self.hpa = k8s.autoscaling.v2.HorizontalPodAutoscaler(
                f"{name}-hpa", metadata=k8s.meta.v1.ObjectMetaArgs(**hpa["metadata"]), spec=hpa["spec"],
                opts=pulumi.ResourceOptions.merge(in_namespace, pulumi.ResourceOptions(depends_on=[self.adapter, self.adapter_access])),
            )
        self.register_outputs({
            "hpaName": args.lws_name if documents else None,
            "adapterManifestUrl": autoscaling.ADAPTER_MANIFEST_URL if documents else None,
        })

    def _adapter_access(self, name: str, project: str) -> gcp.projects.IAMMember:
        """roles/monitoring.viewer for the adapter's KSA, through its Workload Identity principal."""
        number = gcp.organizations.get_project_output(project_id=project, opts=pulumi.InvokeOptions(parent=self)).number
        return gcp.projects.IAMMember(
            f"{name}-adapter-monitoring-viewer",
            gcp.projects.IAMMemberArgs(project=project, role=autoscaling.ADAPTER_ROLE,
                                       member=number.apply(lambda project_number: autoscaling.adapter_principal(project, project_number))),
            opts=pulumi.ResourceOptions(parent=self),
        )
