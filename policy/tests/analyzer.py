"""Resources through the pack's policies the way the Pulumi engine sends them.

Constructing `PolicyPack` serves it over gRPC and never returns, so this drives the analyzer servicer
the pack serves (pulumi-policy's `_PolicyAnalyzerServicer`, pinned in requirements.txt) with the
engine's `AnalyzeRequest`: the inputs travel as a protobuf Struct (numbers become floats), are
deserialized and wrapped in the unknown-checking proxies, and every violation comes back as an
`AnalyzeDiagnostic` of its policy.
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
from pulumi_policy import EnforcementLevel
from pulumi_policy.policy import _PolicyAnalyzerServicer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the pack's directory, as Pulumi runs it

from policies import PACK_NAME, POLICIES  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Violation:
    policy: str
    message: str
    mandatory: bool


def urn_of(stack: str, type_: str, name: str, project: str = "jetstream-tpu") -> str:
    return f"urn:pulumi:{stack}::{project}::{type_}::{name}"


def analyze_resource(type_: str, name: str, urn: str, props: Mapping[str, Any]) -> list[Violation]:
    """The violations of every policy of the pack for one resource."""
    properties = struct_pb2.Struct()
    properties.update(props)
    request = proto.AnalyzeRequest(type=type_, name=name, urn=urn, properties=properties)
    servicer = _PolicyAnalyzerServicer(PACK_NAME, "0.1.0", POLICIES, EnforcementLevel.ADVISORY)
    response = servicer.Analyze(request, None)
    return [Violation(policy=diagnostic.policyName, message=diagnostic.message,
                      mandatory=diagnostic.enforcementLevel == proto.MANDATORY)
            for diagnostic in response.diagnostics]


def analyze(type_: str, name: str, props: Mapping[str, Any], stack: str = "dev") -> list[Violation]:
    return analyze_resource(type_, name, urn_of(stack, type_, name), props)


def main() -> None:
    """`python policy/tests/analyzer.py` - stdin: a JSON list of {type, name, urn, inputs}; stdout: a JSON list of their violations."""
    violations = []
    for resource in json.load(sys.stdin):
        for violation in analyze_resource(resource["type"], resource["name"], resource["urn"], resource["inputs"]):
            violations.append({"urn": resource["urn"], **dataclasses.asdict(violation)})
    json.dump(violations, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
