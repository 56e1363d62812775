"""A typed model of the core v1 objects the stack applies beside the LeaderWorkerSet.

The Namespace, the ServiceAccount the pods run as and the Service, in the style of `lws_model`
(frozen keyword-only dataclasses, snake_case attributes, `to_dict` to the API's camelCase names
with unset fields dropped): the manifests hand these objects to the renderer and to
`JetStreamServer`, which turn them into a YAML document or Pulumi arguments only at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from components.core.lws_model import KubernetesObject, Model, ObjectMeta, model

CORE_V1 = "v1"


@model
class Namespace(KubernetesObject):
    api_version: ClassVar[str] = CORE_V1
    kind: ClassVar[str] = "Namespace"
    metadata: ObjectMeta


@model
class ServiceAccount(KubernetesObject):
    api_version: ClassVar[str] = CORE_V1
    kind: ClassVar[str] = "ServiceAccount"
    metadata: ObjectMeta  # its annotations may hold an Output (the Workload Identity GSA's email)


@model
class ServicePort(Model):
    protocol: str
    name: str
    port: int
    target_port: int


@model
class ServiceSpec(Model):
    type: str  # ClusterIP | LoadBalancer
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]


@model
class Service(KubernetesObject):
    api_version: ClassVar[str] = CORE_V1
    kind: ClassVar[str] = "Service"
    metadata: ObjectMeta
    spec: ServiceSpec
