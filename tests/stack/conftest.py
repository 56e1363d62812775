"""Fixtures for the stack tests; the Pulumi mock harness itself is in pulumi_harness.py.

Test modules import helpers from pulumi_harness / stack_helpers, never from `conftest`: with
several test folders each having a conftest, `from conftest import` resolves to whichever was
imported first.
"""

from __future__ import annotations

import pytest
from pulumi_harness import GCP_PROJECT, qualified


@pytest.fixture
def minimal_config() -> dict[str, str]:
    """A small valid stack config (fully qualified keys)."""
    return {
        "gcp:project": GCP_PROJECT,
        **qualified({"model": "llama3.1-8b", "topology": "2x2", "checkpointPath": "gs://test-checkpoints/llama3.1-8b/0/items"}),
    }
