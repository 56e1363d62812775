"""LeaderWorkerSetController: installs the LWS API (CRD, controller, webhooks) at a pinned version.

Method: `kubernetes.yaml.v2.ConfigFile` of the release's `manifests.yaml`, the artifact the LWS
project publishes per release and the one the seed applies with `kubectl apply --server-side`.
  * It is the documented install, unmodified: no chart values to keep in sync, and the pinned
    URL names the exact version in `pulumi preview --diff`.
  * yaml/v2 registers the CRD before the objects that use it, and a resource that `depends_on`
    the ConfigFile waits for all of its children (the CRD and the webhook Deployment), so the
    LeaderWorkerSet is created only once the API exists.
  * The Kubernetes provider applies server-side, which the LWS CRD needs (it is too large for
    the last-applied annotation of client-side apply).
A Helm release of the OCI chart would work too, but adds a chart-values surface and a Helm
registry round trip during preview for no gain here.
"""

from __future__ import annotations

import dataclasses

import pulumi
import pulumi_kubernetes as k8s

RELEASE_MANIFEST_URL = "https://github.com/kubernetes-sigs/lws/releases/download/{version}/manifests.yaml"


def release_manifest_url(version: str) -> str:
    return RELEASE_MANIFEST_URL.format(version=version)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeaderWorkerSetControllerArgs:
    version: str  # an LWS release tag, e.g. v0.10.0


class LeaderWorkerSetController(pulumi.ComponentResource):
    """The LWS controller; make LeaderWorkerSet resources `depends_on` this component.

    Pass the cluster's Kubernetes provider in `opts.provider`. The install is cluster-wide: only
    the stack that owns the cluster creates it (`installLwsController`).
    """

    version: pulumi.Output[str]
    manifest_url: pulumi.Output[str]
    install: k8s.yaml.v2.ConfigFile

    def __init__(self, name: str, args: LeaderWorkerSetControllerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:lws:LeaderWorkerSetController", name, None, opts)
        url = release_manifest_url(args.version)
        self.install = k8s.yaml.v2.ConfigFile(f"{name}-manifests", file=url, opts=pulumi.ResourceOptions(parent=self))
        self.version, self.manifest_url = pulumi.Output.from_input(args.version), pulumi.Output.from_input(url)
        self.register_outputs({"version": self.version, "manifestUrl": self.manifest_url})
