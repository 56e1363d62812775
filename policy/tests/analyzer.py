"""Resources through the pack's policies the way the Pulumi engine sends them.

Constructing `PolicyPack` serves it over gRPC and never returns, so this drives the analyzer servicer
the pack serves (pulumi-policy's `_PolicyAnalyzerServicer`, pinned in requirements.txt) with the
engine's `AnalyzeRequest`: the inputs travel as a protobuf Struct (numbers become floats), are
deserialized and wrapped in the unknown-checking proxies, and every violation comes back as an
`AnalyzeDiagnostic` of its policy. A stack's resources together go through the stack policies with
the engine's `AnalyzeStackRequest`. A policy's configuration reaches the servicer as the engine sends
it, through `Configure` (what `--policy-pack-config` holds, per policy name).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2
from pulumi.runtime import proto
from pulumi_policy import EnforcementLevel, ResourceValidationPolicy, StackValidationPolicy
from pulumi_policy.policy import _PolicyAnalyzerServicer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the pack's directory, as Pulumi runs it

from policies import PACK_NAME, POLICIES  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Violation:
    policy: str
    message: str
    mandatory: bool
    urn: str = ""  # the resource a stack policy names; empty for a resource policy's (it judges one resource)


@dataclasses.dataclass(frozen=True)
class Analysis:
    violations: list[Violation]
    not_applicable: set[str]  # the policies that do not judge this resource (or stack)
    kind: type = ResourceValidationPolicy  # the policies the request runs: resource or stack ones

    @property
    def applicable(self) -> list[str]:
        return [
            policy.name
            for policy in POLICIES
            if isinstance(policy, self.kind) and policy.name not in self.not_applicable
        ]


def urn_of(stack: str, type_: str, name: str, project: str = "jetstream-tpu") -> str:
    return f"urn:pulumi:{stack}::{project}::{type_}::{name}"


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _servicer(config: Mapping[str, Mapping[str, Any]] | None) -> _PolicyAnalyzerServicer:
    servicer = _PolicyAnalyzerServicer(PACK_NAME, "0.1.0", POLICIES, EnforcementLevel.ADVISORY)
    if config:  # with the level of each resource policy (all mandatory), as the engine sends it
        servicer.Configure(
            proto.ConfigureAnalyzerRequest(
                policyConfig={
                    policy: proto.PolicyConfig(enforcementLevel=proto.MANDATORY, properties=_struct(settings))
                    for policy, settings in config.items()
                }
            ),
            None,
        )
    return servicer


def _analysis(response: proto.AnalyzeResponse, kind: type) -> Analysis:
    violations = [
        Violation(
            policy=diagnostic.policyName,
            message=diagnostic.message,
            mandatory=diagnostic.enforcementLevel == proto.MANDATORY,
            urn=diagnostic.urn,
        )
        for diagnostic in response.diagnostics
    ]
    return Analysis(violations, {entry.policy_name for entry in response.not_applicable}, kind)


def analyze_resource(
    type_: str, name: str, urn: str, props: Mapping[str, Any], config: Mapping[str, Mapping[str, Any]] | None = None
) -> Analysis:
    """What every resource policy of the pack says about one resource; `config`: settings per policy name."""
    request = proto.AnalyzeRequest(type=type_, name=name, urn=urn, properties=_struct(props))
    return _analysis(_servicer(config).Analyze(request, None), ResourceValidationPolicy)


def analyze_stack(resources: list[Mapping[str, Any]]) -> Analysis:
    """What every stack policy of the pack says about a stack's resources, each {type, name, urn, inputs}."""
    request = proto.AnalyzeStackRequest(
        resources=[
            proto.AnalyzerResource(
                type=resource["type"],
                name=resource["name"],
                urn=resource["urn"],
                properties=_struct(resource["inputs"]),
            )
            for resource in resources
        ]
    )
    return _analysis(_servicer(None).AnalyzeStack(request, None), StackValidationPolicy)


def analyze(
    type_: str,
    name: str,
    props: Mapping[str, Any],
    stack: str = "dev",
    config: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Violation]:
    return analyze_resource(type_, name, urn_of(stack, type_, name), props, config).violations


def main() -> None:
    """`python policy/tests/analyzer.py` - stdin: a JSON list of one stack's {type, name, urn, inputs};
    stdout: the pack's policies; per resource, its violations and the resource policies that judge it;
    for the stack as a whole, the stack policies' violations and the stack policies that judge it."""
    stack = json.load(sys.stdin)
    resources = []
    for resource in stack:
        analysis = analyze_resource(resource["type"], resource["name"], resource["urn"], resource["inputs"])
        resources.append(
            {
                "urn": resource["urn"],
                "applicable": analysis.applicable,
                "violations": [dataclasses.asdict(violation) for violation in analysis.violations],
            }
        )
    stack_analysis = analyze_stack(stack)
    json.dump(
        {
            "policies": [policy.name for policy in POLICIES],
            "resources": resources,
            "stack": {
                "applicable": stack_analysis.applicable,
                "violations": [dataclasses.asdict(violation) for violation in stack_analysis.violations],
            },
        },
        sys.stdout,
        indent=1,
    )


if __name__ == "__main__":
    main()
