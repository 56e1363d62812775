"""The stack's Google identities: the node service account, and what the serving pods act as.

NodeIdentity: a least-privilege service account every node pool runs as, instead of the Compute
Engine default account (which organisations often disable or strip): write logs and metrics,
read monitoring, write resource metadata, pull images from Artifact Registry
(cloud.google.com/kubernetes-engine/docs/how-to/hardening-your-cluster#use_least_privilege_sa).

ServingIdentity: the Pathways scratch bucket the stack owns (--gcs_scratch_location; uniform
access, public access prevented, objects expire after a week), and the bucket grants of the
identity the serving pods act as: objectUser on the scratch bucket, objectViewer on the
checkpoint bucket, nothing project-wide. That identity is
  * serverRuntime=bundled: a workload GSA, bound to the pods' Kubernetes service account through
    Workload Identity (roles/iam.workloadIdentityUser for PROJECT.svc.id.goog[namespace/ksa]);
  * serverRuntime=jetstream: the node service account, because Pathways TPU pools run without
    Workload Identity (GCE_METADATA, see components/core/node_pools.py).
The Workload Identity pool PROJECT.svc.id.goog exists only once the project's first cluster with
Workload Identity exists, so the binding must wait for a cluster the stack creates (program.py
passes it in `opts.depends_on`); otherwise IAM answers "Identity Pool does not exist".
"""

from __future__ import annotations

import dataclasses

import pulumi
import pulumi_gcp as gcp

from components.resources.options import child_after

NODE_ROLES = (
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
    "roles/artifactregistry.reader",
)
SCRATCH_ROLE = "roles/storage.objectUser"  # create/read/delete objects, no bucket or IAM admin
CHECKPOINT_ROLE = "roles/storage.objectViewer"
WORKLOAD_IDENTITY_ROLE = "roles/iam.workloadIdentityUser"
SCRATCH_RETENTION_DAYS = 7


def _member(email: pulumi.Output[str]) -> pulumi.Output[str]:
    return email.apply(lambda address: f"serviceAccount:{address}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeIdentityArgs:
    project: str
    account_id: str
    stack: str


class NodeIdentity(pulumi.ComponentResource):
    """The service account of every node pool, with the node roles only."""

    email: pulumi.Output[str]
    roles: list[gcp.projects.IAMMember]  # node pools wait for them (program.py)

    def __init__(self, name: str, args: NodeIdentityArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:iam:NodeIdentity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        account = gcp.serviceaccount.Account(
            f"{name}-gsa",
            gcp.serviceaccount.AccountArgs(
                account_id=args.account_id, project=args.project, display_name=f"JetStream TPU nodes ({args.stack})"
            ),
            opts=child,
        )
        self.email = account.email
        self.roles = [
            gcp.projects.IAMMember(
                f"{name}-{role.split('/')[-1].replace('.', '-').lower()}",
                gcp.projects.IAMMemberArgs(project=args.project, role=role, member=_member(account.email)),
                opts=child,
            )
            for role in NODE_ROLES
        ]
        self.register_outputs({"email": self.email})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServingIdentityArgs:
    project: str
    stack: str
    scratch_bucket: str
    bucket_location: str
    checkpoint_bucket: str
    # Workload Identity (bundled server): the GSA to create and the KSA member bound to it.
    workload_account_id: str | None
    workload_identity_member: str | None
    # Otherwise the pods act as the node service account, which gets the bucket grants.
    node_service_account: pulumi.Input[str] | None


class ServingIdentity(pulumi.ComponentResource):
    """The scratch bucket and the serving pods' identity with exactly its bucket grants."""

    scratch_bucket_name: pulumi.Output[str]
    service_account_email: pulumi.Output[str]  # the identity the serving pods act as

    def __init__(self, name: str, args: ServingIdentityArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:iam:ServingIdentity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        scratch = gcp.storage.Bucket(f"{name}-scratch", self._bucket_args(args), opts=child)
        self.scratch_bucket_name = scratch.name
        if args.workload_account_id is not None:
            account = gcp.serviceaccount.Account(
                f"{name}-gsa",
                gcp.serviceaccount.AccountArgs(
                    account_id=args.workload_account_id,
                    project=args.project,
                    display_name=f"JetStream serving ({args.stack})",
                ),
                opts=child,
            )
            after_pool = child_after(self, opts)  # the component's depends_on: the cluster that creates the pool
            gcp.serviceaccount.IAMMember(
                f"{name}-workload-identity",
                gcp.serviceaccount.IAMMemberArgs(
                    service_account_id=account.name, role=WORKLOAD_IDENTITY_ROLE, member=args.workload_identity_member
                ),
                opts=after_pool,
            )
            self.service_account_email = account.email
        else:
            self.service_account_email = pulumi.Output.from_input(args.node_service_account)
        member = _member(self.service_account_email)
        gcp.storage.BucketIAMMember(
            f"{name}-scratch-access",
            gcp.storage.BucketIAMMemberArgs(bucket=scratch.name, role=SCRATCH_ROLE, member=member),
            opts=child,
        )
        gcp.storage.BucketIAMMember(
            f"{name}-checkpoint-read",
            gcp.storage.BucketIAMMemberArgs(bucket=args.checkpoint_bucket, role=CHECKPOINT_ROLE, member=member),
            opts=child,
        )
        self.register_outputs(
            {"scratchBucket": self.scratch_bucket_name, "serviceAccountEmail": self.service_account_email}
        )

    @staticmethod
    def _bucket_args(args: ServingIdentityArgs) -> gcp.storage.BucketArgs:
        return gcp.storage.BucketArgs(
            name=args.scratch_bucket,
            project=args.project,
            location=args.bucket_location,  # next to the TPUs
            uniform_bucket_level_access=True,
            public_access_prevention="enforced",
            force_destroy=True,  # scratch data only
            lifecycle_rules=[
                gcp.storage.BucketLifecycleRuleArgs(
                    action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
                    condition=gcp.storage.BucketLifecycleRuleConditionArgs(age=SCRATCH_RETENTION_DAYS),
                )
            ],
        )
