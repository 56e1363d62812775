"""The runtime choice: `serverRuntime` picks the `ServerRuntime` (components/core/runtimes/) once,
and the keys whose parsing depends on it are read here, among them the server's own settings
(`ServerSettings`), whose checkpoint schemes and planned flags are the runtime's.

A key only another runtime reads is refused; the checkpoint schemes, the image keys, the flags
the stack plans and whether the server checks an API key are the runtime's answers: nothing here
names a runtime.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping

from components.core import models
from components.core.config_keys import is_set
from components.core.config_table import KEYS_BY_NAME, QUANTIZATIONS, SERVER_RUNTIMES
from components.core.config_values import (
    BATCH_RANGE,
    HBM_RESERVE_RANGE,
    PREFILL_RANGE,
    TARGET_RANGE,
    boolean_of,
    bounded,
    choice_of,
    integer_of,
    parse_parallelism,
    preset_integer,
    required_text,
    text_of,
)
from components.core.errors import ConfigError
from components.core.runtimes import RUNTIMES, ServerRuntime
from components.core.runtimes.gcs_fuse import GCS_SCHEME
from components.core.server_secrets import secret_id

_GCS_URI = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](/[^\s]*)?$")
_IMAGE_PINNED = re.compile(r"^[\w.\-/:]+(:[\w][\w.\-]{0,127}|@sha256:[0-9a-f]{64})$")


def choose_runtime(raw: Mapping[str, str]) -> ServerRuntime:
    """The runtime `serverRuntime` names; ConfigError if a key only another runtime reads is set."""
    runtime = RUNTIMES[choice_of(raw, "serverRuntime", SERVER_RUNTIMES)]
    _check_runtime_keys(raw, runtime)
    return runtime


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The model server's own settings, as the stack plans them: what it loads, how it quantizes,
    how long and how many its sequences are, how it shards, the HBM it leaves free and the flags
    passed through. Every runtime turns them into its flags (runtimes/); the planner checks that
    they fit the slice. Presets are already applied."""

    quantization: str
    checkpoint_path: str  # gs://, or another scheme the runtime reads (hf:// for vLLM); no trailing /
    quantize_kv_cache: bool
    per_device_batch_size: int
    max_prefill_length: int
    max_target_length: int
    parallelism: Mapping[str, int]  # mesh axis -> size, only the axes the user set (-1 = fill in)
    hbm_reserve_percent: int
    flags: Mapping[str, str]  # serverFlags: none of them a flag the stack plans

    @property
    def checkpoint_file(self) -> str:
        """Object name of the checkpoint (the file the bundled server loads after the copy)."""
        return self.checkpoint_path.rsplit("/", 1)[-1]


def parse_server_settings(raw: Mapping[str, str], preset: models.ModelPreset, runtime: ServerRuntime) -> ServerSettings:
    """The server's settings, the preset's where a key is left at its preset default; parsed in
    the order their errors surface."""
    return ServerSettings(
        quantization=choice_of(raw, "quantization", QUANTIZATIONS),
        checkpoint_path=parse_checkpoint_path(raw, runtime),
        quantize_kv_cache=boolean_of(raw, "quantizeKvCache"),
        per_device_batch_size=bounded(
            "perDeviceBatchSize", preset_integer(raw, "perDeviceBatchSize", preset.per_device_batch_size), BATCH_RANGE
        ),
        max_prefill_length=bounded(
            "maxPrefillLength", preset_integer(raw, "maxPrefillLength", preset.max_prefill_length), PREFILL_RANGE
        ),
        max_target_length=bounded(
            "maxTargetLength", preset_integer(raw, "maxTargetLength", preset.max_target_length), TARGET_RANGE
        ),
        parallelism=parse_parallelism(raw),
        hbm_reserve_percent=bounded("hbmReservePercent", integer_of(raw, "hbmReservePercent"), HBM_RESERVE_RANGE),
        flags=parse_server_flags(raw, runtime.planned_flags),
    )


def _check_runtime_keys(raw: Mapping[str, str], runtime: ServerRuntime) -> None:
    """Refuse a key only another runtime reads (its images, the Hugging Face token)."""
    for other in RUNTIMES.values():
        for name in set(other.keys) - set(runtime.keys):
            if is_set(raw, KEYS_BY_NAME[name]):
                raise ConfigError(
                    (name, "serverRuntime"),
                    (
                        f"{name} is set, but serverRuntime={runtime.name} does not use it (serverRuntime={other.name} "
                        f"does)"
                    ),
                    f"remove {name}, or pulumi config set serverRuntime {other.name}",
                )


def parse_checkpoint_path(raw: Mapping[str, str], runtime: ServerRuntime) -> str:
    """A gs:// path, or another scheme the runtime reads (the runtime checks the rest)."""
    path = required_text(raw, "checkpointPath")
    other_schemes = [scheme for scheme in runtime.checkpoint_schemes if scheme != GCS_SCHEME]
    if not _GCS_URI.match(path) and not path.startswith(tuple(other_schemes)):
        also = "".join(f" or a {scheme} URI" for scheme in other_schemes)
        raise ConfigError(
            "checkpointPath",
            f"{path!r} is not a gs:// URI of a bucket path{also}",
            "pulumi config set checkpointPath gs://my-bucket/llama/checkpoints/0/items",
        )
    return path.rstrip("/")


def parse_server_flags(raw: Mapping[str, str], planned: Mapping[str, str]) -> dict[str, str]:
    text = text_of(raw, "serverFlags")
    try:
        flags = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            "serverFlags",
            f"not valid JSON ({error.msg} at character {error.pos})",
            'use a JSON object, e.g. {"enable_model_warmup": "false"}',
        ) from None
    if not isinstance(flags, dict) or not all(
        isinstance(key, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", key) for key in flags
    ):
        raise ConfigError(
            "serverFlags",
            "must be a JSON object whose keys are the server's flag names (lowercase, '_')",
            'e.g. {"enable_model_warmup": "false"}',
        )
    _check_not_planned(flags, planned)
    return {key: _flag_text(value) for key, value in flags.items()}


def _check_not_planned(flags: Mapping[str, str], planned: Mapping[str, str]) -> None:
    """Refuse a flag the stack derives from a key: it would bypass the planner's checks."""
    for flag in flags:
        if flag in planned:
            key = planned[flag]
            raise ConfigError(
                ("serverFlags", key),
                f"{flag} is planned from `{key}` and cannot be overridden here",
                f"pulumi config set {key} <value> and remove {flag} from serverFlags",
            )


def _flag_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_images(raw: Mapping[str, str], runtime: ServerRuntime) -> dict[str, str]:
    images = {name: text_of(raw, name) for name in runtime.image_keys}
    for name, image in images.items():
        if name == runtime.built_image_key and not image:
            continue  # the stack builds it (StackConfig.builds_server_image)
        if not _IMAGE_PINNED.match(image) or image.endswith(":latest"):
            raise ConfigError(
                name,
                f"{image!r} is not pinned to an explicit tag or digest (imagePullPolicy is IfNotPresent)",
                "use a release tag such as :v0.2.0 or an @sha256: digest",
            )
    return images


def parse_api_key_secret(raw: Mapping[str, str], runtime: ServerRuntime) -> str:
    name = secret_id(text_of(raw, "apiKeySecret"), "apiKeySecret")
    if name and runtime.api_key_env is None:
        servers = " or ".join(f"serverRuntime={other.name}" for other in RUNTIMES.values() if other.api_key_env)
        raise ConfigError(
            ("apiKeySecret", "serverRuntime"),
            f"serverRuntime={runtime.name} has no API key check (JetStream's front ends take none)",
            f"use {servers}, or remove apiKeySecret",
        )
    return name
