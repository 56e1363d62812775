"""Roles (`role`): which keys each kind of stack uses, and how a serving stack names its platform.

`all` is one stack with the cluster and the model server; `platform` owns the cluster, its
system pool, the node service account and the cluster-wide controllers, and exports
`PLATFORM_OUTPUTS`; `serving` puts its TPU pools and model server on the cluster of the platform
stack named by `clusterStack`. A key the role does not use is refused (`check_role_keys`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from components.core.config_keys import is_set
from components.core.config_table import KEYS_BY_NAME, PLATFORM, PROJECT, SERVING
from components.core.config_values import text_of
from components.core.errors import ConfigError

# What a platform stack exports, exactly, and a serving stack reads through a StackReference.
PLATFORM_OUTPUTS = ("clusterName", "clusterLocation", "project", "kubeconfig")
# Keys only the stack that owns the cluster uses (role=all or platform). A serving stack's TPU pools
# follow the release channel of the live cluster, read at deploy time (resources/gke.py).
CLUSTER_KEYS = (
    "clusterName",
    "existingClusterName",
    "clusterLocation",
    "releaseChannel",
    "deletionProtection",
    "systemMachineType",
    "systemNodeCount",
    "lwsVersion",
    "installLwsController",
    "privateEndpoint",
    "authorizedNetworks",
    "gatewayProxySubnetRange",
)
# What a platform stack uses; it creates its cluster, so existingClusterName is not among them.
PLATFORM_KEYS = ("role", "zone", "gateway", *(key for key in CLUSTER_KEYS if key != "existingClusterName"))
_STACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _unused_keys(role: str) -> tuple[tuple[str, ...], str, str]:
    """(keys a stack of this role does not use, why, what to do instead)."""
    if role == PLATFORM:
        return (
            tuple(name for name in KEYS_BY_NAME if name not in PLATFORM_KEYS),
            (
                "a platform stack creates the cluster and what serving stacks share on it (no TPU pool, no workload, no"
                " existing cluster)"
            ),
            "set it in a role=serving stack that names this one in clusterStack (existingClusterName: use role=all)",
        )
    if role == SERVING:
        # installLwsController=never stays accepted: it is what a serving stack installs (nothing);
        # always is refused with its own reason (config_values._install_lws_controller).
        return (
            tuple(name for name in CLUSTER_KEYS if name != "installLwsController"),
            "a serving stack puts its TPU pools and workload on the cluster of clusterStack and creates no cluster",
            "set it in the platform stack, and remove it here",
        )
    return (
        ("clusterStack",),
        "only a role=serving stack uses another stack's cluster",
        "pulumi config set role serving, or remove clusterStack",
    )


def check_role_keys(raw: Mapping[str, str], role: str) -> None:
    """Refuse a key the role does not use."""
    unused, why, suggestion = _unused_keys(role)
    for name in unused:
        if is_set(raw, KEYS_BY_NAME[name]):
            raise ConfigError(
                (name, "role"), f"{name} is set, but a role={role} stack does not use it: {why}", suggestion
            )


def parse_cluster_stack(raw: Mapping[str, str], role: str, stack: str) -> str:
    name = text_of(raw, "clusterStack")
    if role != SERVING:
        return ""
    if not name:
        raise ConfigError(
            ("clusterStack", "role"),
            "role=serving needs the platform stack whose cluster it uses",
            f"pulumi config set clusterStack <organization>/{PROJECT}/platform (the names: pulumi stack ls --all)",
        )
    if not _STACK_NAME.fullmatch(name):
        raise ConfigError(
            "clusterStack",
            f"{name!r} is not a fully qualified stack name",
            (
                f"use <organization>/<project>/<stack>, e.g. my-org/{PROJECT}/platform (self-managed backends: "
                f"organization/{PROJECT}/platform)"
            ),
        )
    _, referenced_project, referenced_stack = name.split("/")
    if (referenced_project, referenced_stack) == (PROJECT, stack):
        raise ConfigError(
            "clusterStack",
            f"{name!r} is this stack itself",
            "name the platform stack (role=platform) whose cluster to use",
        )
    return name


def check_same_project(project: str, platform_project: str, cluster_stack: str) -> str:
    """A serving stack deploys into its platform's project (the cluster's Workload Identity pool
    and the node service account live there); the platform's project, or ConfigError."""
    if project != platform_project:
        raise ConfigError(
            ("gcp:project", "clusterStack"),
            (
                f"gcp:project is {project!r} but the platform stack {cluster_stack} runs its cluster in "
                f"{platform_project!r}"
            ),
            f"pulumi config set gcp:project {platform_project}",
        )
    return platform_project
