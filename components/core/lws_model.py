"""A typed model of the LeaderWorkerSet fields this stack uses, from the v0.10.0 CRD.

Written from `leaderworkerset.x-k8s.io/v1` in the LWS v0.10.0 CRD (the pod template fields are
core v1 PodSpec fields, which the CRD embeds). Frozen keyword-only dataclasses: a misspelled field
is a TypeError at construction; a field placed on the wrong object does not exist there either.
`to_dict` converts snake_case attributes to the CRD's camelCase names and drops unset (None)
fields. `tests/stack/test_stack_manifests.py` checks every field below against the CRD's
openAPIV3Schema (`tests/stack/schemas/lws-crd-v0.10.0.schema.json`, test data), so a field the CRD lacks fails a test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

API_VERSION = "leaderworkerset.x-k8s.io/v1"
KIND = "LeaderWorkerSet"
EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"
SUBGROUP_EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/subgroup-exclusive-topology"
LEADER_EXCLUDED = "LeaderExcluded"  # the leader is in no subgroup; workers 1..n fill them
AVAILABLE = "Available"  # the LeaderWorkerSet condition type once its groups are ready

# Fields the v0.10.0 update webhook refuses to change in place (pkg/webhooks/
# leaderworkerset_webhook.go, ValidateUpdate): subGroupPolicy cannot be added or removed and its
# subGroupSize is immutable; networkConfig.subdomainPolicy cannot be set back to null. A change
# under these paths must replace the LeaderWorkerSet (JetStreamServer: replace_on_changes).
REPLACE_ON_CHANGES = ("spec.leaderWorkerTemplate.subGroupPolicy", "spec.networkConfig")


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


class Model:
    def to_dict(self) -> dict[str, Any]:
        return {
            camel(field.name): _plain(getattr(self, field.name))
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        }


class KubernetesObject(Model):
    """An object the API server stores: its document starts with its apiVersion and kind."""

    api_version: ClassVar[str]
    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "kind": self.kind, **super().to_dict()}


def model(cls):
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@model
class ObjectMeta(Model):
    name: str | None = None
    namespace: str | None = None
    labels: Mapping[str, str] | None = None
    annotations: Mapping[str, str] | None = None


@model
class ObjectFieldSelector(Model):
    field_path: str  # e.g. metadata.name (the downward API)


@model
class SecretKeySelector(Model):
    name: str
    key: str


@model
class EnvVarSource(Model):
    field_ref: ObjectFieldSelector | None = None
    secret_key_ref: SecretKeySelector | None = None


@model
class EnvVar(Model):
    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None


@model
class ContainerPort(Model):
    container_port: int
    name: str | None = None
    protocol: str | None = None


@model
class HTTPGetAction(Model):
    path: str
    port: int
    scheme: str = "HTTP"


@model
class Probe(Model):
    http_get: HTTPGetAction
    period_seconds: int | None = None
    initial_delay_seconds: int | None = None
    failure_threshold: int | None = None


@model
class ResourceRequirements(Model):
    limits: Mapping[str, str] | None = None
    requests: Mapping[str, str] | None = None


@model
class Capabilities(Model):
    add: tuple[str, ...] | None = None


@model
class SecurityContext(Model):
    capabilities: Capabilities | None = None


@model
class VolumeMount(Model):
    name: str
    mount_path: str
    read_only: bool | None = None


@model
class Container(Model):
    name: str
    image: str
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    env: tuple[EnvVar, ...] | None = None
    image_pull_policy: str | None = None
    security_context: SecurityContext | None = None
    ports: tuple[ContainerPort, ...] | None = None
    resources: ResourceRequirements | None = None
    startup_probe: Probe | None = None
    liveness_probe: Probe | None = None
    readiness_probe: Probe | None = None
    volume_mounts: tuple[VolumeMount, ...] | None = None


@model
class Toleration(Model):
    key: str
    operator: str
    effect: str
    value: str | None = None  # operator Equal


@model
class EmptyDirVolumeSource(Model):
    medium: str | None = None  # "Memory": a tmpfs; unset = the node's disk
    size_limit: str | None = None  # a quantity, e.g. "200Gi"; unset = no limit


@model
class CSIVolumeSource(Model):
    driver: str
    read_only: bool | None = None
    volume_attributes: Mapping[str, str] | None = None


@model
class Volume(Model):
    """One of its sources is set."""

    name: str
    empty_dir: EmptyDirVolumeSource | None = None
    csi: CSIVolumeSource | None = None


@model
class PodSpec(Model):
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Toleration, ...] | None = None
    service_account_name: str | None = None
    containers: tuple[Container, ...] = ()
    # After `containers`, so the reference YAMLs' layout (which sets neither) keeps its key order.
    init_containers: tuple[Container, ...] | None = None
    volumes: tuple[Volume, ...] | None = None


@model
class PodTemplateSpec(Model):
    metadata: ObjectMeta | None = None
    spec: PodSpec | None = None


@model
class SubGroupPolicy(Model):
    sub_group_policy_type: str | None = None  # unset: LeaderWorker (the leader is in subgroup 0)
    sub_group_size: int


@model
class LeaderWorkerTemplate(Model):
    sub_group_policy: SubGroupPolicy | None = None
    leader_template: PodTemplateSpec | None = None
    size: int | None = None
    worker_template: PodTemplateSpec


@model
class LeaderWorkerSetSpec(Model):
    replicas: int | None = None
    leader_worker_template: LeaderWorkerTemplate


@model
class LeaderWorkerSet(KubernetesObject):
    api_version: ClassVar[str] = API_VERSION
    kind: ClassVar[str] = KIND
    metadata: ObjectMeta
    spec: LeaderWorkerSetSpec
