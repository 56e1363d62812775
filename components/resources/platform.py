"""PlatformReference: what a serving stack (role=serving) uses of its platform stack.

The platform stack (role=platform) exports exactly `config.PLATFORM_OUTPUTS`: clusterName,
clusterLocation, project and kubeconfig (a secret). A `pulumi.StackReference` to `clusterStack`
reads them, so a serving stack needs nothing else from the platform's config.

A platform that was never deployed fails the StackReference at preview, before any pool. The
serving stack deploys into the platform's project (the cluster's Workload Identity pool lives
there): its own gcp:project must be the same (`config.check_same_project`, refused while the
reference is read, i.e. at preview). Its TPU pools run as a node service account of its own
(program.py), never the platform's, so no two stacks' pods act as one identity.
"""

from __future__ import annotations

import dataclasses

import pulumi

from components.core.config_roles import PLATFORM_OUTPUTS, check_same_project
from components.core.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlatformReferenceArgs:
    cluster_stack: str  # the platform stack, <organization>/<project>/<stack>
    project: str  # the serving stack's gcp:project (must be the platform's)


class PlatformReference(pulumi.ComponentResource):
    cluster_name: pulumi.Output[str]
    cluster_location: pulumi.Output[str]
    project: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]  # secret, as the platform exports it

    def __init__(self, name: str, args: PlatformReferenceArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:platform:PlatformReference", name, None, opts)
        reference = pulumi.StackReference(
            f"{name}-stack", stack_name=args.cluster_stack, opts=pulumi.ResourceOptions(parent=self)
        )
        outputs = dict(
            zip(PLATFORM_OUTPUTS, (reference.require_output(output) for output in PLATFORM_OUTPUTS), strict=False)
        )
        self.cluster_name, self.cluster_location = outputs["clusterName"], outputs["clusterLocation"]
        self.kubeconfig = pulumi.Output.secret(outputs["kubeconfig"])
        self.project = outputs["project"].apply(lambda platform_project: _same_project(args, platform_project))
        self.register_outputs(
            {"clusterName": self.cluster_name, "clusterLocation": self.cluster_location, "project": self.project}
        )


def _same_project(args: PlatformReferenceArgs, platform_project: str) -> str:
    try:
        return check_same_project(args.project, platform_project, args.cluster_stack)
    except ConfigError as error:
        raise pulumi.RunError(str(error)) from None
