"""LeaderWorkerSetController: installs the LWS API (CRD, controller, webhooks) at a pinned version.

Method: `kubernetes.yaml.v2.ConfigFile` of the release's `manifests.yaml`, the artifact the LWS
project publishes per release and the one the reference YAMLs' install applies with
`kubectl apply --server-side`.
  * It is the documented install, unmodified: no chart values to keep in sync, and the pinned
    URL names the exact version in `pulumi preview --diff`.
  * yaml/v2 registers the CRD before the objects that use it, and a resource that `depends_on`
    the ConfigFile waits for all of its children (the CRD and the webhook Deployment), so the
    LeaderWorkerSet is created only once the API exists.
  * The Kubernetes provider applies server-side, which the LWS CRD needs (it is too large for
    the last-applied annotation of client-side apply).
  * The controller reports ready before its certificate controller has put the CA bundle into the
    webhook configurations, and the webhooks fail closed: a LeaderWorkerSet created in between is
    refused. A transform (`wait_for_ca_bundle`) annotates both webhook configurations with
    `pulumi.com/waitFor` on their CA bundle, so the ConfigFile, and what waits for it, is done only
    once the webhooks can answer: the first `pulumi up` needs no second try.
  * Installed into a cluster the stack does not own (installLwsController=always), every object is
    kept when the stack is destroyed (`retain_on_delete`): deleting the CRD would delete every
    LeaderWorkerSet of the cluster, other stacks' too.
A Helm release of the OCI chart would work too, but adds a chart-values surface and a Helm
registry round trip during preview for no gain here.
"""

from __future__ import annotations

import dataclasses

import pulumi
import pulumi_kubernetes as k8s

RELEASE_MANIFEST_URL = "https://github.com/kubernetes-sigs/lws/releases/download/{version}/manifests.yaml"
WEBHOOK_CONFIGURATION_TYPES = (
    "kubernetes:admissionregistration.k8s.io/v1:MutatingWebhookConfiguration",
    "kubernetes:admissionregistration.k8s.io/v1:ValidatingWebhookConfiguration",
)
WAIT_FOR_ANNOTATION = "pulumi.com/waitFor"
CA_BUNDLE_PATH = "jsonpath={.webhooks[0].clientConfig.caBundle}"  # present once the certificate controller injected it


def release_manifest_url(version: str) -> str:
    return RELEASE_MANIFEST_URL.format(version=version)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeaderWorkerSetControllerArgs:
    version: str  # an LWS release tag, e.g. v0.10.0
    keep_on_destroy: bool = False  # installed into a cluster the stack does not own


def wait_for_ca_bundle(args: pulumi.ResourceTransformArgs) -> pulumi.ResourceTransformResult | None:
    """Annotate the release's webhook configurations so the provider waits for their CA bundle."""
    if args.type_ not in WEBHOOK_CONFIGURATION_TYPES:
        return None
    metadata = dict(args.props.get("metadata") or {})
    metadata["annotations"] = {**(metadata.get("annotations") or {}), WAIT_FOR_ANNOTATION: CA_BUNDLE_PATH}
    return pulumi.ResourceTransformResult(props={**args.props, "metadata": metadata}, opts=args.opts)


def retain(args: pulumi.ResourceTransformArgs) -> pulumi.ResourceTransformResult:
    """Keep the object when the stack is destroyed."""
    kept = pulumi.ResourceOptions.merge(args.opts, pulumi.ResourceOptions(retain_on_delete=True))
    return pulumi.ResourceTransformResult(props=args.props, opts=kept)


def install_transforms(keep_on_destroy: bool) -> list:
    """The transforms of the release's objects (ConfigFile children)."""
    return [wait_for_ca_bundle, *([retain] if keep_on_destroy else [])]


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
        install = pulumi.ResourceOptions(
            parent=self,
            transforms=install_transforms(args.keep_on_destroy),
            retain_on_delete=args.keep_on_destroy or None,
        )
        self.install = k8s.yaml.v2.ConfigFile(f"{name}-manifests", file=url, opts=install)
        self.version, self.manifest_url = pulumi.Output.from_input(args.version), pulumi.Output.from_input(url)
        self.register_outputs({"version": self.version, "manifestUrl": self.manifest_url})
