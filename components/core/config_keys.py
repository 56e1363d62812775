"""A config key as Pulumi.yaml declares it, and how its raw value is read.

Its own module so that `config_table.py`, which holds the stack's key table, and the modules that
declare keys of their own (`config_scaling.py`, `config_gateway.py`) share it without importing each other.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping

from components.core.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigKey:
    """One config key as Pulumi.yaml declares it and the docs describe it."""

    name: str
    type: str  # Pulumi project config type: string | integer | boolean
    description: str
    default: str | int | bool | None = None  # None: required

    @property
    def default_text(self) -> str:
        """The default as Pulumi hands it to the program (booleans lowercase)."""
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)


def read_text(raw: Mapping[str, str], key: ConfigKey) -> str:
    """The key's value, stripped, or its default; ConfigError if it is required and not set."""
    if key.name in raw:
        return str(raw[key.name]).strip()
    if key.default is None:
        raise ConfigError(key.name, "is required and not set", f"pulumi config set {key.name} <value>")
    return key.default_text


def is_set(raw: Mapping[str, str], key: ConfigKey) -> bool:
    """Set to something other than its default. Pulumi hands the program every declared key, with
    the schema's default where the stack sets none, so "given" cannot mean "present"."""
    value = read_text(raw, key)
    return (value.lower() if key.type == "boolean" else value) != key.default_text


def closest(text: str, choices: Iterable[str]) -> str:
    """The suggestion for a value outside `choices`: the nearest one, else the list."""
    choices = list(choices)
    close = difflib.get_close_matches(text, choices, n=1)
    return f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(choices)}"


def read_choice(raw: Mapping[str, str], key: ConfigKey, choices: Iterable[str], suggestion: str = "") -> str:
    """The key's value, one of `choices`; ConfigError naming them otherwise, with `suggestion` (or
    the nearest choice)."""
    choices = list(choices)
    text = read_text(raw, key)
    if text not in choices:
        raise ConfigError(
            key.name, f"{text!r} is not one of {', '.join(choices)}", suggestion or closest(text, choices)
        )
    return text


def read_integer(raw: Mapping[str, str], key: ConfigKey) -> int:
    text = read_text(raw, key)
    try:
        return int(text)
    except ValueError:
        raise ConfigError(key.name, f"expected an integer, got {text!r}", f"pulumi config set {key.name} 4") from None
