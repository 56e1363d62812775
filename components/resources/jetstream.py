"""JetStreamServer: namespace, service account, the LeaderWorkerSet and the Service.

A thin wrapper: the objects come from the pure builders in `components.core.manifests`, so what
`pulumi up` applies is what `python -m components.render` prints. Pass the cluster's Kubernetes
provider and what the LeaderWorkerSet waits for (the LWS controller, the TPU node pools, the
identity) in `opts`.

Updates: the LWS v0.10.0 webhook refuses in-place changes to subGroupPolicy (adding, removing,
resizing it, e.g. when `mode` or the topology of a disaggregated stack changes), so changes under
`lws_model.REPLACE_ON_CHANGES` replace the LeaderWorkerSet, deleting the old one first (its name
is fixed). Readiness: the Service never awaits endpoints (`pulumi.com/skipAwait`); with
waitForReady the LeaderWorkerSet awaits its Available condition for `ready_timeout_seconds`.
Autoscaling: the HPA owns `spec.replicas` through the scale subresource, so the LeaderWorkerSet
ignores changes there (`ignore_changes`): Pulumi sets the replicas when it creates the object and
leaves the field out of later server-side applies, which would otherwise undo the HPA's decisions
or fail with a field-manager conflict (pulumi/pulumi-kubernetes#2491).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import pulumi
import pulumi_kubernetes as k8s

from components.core import lws_model

SCALED_FIELD = "spec.replicas"  # what the HPA changes, through the LWS scale subresource


@dataclasses.dataclass(frozen=True, kw_only=True)
class JetStreamServerArgs:
    namespace: Mapping[str, Any] | None  # None: the `default` namespace, which every cluster has
    service_account: Mapping[str, Any]
    leader_worker_set: Mapping[str, Any]  # may hold Outputs (the stack-built image's digest)
    service: Mapping[str, Any]
    ready_timeout_seconds: int | None  # waitForReady: how long the LeaderWorkerSet may take
    autoscaled: bool = False  # an HPA owns spec.replicas after creation


def service_args(manifest: Mapping[str, Any]) -> k8s.core.v1.ServiceInitArgs:
    """Typed Service arguments from the pure Service manifest."""
    return k8s.core.v1.ServiceInitArgs(
        metadata=k8s.meta.v1.ObjectMetaArgs(**manifest["metadata"]),
        spec=k8s.core.v1.ServiceSpecArgs(
            selector=manifest["spec"]["selector"],
            ports=[
                k8s.core.v1.ServicePortArgs(protocol=port["protocol"], name=port["name"], port=port["port"], target_port=port["targetPort"])
                for port in manifest["spec"]["ports"]
            ],
        ),
    )


class JetStreamServer(pulumi.ComponentResource):
    namespace: pulumi.Output[str]
    lws_name: pulumi.Output[str]
    service_name: pulumi.Output[str]

    def __init__(self, name: str, args: JetStreamServerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:serving:JetStreamServer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        in_namespace = child
        if args.namespace is not None:
            namespace = k8s.core.v1.Namespace(f"{name}-ns", metadata=k8s.meta.v1.ObjectMetaArgs(**args.namespace["metadata"]), opts=child)
            in_namespace = pulumi.ResourceOptions(parent=self, depends_on=[namespace])
        service_account = k8s.core.v1.ServiceAccount(
            f"{name}-ksa", metadata=k8s.meta.v1.ObjectMetaArgs(**args.service_account["metadata"]), opts=in_namespace,
        )
        lws = args.leader_worker_set
        leader_worker_set = k8s.apiextensions.CustomResource(
            f"{name}-lws",
            api_version=lws_model.API_VERSION,
            kind=lws_model.KIND,
            metadata=k8s.meta.v1.ObjectMetaArgs(**lws["metadata"]),
            spec=lws["spec"],
            opts=pulumi.ResourceOptions.merge(in_namespace, self._lws_options(args, service_account, opts)),
        )
        service = k8s.core.v1.Service(f"{name}-svc", service_args(args.service), opts=in_namespace)
        self.namespace = pulumi.Output.from_input(lws["metadata"]["namespace"])
        self.lws_name = leader_worker_set.metadata.apply(lambda metadata: metadata["name"])
        self.service_name = service.metadata.apply(lambda metadata: metadata.name)
        self.register_outputs({"namespace": self.namespace, "lwsName": self.lws_name, "serviceName": self.service_name})

    @staticmethod
    def _lws_options(args: JetStreamServerArgs, service_account: pulumi.Resource, opts: pulumi.ResourceOptions | None) -> pulumi.ResourceOptions:
        """Waits for the KSA and for the component's depends_on (controller, node pools, identity),
        so on destroy the workload goes first; replaced, never patched, where the webhook refuses."""
        timeout = f"{args.ready_timeout_seconds}s" if args.ready_timeout_seconds else None
        return pulumi.ResourceOptions(
            depends_on=[service_account, *_as_list(opts.depends_on if opts else None)],
            replace_on_changes=list(lws_model.REPLACE_ON_CHANGES),
            delete_before_replace=True,
            ignore_changes=[SCALED_FIELD] if args.autoscaled else None,
            custom_timeouts=pulumi.CustomTimeouts(create=timeout, update=timeout) if timeout else None,
        )


def _as_list(depends_on) -> list:
    if depends_on is None:
        return []
    return list(depends_on) if isinstance(depends_on, (list, tuple)) else [depends_on]
