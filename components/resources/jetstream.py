"""JetStreamServer: namespace, service account, the Secrets the pods read, the LeaderWorkerSet and the Service.

A thin wrapper: the typed objects come from the pure builders in `components.core.manifests` and
become Pulumi arguments here, at the last step, so what `pulumi up` applies is what
`python -m components.render` prints. Pass the cluster's Kubernetes
provider and what the LeaderWorkerSet waits for (the LWS controller, the TPU node pools, the
identity) in `opts`.

Updates: the LWS v0.10.0 webhook refuses in-place changes to subGroupPolicy (adding, removing,
resizing it, e.g. when `mode` or the topology of a disaggregated stack changes), so changes under
`lws_model.REPLACE_ON_CHANGES` replace the LeaderWorkerSet, deleting the old one first (its name
is fixed). Readiness: the Service never awaits endpoints (a ClusterIP Service skips the await,
an internal load balancer awaits only its IP, see manifests.service); with waitForReady the
LeaderWorkerSet awaits its Available condition for `ready_timeout_seconds`.
Client endpoints (`client_endpoints`: httpUrl, grpcTarget, openaiBaseUrl) come from the live
Service: its name and namespace (cluster DNS) or its load balancer IP, and its ports by name.
Autoscaling: the HPA owns `spec.replicas` through the scale subresource, so the LeaderWorkerSet
ignores changes there (`ignore_changes`): Pulumi sets the replicas when it creates the object and
leaves the field out of later server-side applies, which would otherwise undo the HPA's decisions
or fail with a field-manager conflict (pulumi/pulumi-kubernetes#2491). When autoscaling is turned
off, the field is applied again while the HPA's field manager still owns it; the LeaderWorkerSet's
`pulumi.com/patchForce` annotation (manifests.PATCH_FORCE) makes that apply take it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components.core import kube_model, lws_model, manifests
from components.resources.options import component_dependencies

SCALED_FIELD = "spec.replicas"  # what the HPA changes, through the LWS scale subresource


@dataclasses.dataclass(frozen=True, kw_only=True)
class JetStreamServerArgs:
    namespace: kube_model.Namespace | None  # None: the `default` namespace, which every cluster has
    service_account: kube_model.ServiceAccount  # its annotation may hold an Output (the GSA's email)
    leader_worker_set: lws_model.LeaderWorkerSet  # may hold Outputs (the stack-built image's digest)
    service: kube_model.Service
    secrets: tuple[Mapping[str, Any], ...]  # Secrets the pods read (values are Pulumi secret Outputs), before the LWS
    ready_timeout_seconds: int | None  # waitForReady: how long the LeaderWorkerSet may take
    serves_openai: bool  # the server behind the HTTP port has the OpenAI API (manifests.client_endpoints)
    autoscaled: bool = False  # an HPA owns spec.replicas after creation


def metadata_args(metadata: lws_model.ObjectMeta) -> k8s.meta.v1.ObjectMetaArgs:
    """Pulumi's metadata arguments from the typed metadata (unset fields stay unset)."""
    return k8s.meta.v1.ObjectMetaArgs(**metadata.to_dict())


def service_args(service: kube_model.Service) -> k8s.core.v1.ServiceInitArgs:
    """Pulumi's Service arguments from the typed Service."""
    return k8s.core.v1.ServiceInitArgs(
        metadata=metadata_args(service.metadata),
        spec=k8s.core.v1.ServiceSpecArgs(
            type=service.spec.type,
            selector=dict(service.spec.selector),
            ports=[
                k8s.core.v1.ServicePortArgs(
                    protocol=port.protocol, name=port.name, port=port.port, target_port=port.target_port
                )
                for port in service.spec.ports
            ],
        ),
    )


def load_balancer_ip(status) -> str | None:
    """The first ingress IP of a live Service's status, if it has one."""
    ingress = status.load_balancer.ingress if status is not None and status.load_balancer is not None else None
    return ingress[0].ip if ingress else None


def live_client_endpoints(service: k8s.core.v1.Service, serves_openai: bool) -> pulumi.Output[dict]:
    """manifests.client_endpoints of the Service as the cluster reports it. Each typed output is
    read on its own: Output.all would hand them over as untyped dicts."""
    host = pulumi.Output.all(
        service.spec.apply(lambda spec: spec.type),
        service.metadata.apply(lambda metadata: metadata.name),
        service.metadata.apply(lambda metadata: metadata.namespace),
        service.status.apply(load_balancer_ip),
    ).apply(
        lambda parts: manifests.service_host(
            service_type=parts[0], name=parts[1], namespace=parts[2], load_balancer_ip=parts[3]
        )
    )
    ports = service.spec.apply(lambda spec: {port.name: port.port for port in spec.ports})
    return pulumi.Output.all(host, ports).apply(
        lambda parts: manifests.client_endpoints(parts[0], parts[1], openai=serves_openai)
    )


class JetStreamServer(pulumi.ComponentResource):
    namespace: pulumi.Output[str]
    lws_name: pulumi.Output[str]
    service_name: pulumi.Output[str]
    client_endpoints: pulumi.Output[dict]  # httpUrl, grpcTarget, openaiBaseUrl from the live Service

    def __init__(self, name: str, args: JetStreamServerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:serving:JetStreamServer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        in_namespace = child
        if args.namespace is not None:
            namespace = k8s.core.v1.Namespace(f"{name}-ns", metadata=metadata_args(args.namespace.metadata), opts=child)
            in_namespace = pulumi.ResourceOptions(parent=self, depends_on=[namespace])
        service_account = k8s.core.v1.ServiceAccount(
            f"{name}-ksa",
            metadata=metadata_args(args.service_account.metadata),
            opts=in_namespace,
        )
        secrets = [self._secret(name, secret, in_namespace) for secret in args.secrets]
        lws = args.leader_worker_set
        leader_worker_set = k8s.apiextensions.CustomResource(
            f"{name}-lws",
            api_version=lws_model.API_VERSION,
            kind=lws_model.KIND,
            metadata=metadata_args(lws.metadata),
            spec=lws.spec.to_dict(),
            opts=pulumi.ResourceOptions.merge(in_namespace, self._lws_options(args, [service_account, *secrets], opts)),
        )
        service = k8s.core.v1.Service(f"{name}-svc", service_args(args.service), opts=in_namespace)
        self.namespace = pulumi.Output.from_input(lws.metadata.namespace)
        self.lws_name = leader_worker_set.metadata.apply(lambda metadata: metadata["name"])
        self.service_name = service.metadata.apply(lambda metadata: metadata.name)
        self.client_endpoints = live_client_endpoints(service, args.serves_openai)
        self.register_outputs(
            {
                "namespace": self.namespace,
                "lwsName": self.lws_name,
                "serviceName": self.service_name,
                "clientEndpoints": self.client_endpoints,
            }
        )

    @staticmethod
    def _secret(name: str, manifest: Mapping[str, Any], opts: pulumi.ResourceOptions) -> k8s.core.v1.Secret:
        metadata = manifest["metadata"]
        return k8s.core.v1.Secret(
            f"{name}-{metadata['name']}",
            metadata=k8s.meta.v1.ObjectMetaArgs(**metadata),
            type=manifest["type"],
            string_data=manifest["stringData"],
            opts=opts,
        )

    @staticmethod
    def _lws_options(
        args: JetStreamServerArgs, pod_inputs: list[pulumi.Resource], opts: pulumi.ResourceOptions | None
    ) -> pulumi.ResourceOptions:
        """Waits for what the pods read (the KSA, Secrets) and for the component's depends_on
        (controller, node pools, identity), so on destroy the workload goes first; replaced, never
        patched, where the webhook refuses."""
        timeout = f"{args.ready_timeout_seconds}s" if args.ready_timeout_seconds else None
        return pulumi.ResourceOptions(
            depends_on=[*pod_inputs, *component_dependencies(opts)],
            replace_on_changes=list(lws_model.REPLACE_ON_CHANGES),
            delete_before_replace=True,
            ignore_changes=[SCALED_FIELD] if args.autoscaled else None,
            custom_timeouts=pulumi.CustomTimeouts(create=timeout, update=timeout) if timeout else None,
        )
