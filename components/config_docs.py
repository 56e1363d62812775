"""Config-key docs from the key table: `python -m components.config_docs [--check]`.

`CONFIG_KEYS` is the one source of the stack's config keys. This command writes what is derived
from it: the `config:` block of `Pulumi.yaml` (the schema the Pulumi CLI enforces; everything above
the block is left as it is) and the reference page `docs/stack/config-keys.md`. `--check` writes
nothing and exits 1 naming the files that differ from what the table gives; the test suite runs
the same comparison, so a description changed in the table alone fails until both are regenerated.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from collections.abc import Iterable, Sequence

import yaml

from components.core.config_keys import ConfigKey
from components.core.config_table import CONFIG_KEYS, PROJECT

ROOT = pathlib.Path(__file__).resolve().parent.parent
PULUMI_YAML = pathlib.Path("Pulumi.yaml")
CONFIG_KEYS_PAGE = pathlib.Path("docs/stack/config-keys.md")
COMMAND = "python -m components.config_docs"

SCHEMA_HEADER = f"""\
# Project config schema, generated from CONFIG_KEYS (components/core/config_table.py) by
# `{COMMAND}`: edit the table and rerun it, never this block (tests/docs fails
# when the two differ). Keys without a default would be required, and the CLI refuses keys not
# declared here. model, topology and checkpointPath default to "" so that a role=platform stack
# needs none of them; the program refuses a stack that serves without them. Integer keys whose
# default is 0 take the model preset's value; name keys whose default is "" are derived from the
# stack name. Values reach the program as strings (serverFlags as JSON).
"""

PAGE_INTRO = f"""\
# Config keys

<!-- Generated from CONFIG_KEYS (components/core/config_table.py) by `{COMMAND}`; do not edit. -->

All keys live in the project namespace (`{PROJECT}:<key>`, i.e. `pulumi config set <key>`).
`gcp:project` (the standard GCP provider key) is required too.

- Values arrive as strings; `serverFlags` is JSON.
- Integer keys with default `0` take the model preset's value ([model presets](planning.md#model-presets)).
- Name keys with default `""` are derived from the stack name (within GKE's, IAM's and Cloud
  Storage's length rules, with a hash of the stack name when it has to be cut or changed), so stacks
  never collide.
- `model`, `topology` and `checkpointPath` are declared with an empty default, so that a platform
  stack needs none of them; a stack that serves is refused at preview without them.
- Pulumi hands the program every declared key with its default filled in, so a key counts as set
  only when its value differs from the default. A key the stack's `role` does not use is refused
  when set ([environments](environments.md)).
- The program reads the keys through `pulumi.Config`; `pulumi` itself refuses a key `Pulumi.yaml`
  does not declare, and the offline render refuses it with a did-you-mean suggestion.

This page and the `config:` block of `Pulumi.yaml` are generated from one table, `CONFIG_KEYS` in
`components/core/config_table.py`: change a key there, then run `{COMMAND}`.

| Key | Type | Default | Meaning |
|---|---|---|---|
"""


def pulumi_config_block(keys: Iterable[ConfigKey]) -> str:
    """The `config:` block of Pulumi.yaml, its header comment included."""
    schema = {key.name: {"type": key.type, "description": key.description, "default": key.default} for key in keys}
    return SCHEMA_HEADER + yaml.safe_dump({"config": schema}, sort_keys=False, width=float("inf"), allow_unicode=True)


def with_config_block(project_yaml: str, block: str) -> str:
    """Pulumi.yaml with its `config:` block (and the comment lines right above it) replaced.

    The block must be the file's last top-level key, so that everything before it is kept as is."""
    lines = project_yaml.splitlines(keepends=True)
    starts = [index for index, line in enumerate(lines) if line.rstrip("\n") == "config:"]
    if len(starts) != 1:
        raise ValueError(f"{PULUMI_YAML}: expected one top-level `config:` line, found {len(starts)}")
    later_keys = [line for line in lines[starts[0] + 1 :] if re.match(r"[^\s#]", line)]
    if later_keys:
        raise ValueError(f"{PULUMI_YAML}: `config:` must be the last top-level key, found {later_keys[0].strip()!r}")
    start = starts[0]
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    return "".join(lines[:start]) + block


def _markdown_text(text: str) -> str:
    """Table-cell text: `|` escaped everywhere, `<`, `>` and `&` outside code spans (`<stack>` would
    otherwise be read as an HTML tag)."""
    pieces = text.replace("|", r"\|").split("`")
    for index in range(0, len(pieces), 2):
        pieces[index] = pieces[index].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(pieces)


def _default_cell(key: ConfigKey) -> str:
    return '`""`' if key.default_text == "" else f"`{key.default_text}`"


def config_keys_page(keys: Iterable[ConfigKey]) -> str:
    """The reference page: the conventions, then one table row per key, in the table's order."""
    rows = (
        f"| `{key.name}` | {key.type} | {_default_cell(key)} | {_markdown_text(key.description)} |\n" for key in keys
    )
    return PAGE_INTRO + "".join(rows)


def generated_files(root: pathlib.Path, keys: Sequence[ConfigKey]) -> dict[pathlib.Path, str]:
    """Each generated file (relative to root) and the text the key table gives it."""
    project_yaml = (root / PULUMI_YAML).read_text()
    return {
        PULUMI_YAML: with_config_block(project_yaml, pulumi_config_block(keys)),
        CONFIG_KEYS_PAGE: config_keys_page(keys),
    }


def stale_files(root: pathlib.Path, keys: Sequence[ConfigKey]) -> list[pathlib.Path]:
    """The generated files whose text on disk differs from what the key table gives."""
    return [
        path
        for path, text in generated_files(root, keys).items()
        if not (root / path).is_file() or (root / path).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is stale")
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.root, CONFIG_KEYS)
        for path in stale:
            print(f"{path} is stale: run {COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated_files(args.root, CONFIG_KEYS).items():
        (args.root / path).parent.mkdir(parents=True, exist_ok=True)
        (args.root / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
