"""Pure helpers shared by the stack tests (no Pulumi): parse example stacks, load the golden data."""

from __future__ import annotations

import functools
import json
import pathlib

import jsonschema

from components.core.config import StackConfig, parse_stack_config
from components.core.planner import Plan, plan_deployment
from components.render import read_stack_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
CRD_SCHEMA = ROOT / "tests" / "stack" / "schemas" / "lws-crd-v0.10.0.schema.json"
POD_MONITORING_SCHEMA = ROOT / "tests" / "stack" / "schemas" / "podmonitoring-crd-v0.17.2.schema.json"


def example(stack: str) -> tuple[StackConfig, Plan]:
    raw, project = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    cfg = parse_stack_config(raw, project=project, stack=stack)
    return cfg, plan_deployment(cfg)


def config(project: str = "test-project", stack: str = "test", **raw: str) -> StackConfig:
    values = {"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-checkpoints/m/0/items", **raw}
    return parse_stack_config(values, project=project, stack=stack)


def lws_openapi_schema() -> dict:
    return json.loads(CRD_SCHEMA.read_text())["openAPIV3Schema"]


def strict(schema):
    """The CRD schema as the API server applies it: unknown fields are not kept.

    A structural schema prunes unknown fields silently; a test should fail instead, so every
    object with declared properties gets additionalProperties: false.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        tightened["additionalProperties"] = False
    return tightened


def _validator(openapi_schema: dict) -> jsonschema.protocols.Validator:
    schema = strict(openapi_schema)
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_class.check_schema(schema)
    return validator_class(schema)


@functools.lru_cache(maxsize=1)
def lws_validator() -> jsonschema.protocols.Validator:
    """A validator for the strict CRD schema, built (and checked) once per test session."""
    return _validator(lws_openapi_schema())


@functools.lru_cache(maxsize=1)
def pod_monitoring_validator() -> jsonschema.protocols.Validator:
    """The PodMonitoring CRD schema (prometheus-engine v0.17.2) as the API server applies it, unknown fields refused."""
    return _validator(json.loads(POD_MONITORING_SCHEMA.read_text())["openAPIV3Schema"])


# serverRuntime=bundled variants of the example stacks: this repository's server image and a
# .npz checkpoint object in the stack's checkpoint bucket. Disaggregated stacks are refused.
BUNDLED_IMAGE = "registry.example/jetstream-jax:0.1.0-tpu"
BUNDLED_STACKS = ("llama3-405b-v6e16", "llama3-8b-v6e8")
BUNDLED_REFUSED_STACKS = ("llama2-70b-disagg",)
# The bundled server keeps a whole weight copy per autoregressive shard, so the 405B reference recipe
# (tensor 8 x autoregressive 2) needs 47 GiB per chip there; fsdp 2 shards the weights instead.
BUNDLED_PARALLELISM = {
    "llama3-405b-v6e16": {"tensorParallelism": "8", "autoregressiveParallelism": "1", "fsdpParallelism": "2"}
}


def bundled_raw(stack: str, checkpoint_file: str = "model.npz") -> tuple[dict[str, str], str | None]:
    raw, project = read_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    bucket = raw["checkpointPath"].removeprefix("gs://").split("/", 1)[0]
    return {
        **raw,
        "serverRuntime": "bundled",
        "bundledServerImage": BUNDLED_IMAGE,
        "checkpointPath": f"gs://{bucket}/{stack}/{checkpoint_file}",
        **BUNDLED_PARALLELISM.get(stack, {}),
    }, project


def bundled_example(stack: str, checkpoint_file: str = "model.npz") -> tuple[StackConfig, Plan]:
    raw, project = bundled_raw(stack, checkpoint_file)
    cfg = parse_stack_config(raw, project=project, stack=stack)
    return cfg, plan_deployment(cfg)


# The gateway's objects, by kind: the upstream CRD schemas (tests/stack/schemas/gateway-crds.source.md).
GATEWAY_SCHEMAS = {
    "Gateway": "gateway-crd-v1.3.0.schema.json",
    "HTTPRoute": "httproute-crd-v1.3.0.schema.json",
    "InferencePool": "inferencepool-crd-v1.3.0.schema.json",
    "HealthCheckPolicy": "healthcheckpolicy-crd-gke-v1.schema.json",
    "GCPBackendPolicy": "gcpbackendpolicy-crd-gke-v1.schema.json",
}


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The CRD schema of one of GATEWAY_SCHEMAS' kinds, unknown fields refused."""
    return _validator(json.loads((ROOT / "tests" / "stack" / "schemas" / GATEWAY_SCHEMAS[kind]).read_text()))
