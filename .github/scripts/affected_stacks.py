"""The environment stacks a change affects, in apply order, as a JSON list for a job matrix.

    python3 .github/scripts/affected_stacks.py --base SHA     # a pull request: what SHA..HEAD changes
    python3 .github/scripts/affected_stacks.py --pushed SHA   # a push to main: what it changes since SHA
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
A push is compared with the commit main pointed to before it (`github.event.before`), by the same
rules as a pull request; where that commit is unknown (the first push, or one GitHub reports as all
zeros) or no longer in the history (a force push), every environment is applied.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
from collections.abc import Iterable

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENVIRONMENTS = ("platform", "dev", "prod")  # apply order: the serving stacks reference the platform
SHARED_PATHS = ("Pulumi.yaml", "__main__.py", "requirements.txt", "setup.sh",
                "components/", "serving/", "policy/", ".github/")


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
    diff = subprocess.run(["git", "diff", "--name-only", base, "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True)
    return diff.stdout.split()


NO_COMMIT = "0" * 40  # github.event.before of a push that created the branch


def known_commit(sha: str, root: pathlib.Path = ROOT) -> bool:
    if not sha or sha == NO_COMMIT:
        return False
    found = subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=root, capture_output=True, check=False)
    return found.returncode == 0


def pushed_stacks(before: str, present: list[str], root: pathlib.Path = ROOT) -> list[str]:
    """The environments a push to main affects: compared with `before`, or all where it is unknown."""
    return affected_stacks(changed_paths(before, root), present) if known_commit(before, root) else present


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="the commit the change is compared with (a pull request's base)")
    which.add_argument("--pushed", metavar="BEFORE", help="the commit main pointed to before the push")
    which.add_argument("--all", action="store_true", help="every environment whose stack file exists")
    args = parser.parse_args()
    present = present_environments()
    if args.all:
        stacks = present
    elif args.pushed is not None:
        stacks = pushed_stacks(args.pushed, present)
    else:
        stacks = affected_stacks(changed_paths(args.base), present)
    print(f"stacks={json.dumps(stacks)}")


if __name__ == "__main__":
    main()
