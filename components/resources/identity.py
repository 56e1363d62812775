"""ServingIdentity: the Pathways scratch bucket and the least-privilege identity of the pods.

  * a scratch bucket the stack owns (Pathways' --gcs_scratch_location), uniform access, public
    access prevented, objects expire after a week (scratch only);
  * a Google service account (GSA) with objectUser on the scratch bucket and objectViewer on the
    checkpoint bucket, nothing project-wide;
  * Workload Identity: the Kubernetes service account <namespace>/<app> may act as the GSA.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from components.core.config import StackConfig

SCRATCH_ROLE = "roles/storage.objectUser"  # create/read/delete objects, no bucket or IAM admin
CHECKPOINT_ROLE = "roles/storage.objectViewer"
WORKLOAD_IDENTITY_ROLE = "roles/iam.workloadIdentityUser"
SCRATCH_RETENTION_DAYS = 7


def workload_identity_member(cfg: StackConfig) -> str:
    return f"serviceAccount:{cfg.project}.svc.id.goog[{cfg.namespace}/{cfg.kubernetes_service_account}]"


class ServingIdentity(pulumi.ComponentResource):
    scratch_bucket: gcp.storage.Bucket
    service_account: gcp.serviceaccount.Account
    service_account_email: pulumi.Output[str]

    def __init__(self, name: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:iam:ServingIdentity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.scratch_bucket = gcp.storage.Bucket(f"{name}-scratch", self._bucket_args(cfg), opts=child)
        self.service_account = gcp.serviceaccount.Account(
            f"{name}-gsa",
            gcp.serviceaccount.AccountArgs(account_id=cfg.google_service_account_id, project=cfg.project,
                                           display_name=f"JetStream serving ({cfg.stack})"),
            opts=child,
        )
        self.service_account_email = self.service_account.email
        member = self.service_account.email.apply(lambda email: f"serviceAccount:{email}")
        self.bindings = [
            gcp.storage.BucketIAMMember(f"{name}-scratch-access",
                                        gcp.storage.BucketIAMMemberArgs(bucket=self.scratch_bucket.name, role=SCRATCH_ROLE, member=member), opts=child),
            gcp.storage.BucketIAMMember(f"{name}-checkpoint-read",
                                        gcp.storage.BucketIAMMemberArgs(bucket=cfg.checkpoint_bucket, role=CHECKPOINT_ROLE, member=member), opts=child),
            gcp.serviceaccount.IAMMember(f"{name}-workload-identity",
                                         gcp.serviceaccount.IAMMemberArgs(service_account_id=self.service_account.name, role=WORKLOAD_IDENTITY_ROLE,
                                                                          member=workload_identity_member(cfg)), opts=child),
        ]
        self.register_outputs({"scratchBucket": self.scratch_bucket.name, "serviceAccountEmail": self.service_account_email})

    @staticmethod
    def _bucket_args(cfg: StackConfig) -> gcp.storage.BucketArgs:
        return gcp.storage.BucketArgs(
            name=cfg.scratch_bucket,
            project=cfg.project,
            location=cfg.region.upper(),  # next to the TPUs
            uniform_bucket_level_access=True,
            public_access_prevention="enforced",
            force_destroy=True,  # scratch data only
            lifecycle_rules=[gcp.storage.BucketLifecycleRuleArgs(
                action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
                condition=gcp.storage.BucketLifecycleRuleConditionArgs(age=SCRATCH_RETENTION_DAYS),
            )],
        )
