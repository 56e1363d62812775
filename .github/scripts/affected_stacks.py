"""The environment stacks a change affects, in apply order, as a JSON list for a job matrix.

    python3 .github/scripts/affected_stacks.py --base SHA     # a pull request: what SHA..HEAD changes
    python3 .github/scripts/affected_stacks.py --since SHA    # main: what changed since its last deploy at SHA
    python3 .github/scripts/affected_stacks.py --all          # every environment

Prints `stacks=<JSON list>`, a line for $GITHUB_OUTPUT. What a change affects:
- a stack file, Pulumi.<stack>.yaml, affects its stack. The serving stacks read the platform stack's
  outputs as deployed, so a platform change reaches their preview only once it is applied;
- what every stack runs affects all: the program (Pulumi.yaml, __main__.py, components/), the server
  it imports and builds into its image (serving/), the dependencies (requirements.txt, setup.sh), the
  policy pack (policy/) and the workflows with their scripts (.github/);
- anything else (README.md, tests/, benchmarks/) affects none.
Only environments whose stack file exists are listed. The example stacks are not environments: the
pull-request workflow renders them offline and never previews them against the cloud.
On main, HEAD is compared with the commit of the last successful deploy, by the same rules as a
pull request; where there is none (the first deploy), or it is no longer in the history (a force
push), every environment is applied.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
from collections.abc import Iterable

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENVIRONMENTS = ("platform", "dev", "prod")  # apply order: the serving stacks reference the platform
SHARED_PATHS = (
    "Pulumi.yaml",
    "__main__.py",
    "requirements.txt",
    "setup.sh",
    "components/",
    "serving/",
    "policy/",
    ".github/",
)


def stack_file(stack: str) -> str:
    return f"Pulumi.{stack}.yaml"


def affects_every_stack(path: str) -> bool:
    return any(path == shared or (shared.endswith("/") and path.startswith(shared)) for shared in SHARED_PATHS)


def affected_stacks(changed: Iterable[str], present: Iterable[str]) -> list[str]:
    """The present environments, in apply order, that the changed paths affect."""
    changed = set(changed)
    every = any(affects_every_stack(path) for path in changed)
    return [stack for stack in ENVIRONMENTS if stack in set(present) and (every or stack_file(stack) in changed)]


def present_environments(root: pathlib.Path = ROOT) -> list[str]:
    return [stack for stack in ENVIRONMENTS if (root / stack_file(stack)).is_file()]


def changed_paths(base: str, root: pathlib.Path = ROOT) -> list[str]:
    diff = subprocess.run(
        ["git", "diff", "--name-only", base, "HEAD"], cwd=root, capture_output=True, text=True, check=True
    )
    return diff.stdout.split()


def known_commit(sha: str, root: pathlib.Path = ROOT) -> bool:
    if not sha:
        return False
    found = subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=root, capture_output=True, check=False)
    return found.returncode == 0


def stacks_since(deployed: str, present: list[str], root: pathlib.Path = ROOT) -> list[str]:
    """The environments main's changes since the `deployed` commit affect; all where it is unknown."""
    return affected_stacks(changed_paths(deployed, root), present) if known_commit(deployed, root) else present


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="the commit the change is compared with (a pull request's base)")
    which.add_argument("--since", metavar="DEPLOYED", help="the commit of main's last successful deploy (empty: none)")
    which.add_argument("--all", action="store_true", help="every environment whose stack file exists")
    args = parser.parse_args()
    present = present_environments()
    if args.all:
        stacks = present
    elif args.since is not None:
        stacks = stacks_since(args.since, present)
    else:
        stacks = affected_stacks(changed_paths(args.base), present)
    print(f"stacks={json.dumps(stacks)}")


if __name__ == "__main__":
    main()
