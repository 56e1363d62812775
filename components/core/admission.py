"""The admission policy that keeps a stack's TPU nodes to the stack's own namespace.

Every TPU pool of a stack carries its NoSchedule taint, and only the stack's pods tolerate it
(node_pools.stack_taint / stack_toleration). A taint keeps out pods that do not tolerate it, but
anyone who can create a pod can write a toleration. On a shared cluster (role=serving, or an existing
cluster), such a pod could select another stack's nodes. On that stack's node-metadata (GCE_METADATA)
Pathways pools, it would then act as that stack's node service account, with its checkpoints and
scratch bucket. So each stack adds a `ValidatingAdmissionPolicy` and its binding
(admissionregistration.k8s.io/v1; GA since Kubernetes 1.30). They refuse any pod outside the
stack's namespace that:
  * tolerates the stack's taint: by its key with operator Exists, or by its value;
  * tolerates every taint (an empty key with operator Exists), which would include the stack's;
  * selects the stack's nodes by their deployment label, in nodeSelector or in required node affinity.
The cluster's own namespaces are exempt (kube-system, GKE's gke-* and managed Prometheus's gmp-*),
because their DaemonSets tolerate every taint by design. A pod placed by spec.nodeName skips the
scheduler, and so its taints too. Only cluster administrators should be allowed to create such pods
(docs/stack/updates.md).
"""

from __future__ import annotations

from typing import Any

from components.core.config import StackConfig
from components.core.node_pools import DEPLOYMENT_LABEL, STACK_TAINT_KEY

API_VERSION = "admissionregistration.k8s.io/v1"
SYSTEM_NAMESPACES = ("kube-system", "gmp-system", "gmp-public")
SYSTEM_NAMESPACE_PREFIX = "gke-"


def policy_name(cfg: StackConfig) -> str:
    """Cluster-scoped, so named after the stack's deployment id (unique per stack, a DNS label)."""
    return f"tpu-nodes-{cfg.deployment_id}"


def _quoted(text: str) -> str:
    """A CEL string literal (the names it quotes are DNS labels, with no quote or backslash)."""
    return f"'{text}'"


REQUIRED_NODE_TERMS = "object.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"


def _validations(cfg: StackConfig) -> list[dict[str, str]]:
    key, value, label = _quoted(STACK_TAINT_KEY), _quoted(cfg.deployment_id), _quoted(DEPLOYMENT_LABEL)
    tolerates_taint = (
        f"variables.tolerations.exists(t, has(t.key) && t.key == {key} && "
        f"((has(t.operator) && t.operator == 'Exists') || (has(t.value) && t.value == {value})))"
    )
    tolerates_all = (
        "variables.tolerations.exists(t, (!has(t.key) || t.key == '') && has(t.operator) && t.operator == 'Exists')"
    )
    selects = (
        f"has(object.spec.nodeSelector) && {label} in object.spec.nodeSelector && "
        f"object.spec.nodeSelector[{label}] == {value}"
    )
    affinity = (
        "has(object.spec.affinity) && has(object.spec.affinity.nodeAffinity) && "
        f"has({REQUIRED_NODE_TERMS}) && {REQUIRED_NODE_TERMS}.nodeSelectorTerms.exists(term, "
        "has(term.matchExpressions) && term.matchExpressions.exists(e, "
        f"e.key == {label} && has(e.values) && {value} in e.values))"
    )
    owner = f"the TPU nodes of stack {cfg.stack} are reserved to namespace {cfg.names.namespace}"
    return [
        {
            "expression": f"!({tolerates_taint})",
            "message": f"{owner}: no other pod may tolerate the taint {STACK_TAINT_KEY}={cfg.deployment_id}",
        },
        {"expression": f"!({tolerates_all})", "message": f"{owner}: a pod outside it may not tolerate every taint"},
        {
            "expression": f"!({selects}) && !({affinity})",
            "message": f"{owner}: no other pod may select {DEPLOYMENT_LABEL}={cfg.deployment_id}",
        },
    ]


def _match_conditions(cfg: StackConfig) -> list[dict[str, str]]:
    """Pods of the stack's own namespace and of the cluster's own namespaces are not judged."""
    system = ", ".join(_quoted(name) for name in SYSTEM_NAMESPACES)
    return [
        {"name": "outside-the-stacks-namespace", "expression": f"request.namespace != {_quoted(cfg.names.namespace)}"},
        {
            "name": "outside-the-clusters-own-namespaces",
            "expression": (
                f"!(request.namespace in [{system}] || "
                f"request.namespace.startsWith({_quoted(SYSTEM_NAMESPACE_PREFIX)}))"
            ),
        },
    ]


def isolation_policy(cfg: StackConfig) -> dict[str, Any]:
    """The ValidatingAdmissionPolicy guarding the stack's TPU nodes."""
    pods = {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["pods"]}
    return {
        "apiVersion": API_VERSION,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy_name(cfg)},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [pods]},
            "matchConditions": _match_conditions(cfg),
            "variables": [
                {"name": "tolerations", "expression": "has(object.spec.tolerations) ? object.spec.tolerations : []"}
            ],
            "validations": _validations(cfg),
        },
    }


def isolation_binding(cfg: StackConfig) -> dict[str, Any]:
    """Binds the policy to every namespace (the policy's own conditions exempt the stack's), denying."""
    return {
        "apiVersion": API_VERSION,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy_name(cfg)},
        "spec": {"policyName": policy_name(cfg), "validationActions": ["Deny"]},
    }
