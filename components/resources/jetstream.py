"""JetStreamServer: namespace, service account, the LeaderWorkerSet and the Service.

A thin wrapper: the objects come from the pure builders in `components.manifests`, so what
`pulumi up` applies is exactly what `python -m components.render` prints.
"""

from __future__ import annotations

from typing import Sequence

import pulumi
import pulumi_kubernetes as k8s

from components.core import lws_model, manifests
from components.core.config import StackConfig
from components.core.planner import Plan


def service_args(cfg: StackConfig) -> k8s.core.v1.ServiceInitArgs:
    """Typed Service arguments from the pure Service manifest."""
    manifest = manifests.service(cfg)
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
    namespace: str
    lws_name: str
    service_name: str

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        plan: Plan,
        provider: k8s.Provider,
        service_account_email: pulumi.Input[str],
        depends_on: Sequence[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("jetstream:serving:JetStreamServer", name, None, opts)
        k8s_child = pulumi.ResourceOptions(parent=self, provider=provider)
        in_namespace = k8s_child
        namespace_manifest = manifests.namespace(cfg)  # None for `default`
        if namespace_manifest is not None:
            namespace = k8s.core.v1.Namespace(f"{name}-ns", metadata=k8s.meta.v1.ObjectMetaArgs(**namespace_manifest["metadata"]), opts=k8s_child)
            in_namespace = pulumi.ResourceOptions.merge(k8s_child, pulumi.ResourceOptions(depends_on=[namespace]))
        # The created GSA's email (an Output), so the KSA also waits for the GSA.
        ksa = manifests.service_account(cfg, service_account_email)
        self.service_account = k8s.core.v1.ServiceAccount(
            f"{name}-ksa", metadata=k8s.meta.v1.ObjectMetaArgs(**ksa["metadata"]), opts=in_namespace,
        )
        lws = manifests.leader_worker_set(cfg, plan)
        # Waits for the LWS CRD (controller), the TPU node pools and the identity: on destroy
        # the workload goes first.
        self.leader_worker_set = k8s.apiextensions.CustomResource(
            f"{name}-lws",
            api_version=lws_model.API_VERSION,
            kind=lws_model.KIND,
            metadata=k8s.meta.v1.ObjectMetaArgs(**lws["metadata"]),
            spec=lws["spec"],
            opts=pulumi.ResourceOptions.merge(in_namespace, pulumi.ResourceOptions(depends_on=[self.service_account, *depends_on])),
        )
        self.service = k8s.core.v1.Service(f"{name}-svc", service_args(cfg), opts=in_namespace)
        self.namespace, self.lws_name, self.service_name = cfg.namespace, cfg.app_name, cfg.service_name
        self.register_outputs({"namespace": self.namespace, "lwsName": self.lws_name, "serviceName": self.service_name})
