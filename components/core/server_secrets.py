"""Secrets the server reads from its environment, kept out of the stack's config.

A key such as `hfTokenSecret` or `apiKeySecret` names a Secret Manager secret in the stack's
project. `pulumi up` reads its latest version with the deployer's credentials and writes it into a
Kubernetes Secret in the stack's namespace (Pulumi keeps the value encrypted in its state); the
server container gets it as an environment variable through a `secretKeyRef`. The pods need no
Secret Manager access, and the value never appears in a stack file. The offline render cannot
read Secret Manager: it prints where each Secret comes from instead (`summary`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from components.core import lws_model as lws
from components.core.errors import ConfigError

_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # Secret Manager secret ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecretEnv:
    """One environment variable of the server, from a Kubernetes Secret made from Secret Manager."""

    env: str  # the variable the server reads
    config_key: str  # the key naming the Secret Manager secret
    secret_id: str  # the Secret Manager secret, in the stack's project
    name: str  # the Kubernetes Secret
    data_key: str  # its key holding the value


def secret_id(value: str, key: str) -> str:
    """`value` if it is a Secret Manager secret id, else ConfigError naming `key`."""
    if value and not _SECRET_ID.match(value):
        raise ConfigError(
            key,
            f"{value!r} is not a Secret Manager secret id",
            "the secret's name in gcp:project (letters, digits, '_' and '-'), not its resource path",
        )
    return value


def env_vars(secrets: tuple[SecretEnv, ...]) -> tuple[lws.EnvVar, ...]:
    return tuple(
        lws.EnvVar(
            name=secret.env,
            value_from=lws.EnvVarSource(secret_key_ref=lws.SecretKeySelector(name=secret.name, key=secret.data_key)),
        )
        for secret in secrets
    )


def kubernetes_secret(secret: SecretEnv, namespace: str, value: Any) -> dict:
    """The Kubernetes Secret; `value` is the Secret Manager secret's, read at deploy time (a Pulumi secret Output)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret.name, "namespace": namespace},
        "type": "Opaque",
        "stringData": {secret.data_key: value},
    }


def summary(secret: SecretEnv, namespace: str) -> str:
    """Where the Secret comes from, for the plan."""
    by_hand = (
        f"kubectl -n {namespace} create secret generic {secret.name} --from-literal={secret.data_key}="
        f"$(gcloud secrets versions access latest --secret={secret.secret_id})"
    )
    return (
        f"{secret.env} from Secret {namespace}/{secret.name} (key {secret.data_key}), made from Secret Manager secret "
        f"{secret.secret_id} by pulumi up; by hand: {by_hand}"
    )
