"""The one error a bad stack configuration raises, before any resource exists."""

from __future__ import annotations


class ConfigError(ValueError):
    """A stack config that cannot be deployed.

    The message names the config key(s), the offending numbers or value, and a suggestion, so
    `pulumi preview` and the offline renderer print the same actionable line.
    """

    def __init__(self, keys: str | tuple[str, ...], problem: str, suggestion: str):
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        self.problem = problem
        self.suggestion = suggestion
        named = ", ".join(f"`{key}`" for key in self.keys)
        super().__init__(f"config {named}: {problem}. Suggestion: {suggestion}")
