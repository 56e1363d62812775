"""Runs the policy pack from the main suite: the pack lives in its own virtualenv (policy/venv, made
by ./setup.sh), so its code runs there, in a subprocess, never in this interpreter."""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACK = ROOT / "policy"
PACK_PYTHON = PACK / "venv" / "bin" / "python"
MISSING_VENV = "policy/venv is missing: ./setup.sh creates the policy pack's virtualenv (policy/requirements-test.txt)"


def run_in_pack_venv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PACK_PYTHON.exists(), MISSING_VENV
    return subprocess.run(
        [str(PACK_PYTHON), *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


def analysis_of(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """What the pack says about one stack's `resources` ({type, name, urn, inputs}), as the engine would send
    them: {"policies": [names], "resources": [{"urn", "applicable": [policies judging it], "violations": [...]}],
    "stack": {"applicable": [stack policies judging the stack], "violations": [...]}}."""
    # An input JSON cannot carry as it is (an asset, say) travels as its text; no policy reads one.
    result = run_in_pack_venv("policy/tests/analyzer.py", stdin=json.dumps(resources, default=str))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def violations_of(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every violation, {policy, message, mandatory, urn}: the resource policies', then the stack policies'."""
    analysis = analysis_of(resources)
    return [
        *(
            {**violation, "urn": resource["urn"]}
            for resource in analysis["resources"]
            for violation in resource["violations"]
        ),
        *analysis["stack"]["violations"],
    ]
