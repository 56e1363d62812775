"""The pull-request comment of one stack's `pulumi preview`, whatever its outcome.

    python3 .github/scripts/preview_comment.py --stack ORG/PROJECT/STACK --exit-code N --output FILE

Prints Markdown: the stack, whether the preview passed, failed on a policy violation or failed
otherwise, then the preview's own output (the diff, the policy pack's report, or the error), cut
from the top to fit a GitHub comment. The workflow posts it before it fails the job, so the comment
on a pull request always describes its latest push.
"""

from __future__ import annotations

import argparse
import pathlib

COMMENT_LIMIT = 65536  # characters GitHub accepts in one comment body
POLICY_VIOLATION_MARKERS = ("Policy Violations:", "mandatory]")  # how the CLI reports the pack's findings
FENCE = "````"  # longer than any fence the output itself could contain


def outcome(exit_code: int, output: str) -> str:
    if exit_code == 0:
        return "passed"
    if any(marker in output for marker in POLICY_VIOLATION_MARKERS):
        return f"failed: policy violations (exit code {exit_code})"
    return f"failed (exit code {exit_code})"


def comment(stack: str, exit_code: int, output: str, limit: int = COMMENT_LIMIT) -> str:
    """The comment body, at most `limit` characters; a long output keeps its end (the summary and the errors)."""
    header = f"### `pulumi preview` of `{stack}`: {outcome(exit_code, output)}\n\n"
    cut_note = "(output cut: the beginning is in the job log)\n"
    frame = len(header) + len(cut_note) + 2 * len(FENCE) + len("text\n\n\n")
    body = output if len(output) + frame <= limit else cut_note + output[len(output) - (limit - frame) :]
    return f"{header}{FENCE}text\n{body.rstrip()}\n{FENCE}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--exit-code", type=int, required=True)
    parser.add_argument("--output", type=pathlib.Path, required=True, help="the preview's stdout and stderr")
    args = parser.parse_args()
    output = args.output.read_text(errors="replace") if args.output.is_file() else "(the preview wrote no output)"
    print(comment(args.stack, args.exit_code, output), end="")


if __name__ == "__main__":
    main()
