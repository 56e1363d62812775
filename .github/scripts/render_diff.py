"""The pull request's rendered-manifest diff: every stack file rendered at the base and at the head.

    python .github/scripts/render_diff.py --base BASE_TREE --head HEAD_TREE --out DIR

Each tree renders its own stack files with its own code (`python -m components.render --stack S`
run inside the tree), so the diff is what merging changes in the Kubernetes objects the stacks apply.
Writes DIR/base/<stack>.yaml, DIR/head/<stack>.yaml, DIR/render.diff (unified) and DIR/summary.md (a
line per stack, then the diff, cut to fit a job summary). A render that fails is kept as its error
text, so the diff shows it too; the exit status is 1 when a stack file fails to render at the head.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import pathlib
import subprocess
import sys

# A job summary holds at most 1 MiB; the uploaded artifact keeps the whole diff.
SUMMARY_DIFF_LINES = 3000


@dataclasses.dataclass(frozen=True)
class Rendered:
    text: str
    ok: bool


def stacks_in(tree: pathlib.Path) -> set[str]:
    return {path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in tree.glob("Pulumi.*.yaml")}


def render(tree: pathlib.Path, stack: str) -> Rendered:
    result = subprocess.run(
        [sys.executable, "-m", "components.render", "--stack", stack],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        return Rendered(result.stdout, ok=True)
    error = "".join(f"# {line}" for line in result.stderr.splitlines(keepends=True))
    return Rendered(f"# render failed with exit status {result.returncode}:\n{error}", ok=False)


def change_of(before: Rendered | None, after: Rendered | None, diff: list[str]) -> str:
    if after is not None and not after.ok:
        return "**fails to render at the head**"
    if before is None:
        return "added"
    if after is None:
        return "removed"
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    return f"changed (+{added} -{removed})" if diff else "unchanged"


def compare(base: pathlib.Path, head: pathlib.Path, out: pathlib.Path) -> bool:
    """Writes the renders, the diff and the summary under `out`; True when every head render works."""
    base_stacks, head_stacks = stacks_in(base), stacks_in(head)
    rows, diff_lines, head_ok = [], [], True
    for stack in sorted(base_stacks | head_stacks):
        before = render(base, stack) if stack in base_stacks else None
        after = render(head, stack) if stack in head_stacks else None
        for side, rendered in (("base", before), ("head", after)):
            if rendered is not None:
                (out / side).mkdir(parents=True, exist_ok=True)
                (out / side / f"{stack}.yaml").write_text(rendered.text)
        diff = list(
            difflib.unified_diff(
                before.text.splitlines(keepends=True) if before else [],
                after.text.splitlines(keepends=True) if after else [],
                fromfile=f"base/{stack}.yaml",
                tofile=f"head/{stack}.yaml",
            )
        )
        rows.append(f"| `{stack}` | {change_of(before, after, diff)} |")
        diff_lines += diff
        head_ok = head_ok and (after is None or after.ok)
    (out / "render.diff").write_text("".join(diff_lines))
    shown = diff_lines[:SUMMARY_DIFF_LINES]
    cut = (
        f"\n... {len(diff_lines) - len(shown)} more lines in the `rendered-manifests` artifact\n"
        if len(shown) < len(diff_lines)
        else ""
    )
    summary = ["## Rendered manifests, base -> head", "", "| stack | change |", "|---|---|", *rows, ""]
    if diff_lines:
        summary += ["```diff", "".join(shown).rstrip("\n"), "```", cut]
    (out / "summary.md").write_text("\n".join(summary))
    return head_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=pathlib.Path, required=True, help="the base branch's tree")
    parser.add_argument("--head", type=pathlib.Path, required=True, help="the pull request's tree")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="where the renders and the diff go")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.exit(0 if compare(args.base.resolve(), args.head.resolve(), args.out) else 1)


if __name__ == "__main__":
    main()
