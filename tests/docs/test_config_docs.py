"""Pulumi.yaml's `config:` block and docs/stack/config-keys.md are generated from CONFIG_KEYS, and stay so."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from components import config_docs
from components.core.config_table import CONFIG_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_regenerating_changes_nothing():
    assert config_docs.stale_files(ROOT, CONFIG_KEYS) == [], "run: python -m components.config_docs"


def test_a_description_changed_in_the_table_alone_makes_both_files_stale():
    changed = tuple(
        dataclasses.replace(key, description=key.description + " Changed.") if key.name == "zone" else key
        for key in CONFIG_KEYS
    )
    assert config_docs.stale_files(ROOT, changed) == [config_docs.PULUMI_YAML, config_docs.CONFIG_KEYS_PAGE]


def test_the_schema_declares_every_key_with_its_type_default_and_description():
    declared = yaml.safe_load(config_docs.pulumi_config_block(CONFIG_KEYS))["config"]
    assert list(declared) == [key.name for key in CONFIG_KEYS]
    for key in CONFIG_KEYS:
        assert declared[key.name] == {"type": key.type, "description": key.description, "default": key.default}


def test_only_the_config_block_of_pulumi_yaml_is_replaced():
    head = "name: p\nruntime: python\ndescription: >-\n  two\n  lines\n"
    old = head + "# old comment\nconfig:\n  a:\n    type: string\n"
    assert config_docs.with_config_block(old, "# new\nconfig: {}\n") == head + "# new\nconfig: {}\n"


@pytest.mark.parametrize(
    "text,problem",
    [
        ("name: p\n", "expected one top-level `config:` line, found 0"),
        ("config:\n  a: 1\nbackend:\n  url: x\n", "`config:` must be the last top-level key, found 'backend:'"),
    ],
)
def test_a_pulumi_yaml_the_generator_cannot_update_is_refused(text, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        config_docs.with_config_block(text, "config: {}\n")


def test_the_page_has_one_row_per_key_in_table_order_with_html_escaped_outside_code():
    page = config_docs.config_keys_page(CONFIG_KEYS)
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [key.name for key in CONFIG_KEYS]
    namespace_row = next(row for row in rows if row.startswith("| `namespace`"))
    assert "jetstream-&lt;stack&gt;" in namespace_row and "`default`" in namespace_row


def test_the_command_writes_a_stale_checkout_back_and_check_reports_it(tmp_path):
    shutil.copy(ROOT / config_docs.PULUMI_YAML, tmp_path)
    page = tmp_path / config_docs.CONFIG_KEYS_PAGE
    page.parent.mkdir(parents=True)
    page.write_text("stale\n")

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "components.config_docs", "--root", str(tmp_path), *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    check = run("--check")
    assert check.returncode == 1 and "docs/stack/config-keys.md is stale" in check.stderr
    assert "Pulumi.yaml" not in check.stderr
    assert run().returncode == 0
    assert run("--check").returncode == 0
    assert page.read_text() == (ROOT / config_docs.CONFIG_KEYS_PAGE).read_text()
