"""The documentation site builds without a warning, and the README's links land on files that exist."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
README_MAX_LINES = 250  # the front page: what this is, the first commands, where to read on


def test_mkdocs_build_strict_passes(tmp_path):
    """Strict mode fails on any warning: a broken link or anchor, a page missing from the nav, a nav
    entry without a page (mkdocs.yml's `validation` turns each of these into a warning)."""
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)]
    built = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    )
    assert built.returncode == 0, built.stderr + built.stdout
    assert (tmp_path / "stack" / "config-keys" / "index.html").is_file()


def test_readme_links_point_at_files_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    targets = [target for target in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in target]
    assert targets, "the README links to no page"
    missing = [target for target in targets if not (ROOT / target.split("#")[0]).exists()]
    assert missing == []


def test_readme_stays_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES


def heading_levels(markdown: str) -> list[int]:
    """The `#` count of every heading outside fenced code blocks."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return [len(marks) for marks in re.findall(r"^(#+) ", prose, flags=re.M)]


def test_every_page_has_one_title_and_no_heading_skips_a_level():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    skipping = {
        str(page.relative_to(ROOT)): levels
        for page in pages
        if (levels := heading_levels(page.read_text()))[:1] != [1]
        or levels.count(1) != 1
        or any(later - earlier > 1 for earlier, later in zip(levels, levels[1:], strict=False))
    }
    assert skipping == {}


def test_heading_levels_skip_code_blocks():
    assert heading_levels("# Title\n```bash\n# a comment\n```\n## Section\n") == [1, 2]
