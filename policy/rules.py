"""The guardrails as plain functions: one resource in, its violation messages out (empty = compliant).

Every rule says which resources it judges (`applies`) and what is wrong with one (`check`, called
only where the rule applies). A rule with settings declares them as JSON-schema properties with a
default (`config`); the pack's configuration (`pulumi preview --policy-pack-config`) overrides them,
and its check gets them as a mapping (`Rule.violations`). Both take a `Resource` as Pulumi hands it
to a policy: the type token, the URN (which carries the stack name) and the resource's inputs with
their camelCase wire names. Numbers arrive as floats and, inside a policy pack, mappings and lists
arrive as read-only `Mapping` / `Sequence` proxies that raise on a value still unknown during
preview, so the rules use only those protocols and read only the fields they judge (an unknown field
elsewhere in the resource must not stop the check).

A stack rule (`StackRule`) judges all of a stack's resources together: its check returns, per
finding, the URN of the resource at fault and the message.

No Pulumi import here: `policies.py` wraps each rule in a `ResourceValidationPolicy`, each stack
rule in an advisory `StackValidationPolicy`."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Resource:
    type: str
    urn: str
    props: Mapping[str, Any]

    @property
    def stack(self) -> str:
        """The stack name: `urn:pulumi:<stack>::<project>::<type>::<name>`."""
        return self.urn.split("::", 1)[0].removeprefix("urn:pulumi:")

    @property
    def kubernetes_kind(self) -> str | None:
        """`Deployment` for `kubernetes:apps/v1:Deployment`; None for anything not a Kubernetes object."""
        provider, _, kind = self.type.rpartition(":")
        return kind if provider.startswith("kubernetes:") and "/" in provider else None


def _get(props: Any, *path: str) -> Any:
    """The value at `path`, or None where a step is missing or not a mapping."""
    value = props
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _items(value: Any) -> Sequence[Any]:
    """A list input's items; nothing where the input is absent or not a list."""
    return value if isinstance(value, Sequence) and not isinstance(value, str) else ()


# ---------------------------------------------------------------------------------------------
# Container images: pinned by tag or digest on every workload kind.

# Where each workload kind keeps its pod specs (LeaderWorkerSet: the leader and the worker template).
POD_SPEC_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Pod": (("spec",),),
    "PodTemplate": (("template", "spec"),),
    "ReplicationController": (("spec", "template", "spec"),),
    "ReplicaSet": (("spec", "template", "spec"),),
    "Deployment": (("spec", "template", "spec"),),
    "StatefulSet": (("spec", "template", "spec"),),
    "DaemonSet": (("spec", "template", "spec"),),
    "Job": (("spec", "template", "spec"),),
    "CronJob": (("spec", "jobTemplate", "spec", "template", "spec"),),
    "LeaderWorkerSet": (
        ("spec", "leaderWorkerTemplate", "leaderTemplate", "spec"),
        ("spec", "leaderWorkerTemplate", "workerTemplate", "spec"),
    ),
}
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
# OCI image-spec digest: algorithm ":" encoded (sha256 = 64 hex digits).
DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-fA-F0-9]{32,}")
# A tag that names a release: a dotted version, optionally after a word and before a suffix
# (v0.10.0, jax-0.5.3, 573.0.0-stable, v0.16.9-gke.0). Moving tags (main, stable, nightly, latest, v1) are not.
VERSION_TAG = re.compile(r"(?:[A-Za-z][\w]*[-_])?v?\d+(?:\.\d+)+(?:[-+.][\w.-]+)?")


def is_workload(resource: Resource) -> bool:
    return resource.kubernetes_kind in POD_SPEC_PATHS


def pod_containers(resource: Resource) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path, container) for every container of every pod template the workload declares."""
    for spec_path in POD_SPEC_PATHS[resource.kubernetes_kind]:
        pod_spec = _get(resource.props, *spec_path)
        for list_name in CONTAINER_LISTS:
            for index, container in enumerate(_items(_get(pod_spec, list_name))):
                yield f"{'.'.join(spec_path)}.{list_name}[{index}]", container


def image_pin_problem(image: Any) -> str | None:
    """Why `image` is not pinned, or None when it names a version tag or a digest."""
    if not isinstance(image, str) or not image:
        return "has no image"
    name, has_digest, digest = image.partition("@")
    if has_digest:
        return None if DIGEST.fullmatch(digest) else f"image {image!r} has a malformed digest"
    repository_tail = name.rsplit("/", 1)[-1]  # a registry host may carry a :port
    _, has_tag, tag = repository_tail.partition(":")
    if not has_tag or not tag:
        return f"image {image!r} has no tag, so it pulls :latest"
    if not VERSION_TAG.fullmatch(tag):
        return f"image {image!r} uses the tag :{tag}, which is not a version and can move"
    return None


def check_images_pinned(resource: Resource) -> list[str]:
    problems = []
    for path, container in pod_containers(resource):
        problem = image_pin_problem(container.get("image"))
        if problem:
            problems.append(
                f"container {container.get('name')!r} ({path}) {problem}; pin a version tag or an @sha256 digest"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# IAM: no primitive roles, no public members, on every IAM member / binding / policy resource.

PRIMITIVE_ROLES = frozenset({"roles/owner", "roles/editor", "roles/viewer"})
PUBLIC_MEMBERS = frozenset({"allUsers", "allAuthenticatedUsers"})
# pulumi-gcp names every IAM grant resource `...IamMember` (role, member), `...IamBinding` (role,
# members) or `...IamPolicy` (policyData, JSON bindings), in any case: IAMMember, IamMember.
IAM_GRANT_SUFFIXES = ("iammember", "iambinding", "iampolicy")


def _gcp_kind(resource: Resource) -> str:
    return resource.type.rpartition(":")[2].lower() if resource.type.startswith("gcp:") else ""


def is_iam_grant(resource: Resource) -> bool:
    return _gcp_kind(resource).endswith(IAM_GRANT_SUFFIXES)


def iam_grants(resource: Resource) -> list[tuple[Any, Any]]:
    """(role, member) pairs an IAM grant resource grants."""
    kind = _gcp_kind(resource)
    props = resource.props
    if kind.endswith("iammember"):
        return [(props.get("role"), props.get("member"))]
    if kind.endswith("iambinding"):
        return [(props.get("role"), member) for member in _items(props.get("members"))]
    policy = json.loads(props.get("policyData") or "{}")
    return [
        (binding.get("role"), member) for binding in policy.get("bindings", []) for member in binding.get("members", [])
    ]


def check_no_primitive_roles(resource: Resource) -> list[str]:
    return [
        f"grants the primitive role {role!r} to {member!r}; "
        "grant a predefined or custom role with only the permissions needed"
        for role, member in iam_grants(resource)
        if role in PRIMITIVE_ROLES
    ]


def check_no_public_members(resource: Resource) -> list[str]:
    return [
        f"grants {role!r} to {member!r}, which is anyone on the internet; grant it to named principals"
        for role, member in iam_grants(resource)
        if member in PUBLIC_MEMBERS
    ]


# ---------------------------------------------------------------------------------------------
# Services: a LoadBalancer is internal (GKE's internal passthrough Network Load Balancer).

INTERNAL_LB_ANNOTATION = ("networking.gke.io/load-balancer-type", "Internal")
# GKE still honours the older annotation for the same internal passthrough load balancer
# (cloud.google.com/kubernetes-engine/docs/how-to/internal-load-balancing).
LEGACY_INTERNAL_LB_ANNOTATION = ("cloud.google.com/load-balancer-type", "Internal")


def is_service(resource: Resource) -> bool:
    return resource.kubernetes_kind == "Service"


def _is_load_balancer(resource: Resource) -> bool:
    return _get(resource.props, "spec", "type") == "LoadBalancer"


def _has_internal_annotation(resource: Resource) -> bool:
    annotations = _get(resource.props, "metadata", "annotations")
    return any(
        _get(annotations, name) == wanted for name, wanted in (INTERNAL_LB_ANNOTATION, LEGACY_INTERNAL_LB_ANNOTATION)
    )


def check_load_balancer_internal(resource: Resource) -> list[str]:
    key, value = INTERNAL_LB_ANNOTATION
    if not _is_load_balancer(resource) or _has_internal_annotation(resource):
        return []
    return [
        (
            f"is a LoadBalancer without the annotation {key}: {value!r}, so GKE would give it a public IP; "
            f"add the annotation (internal passthrough load balancer) or use ClusterIP"
        )
    ]


# ---------------------------------------------------------------------------------------------
# Gateways are internal, unless the pack's configuration allows a stack an external one.

# GKE's GatewayClasses whose load balancers have internal (VPC) addresses only; every other class
# (gke-l7-regional-external-managed, gke-l7-global-external-managed, gke-l7-gxlb, their multi-
# cluster variants, and classes this list does not know) counts as external.
INTERNAL_GATEWAY_CLASSES = frozenset({"gke-l7-rilb", "gke-l7-rilb-mc"})
EXTERNAL_GATEWAY_STACKS_KEY = "externalGatewayStacks"
EXTERNAL_GATEWAY_CONFIG = {
    EXTERNAL_GATEWAY_STACKS_KEY: {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "default": [],
        "description": "Stacks (exact names) allowed a Gateway of an external class (the stack's `gateway: external`); "
        "every other Gateway uses an internal class.",
    },
}


def is_gateway(resource: Resource) -> bool:
    return resource.type.startswith("kubernetes:gateway.networking.k8s.io/") and resource.kubernetes_kind == "Gateway"


def check_gateway_internal(resource: Resource, settings: Mapping[str, Any]) -> list[str]:
    gateway_class = _get(resource.props, "spec", "gatewayClassName")
    if gateway_class in INTERNAL_GATEWAY_CLASSES or resource.stack in tuple(settings[EXTERNAL_GATEWAY_STACKS_KEY]):
        return []
    internal = ", ".join(sorted(INTERNAL_GATEWAY_CLASSES))
    return [
        f"is a Gateway of class {gateway_class!r}, not an internal one ({internal}), so it may take an address "
        f"outside the VPC; use `gateway: internal`, or allow this stack an external gateway by adding "
        f"{resource.stack!r} to the pack's {EXTERNAL_GATEWAY_STACKS_KEY} setting (policy gateways-internal)"
    ]


# ---------------------------------------------------------------------------------------------
# Clusters keep deletion protection in production stacks.

CLUSTER = "gcp:container/cluster:Cluster"
# Stacks whose names start with one of these are production. "platform" because in the shipped
# layout the only cluster is the platform stack's, and every environment (prod included) runs on it.
PRODUCTION_STACK_PREFIXES_KEY = "productionStackPrefixes"
PRODUCTION_STACK_PREFIXES = ("prod", "platform")
PRODUCTION_STACKS_CONFIG = {
    PRODUCTION_STACK_PREFIXES_KEY: {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "default": list(PRODUCTION_STACK_PREFIXES),
        "description": "Stack-name prefixes of production stacks, whose clusters keep deletion protection.",
    },
}


def is_cluster(resource: Resource) -> bool:
    return resource.type == CLUSTER


def check_prod_cluster_deletion_protection(resource: Resource, settings: Mapping[str, Any]) -> list[str]:
    prefixes = tuple(settings[PRODUCTION_STACK_PREFIXES_KEY])
    # Absent means the provider default, which is true.
    if not resource.stack.startswith(prefixes) or resource.props.get("deletionProtection", True) is not False:
        return []
    return [
        f"turns deletionProtection off in the production stack {resource.stack!r} (a name starting with "
        f"{' or '.join(repr(prefix) for prefix in prefixes)}); keep it on. Before a planned deletion, turn it off "
        f"in a separate, reviewed `pulumi up` run without this policy pack (README, Environments: tear down)"
    ]


# ---------------------------------------------------------------------------------------------
# Node pools do not run as the Compute Engine default service account.

NODE_POOL = "gcp:container/nodePool:NodePool"
DEFAULT_COMPUTE_ACCOUNT = re.compile(r"\d+-compute@developer\.gserviceaccount\.com")


def creates_nodes(resource: Resource) -> bool:
    return resource.type in (NODE_POOL, CLUSTER)


def node_pool_configs(resource: Resource) -> Iterator[tuple[str, Any]]:
    """(where, nodeConfig) for every pool of nodes the resource creates."""
    props = resource.props
    if resource.type == NODE_POOL:
        yield f"node pool {props.get('name')!r}", props.get("nodeConfig")
    else:
        if props.get("enableAutopilot") is True:
            yield "Autopilot's provisioned nodes", _get(props, "clusterAutoscaling", "autoProvisioningDefaults")
        elif props.get("removeDefaultNodePool") is not True:
            yield "the default node pool", props.get("nodeConfig")
        for index, pool in enumerate(_items(props.get("nodePools"))):
            yield f"inline node pool {pool.get('name', index)!r}", pool.get("nodeConfig")


def runs_as_default_account(node_config: Any) -> bool:
    account = _get(node_config, "serviceAccount")
    return not account or account == "default" or bool(DEFAULT_COMPUTE_ACCOUNT.fullmatch(str(account)))


def check_node_pool_service_account(resource: Resource) -> list[str]:
    return [
        f"{where} runs as the Compute Engine default service account (serviceAccount unset or the "
        f"default one), which by default holds the project-wide Editor role; set a dedicated, least-privilege account"
        for where, node_config in node_pool_configs(resource)
        if runs_as_default_account(node_config)
    ]


# ---------------------------------------------------------------------------------------------
# Multi-host TPU slices keep COMPACT placement with their topology.

# TPU machine types end in the chips per VM: ct6e-standard-4t, ct5lp-hightpu-8t, tpu7x-standard-4t.
TPU_MACHINE_TYPE = re.compile(r"(?:ct|tpu)[a-z0-9]*-[a-z]+-(\d+)t")


def _tpu_machine(resource: Resource) -> re.Match | None:
    return TPU_MACHINE_TYPE.fullmatch(str(_get(resource.props, "nodeConfig", "machineType") or ""))


def is_tpu_node_pool(resource: Resource) -> bool:
    return resource.type == NODE_POOL and _tpu_machine(resource) is not None


# GKE joins VMs of 4 chips into multi-host slices (ct5lp-hightpu-4t, ct5p-hightpu-4t, ct6e-standard-4t,
# tpu7x-standard-4t); VMs of 1 or 8 chips are single-host slices only.
MULTI_HOST_CHIPS_PER_VM = 4
NODE_COUNT_PATHS = (
    ("nodeCount",),
    ("initialNodeCount",),
    ("autoscaling", "maxNodeCount"),
    ("autoscaling", "totalMaxNodeCount"),
)


def _most_nodes(resource: Resource) -> int:
    """The most nodes the pool may have: its fixed, initial or autoscaled maximum size."""
    counts = (_get(resource.props, *path) for path in NODE_COUNT_PATHS)
    return int(max((count for count in counts if isinstance(count, (int, float))), default=0))


def check_multi_host_tpu_placement(resource: Resource) -> list[str]:
    """A pool of several multi-host-capable TPU VMs is one slice only with a COMPACT placement
    carrying its tpuTopology. Without one, GKE accepts it and makes each VM a single-host slice,
    which the provider and GKE cannot tell from a mistake: the workload waiting for one slice of
    all the chips never schedules (a malformed topology, or one without COMPACT, GKE refuses itself)."""
    chips_per_vm = int(_tpu_machine(resource).group(1))
    nodes = _most_nodes(resource)
    if chips_per_vm != MULTI_HOST_CHIPS_PER_VM or nodes <= 1 or _get(resource.props, "placementPolicy", "tpuTopology"):
        return []
    machine_type = _get(resource.props, "nodeConfig", "machineType")
    return [
        (
            f"has up to {nodes} VMs of the multi-host machine type {machine_type} and no "
            f"placementPolicy.tpuTopology, so GKE makes {nodes} single-host slices of {chips_per_vm} chips "
            "instead of one slice; set placementPolicy "
            f"{{type: COMPACT, tpuTopology: <the slice's topology, e.g. 4x4>}}"
        )
    ]


# ---------------------------------------------------------------------------------------------
# LeaderWorkerSet containers that serve have a startup probe.

LWS_TEMPLATES = ("leaderTemplate", "workerTemplate")


def serves(container: Mapping[str, Any]) -> bool:
    """Kubernetes routes traffic by the readiness probe and restarts by the liveness probe: a
    container with either is one that serves."""
    return "readinessProbe" in container or "livenessProbe" in container


def is_leader_worker_set(resource: Resource) -> bool:
    return resource.kubernetes_kind == "LeaderWorkerSet"


def check_lws_startup_probes(resource: Resource) -> list[str]:
    """Without a startup probe, the readiness and liveness probes judge a serving container while its
    model is still loading, and liveness restarts it. The group is reached through its leader (the
    worker template when there is no leader template), so a container there must serve."""
    templates = {name: _get(resource.props, "spec", "leaderWorkerTemplate", name) for name in LWS_TEMPLATES}
    containers = {name: _items(_get(template, "spec", "containers")) for name, template in templates.items()}
    problems = [
        f"container {container.get('name')!r} in {name} serves (it has a readiness or liveness probe) "
        f"without a startupProbe, so it is judged and restarted while the model loads; add a startupProbe"
        for name in LWS_TEMPLATES
        for container in containers[name]
        if serves(container) and "startupProbe" not in container
    ]
    entry = "leaderTemplate" if templates["leaderTemplate"] is not None else "workerTemplate"
    if not any(serves(container) for container in containers[entry]):
        problems.append(
            f"no container in {entry} serves (none has a readiness or liveness probe), so traffic reaches "
            f"the group before the model is loaded; probe the serving container, with a startupProbe"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# A stack that exposes its servers to the VPC has them check an API key (advisory, a stack rule).

# How the servers learn the key clients must send: the bundled server takes it with --api-key or
# from the variable --api-key-env names (the stack passes API_KEY, from apiKeySecret); vLLM's
# api_server takes --api-key, else reads VLLM_API_KEY. A literal --api-key counts too: it is a key.
API_KEY_FLAG = "--api-key"
API_KEY_ENV_FLAG = "--api-key-env"
VLLM_API_KEY_ENV = "VLLM_API_KEY"


def exposes_servers(resource: Resource) -> bool:
    """An internal LoadBalancer Service (reachable from the whole VPC) or a Gateway."""
    return is_gateway(resource) or (
        is_service(resource) and _is_load_balancer(resource) and _has_internal_annotation(resource)
    )


def _namespace(resource: Resource) -> Any:
    return _get(resource.props, "metadata", "namespace")


def _command_line(container: Mapping[str, Any]) -> list[str]:
    """The container's command and args, split into words (a `sh -c` script included)."""
    return [
        word
        for item in (*_items(container.get("command")), *_items(container.get("args")))
        for word in str(item).split()
    ]


def _flag_values(words: Sequence[str], flag: str) -> list[str]:
    """The values a command line gives `flag`: `--flag VALUE` or `--flag=VALUE`."""
    return [
        *(words[index + 1] for index, word in enumerate(words[:-1]) if word == flag),
        *(word.split("=", 1)[1] for word in words if word.startswith(flag + "=")),
    ]


def checks_an_api_key(container: Mapping[str, Any]) -> bool:
    """The container's server gets a key: on its command line, or in a variable it reads the key from."""
    words = _command_line(container)
    if any(_flag_values(words, API_KEY_FLAG)):
        return True
    key_variables = {VLLM_API_KEY_ENV, *_flag_values(words, API_KEY_ENV_FLAG)}
    return any(
        variable.get("name") in key_variables and (variable.get("value") or variable.get("valueFrom"))
        for variable in _items(container.get("env"))
    )


def _serving_containers(resource: Resource) -> Sequence[Any]:
    """The containers of the group's entry pod: the leader, or the worker when there is no leader template."""
    templates = _get(resource.props, "spec", "leaderWorkerTemplate")
    entry = _get(templates, "leaderTemplate") or _get(templates, "workerTemplate")
    return _items(_get(entry, "spec", "containers"))


def check_exposed_servers_check_an_api_key(resources: Sequence[Resource]) -> list[tuple[str, str]]:
    """(urn of the Service or Gateway, message) for each LeaderWorkerSet in its namespace whose
    entry pod carries no API key: anyone who reaches the address can use the model."""
    servers = [resource for resource in resources if is_leader_worker_set(resource)]
    problems = []
    for exposure in filter(exposes_servers, resources):
        namespace = _namespace(exposure)
        for server in servers:
            if _namespace(server) != namespace or any(map(checks_an_api_key, _serving_containers(server))):
                continue
            what = "Gateway" if is_gateway(exposure) else "internal LoadBalancer Service"
            problems.append(
                (
                    exposure.urn,
                    (
                        f"the {what} {_get(exposure.props, 'metadata', 'name')!r} reaches the LeaderWorkerSet "
                        f"{_get(server.props, 'metadata', 'name')!r} in namespace {namespace!r}, "
                        "whose serving pods carry no "
                        f"API key ({API_KEY_FLAG}, the variable {API_KEY_ENV_FLAG} names, or {VLLM_API_KEY_ENV}), "
                        "so anyone "
                        f"in the VPC can use the model; set apiKeySecret (bundled or vllm runtime) or use serviceType "
                        f"ClusterIP"
                    ),
                )
            )
    return problems


def exposes_any_server(resources: Sequence[Resource]) -> bool:
    return any(map(exposes_servers, resources)) and any(map(is_leader_worker_set, resources))


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    description: str
    applies: Callable[[Resource], bool]
    check: Callable[..., list[str]]  # (resource) -> messages, or (resource, settings) for a rule with `config`
    config: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )  # setting -> JSON schema with a default

    def settings(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Each declared setting: the pack configuration's value, else its schema default."""
        given = given or {}
        return {key: given.get(key, schema["default"]) for key, schema in self.config.items()}

    def violations(self, resource: Resource, given: Mapping[str, Any] | None = None) -> list[str]:
        """What `check` finds, with the settings of `given` (the policy's configuration) where the rule has any."""
        return self.check(resource, self.settings(given)) if self.config else self.check(resource)


RULES: tuple[Rule, ...] = (
    Rule(
        "container-images-pinned",
        "Container images are pinned by a version tag or a digest, "
        "never untagged or a moving tag (:latest, :main, :stable).",
        is_workload,
        check_images_pinned,
    ),
    Rule(
        "no-primitive-iam-roles",
        "No IAM grant of the primitive roles owner, editor or viewer.",
        is_iam_grant,
        check_no_primitive_roles,
    ),
    Rule(
        "no-public-iam-members",
        "No IAM grant to allUsers or allAuthenticatedUsers.",
        is_iam_grant,
        check_no_public_members,
    ),
    Rule(
        "load-balancers-internal",
        "A Service of type LoadBalancer carries GKE's internal load-balancer annotation "
        "(or its legacy cloud.google.com form).",
        is_service,
        check_load_balancer_internal,
    ),
    Rule(
        "gateways-internal",
        "A Gateway uses an internal GatewayClass (gke-l7-rilb) unless the pack's configuration lists its stack in "
        f"{EXTERNAL_GATEWAY_STACKS_KEY} (default: none).",
        is_gateway,
        check_gateway_internal,
        config=EXTERNAL_GATEWAY_CONFIG,
    ),
    Rule(
        "prod-cluster-deletion-protection",
        "GKE clusters keep deletion protection in production stacks: names starting with a configured prefix "
        f"({PRODUCTION_STACK_PREFIXES_KEY}, default {', '.join(PRODUCTION_STACK_PREFIXES)}).",
        is_cluster,
        check_prod_cluster_deletion_protection,
        config=PRODUCTION_STACKS_CONFIG,
    ),
    Rule(
        "node-pools-not-default-service-account",
        "GKE nodes do not run as the Compute Engine default service account.",
        creates_nodes,
        check_node_pool_service_account,
    ),
    Rule(
        "multi-host-tpu-compact-placement",
        "A TPU node pool of several multi-host-capable VMs declares its slice's tpuTopology "
        "(else each VM is its own slice).",
        is_tpu_node_pool,
        check_multi_host_tpu_placement,
    ),
    Rule(
        "lws-serving-startup-probe",
        "LeaderWorkerSet containers that serve have a startup probe.",
        is_leader_worker_set,
        check_lws_startup_probes,
    ),
)


@dataclasses.dataclass(frozen=True)
class StackRule:
    """A rule over all of a stack's resources together; its findings are advisory (warnings)."""

    name: str
    description: str
    applies: Callable[[Sequence[Resource]], bool]
    check: Callable[[Sequence[Resource]], list[tuple[str, str]]]  # -> (urn of the resource at fault, message)


STACK_RULES: tuple[StackRule, ...] = (
    StackRule(
        "internal-endpoints-api-key",
        "Servers a stack exposes through an internal load balancer or a Gateway check an API key (warning).",
        exposes_any_server,
        check_exposed_servers_check_an_api_key,
    ),
)
