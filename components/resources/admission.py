"""StackIsolation: the ValidatingAdmissionPolicy and binding that reserve a stack's TPU nodes to its
namespace (built by `components.core.admission`, which documents what it refuses and why)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components.resources.options import child_after


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackIsolationArgs:
    policy: Mapping[str, Any]  # admission.isolation_policy
    binding: Mapping[str, Any]  # admission.isolation_binding


class StackIsolation(pulumi.ComponentResource):
    """Pass the cluster's Kubernetes provider in `opts.provider`."""

    policy: k8s.admissionregistration.v1.ValidatingAdmissionPolicy
    binding: k8s.admissionregistration.v1.ValidatingAdmissionPolicyBinding

    def __init__(self, name: str, args: StackIsolationArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("jetstream:admission:StackIsolation", name, None, opts)
        child = child_after(self, opts)
        admission = k8s.admissionregistration.v1
        self.policy = admission.ValidatingAdmissionPolicy(
            f"{name}-policy",
            metadata=k8s.meta.v1.ObjectMetaArgs(**args.policy["metadata"]),
            spec=args.policy["spec"],
            opts=child,
        )
        # The binding names the policy: it is created after it and deleted before it.
        self.binding = admission.ValidatingAdmissionPolicyBinding(
            f"{name}-binding",
            metadata=k8s.meta.v1.ObjectMetaArgs(**args.binding["metadata"]),
            spec=args.binding["spec"],
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[self.policy])),
        )
        self.register_outputs({"policyName": args.policy["metadata"]["name"]})
