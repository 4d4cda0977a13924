"""The documentation keeps up with the code: every public name is in docs/design.md §4, the README
stays a front door (short, with its usage example near the top, and the example runs), and every
relative link in README.md and docs/*.md points to an existing file and heading."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

import dropreg_ext as dr

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

README_MAX_LINES = 130
EXAMPLE_WITHIN_LINES = 40

PUBLIC_MODULES = {"dropreg_ext": dr, "dropreg_ext.nn": dr.nn, "dropreg_ext.functional": dr.functional,
                  "dropreg_ext.ops": dr.ops}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# [text](target) and ![alt](target); a target has no spaces (markdown titles are not used here).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _section(text: str, number: int) -> str:
    """The body of the level-2 heading '## <number>. ...' up to the next level-2 heading."""
    match = re.search(rf"^## {number}\. .*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/design.md has no section '## {number}.'"
    return match.group(1)


def _code_identifiers(markdown: str) -> set:
    """Identifiers inside fenced code blocks and `inline code` of a markdown text."""
    code = FENCE.findall(markdown)
    code += re.findall(r"`([^`\n]+)`", FENCE.sub("", markdown))
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", "\n".join(code)))


def _public_names() -> list:
    return sorted({(module, name) for module, mod in PUBLIC_MODULES.items() for name in mod.__all__})


@pytest.mark.parametrize("module, name", _public_names(), ids=lambda v: v)
def test_public_name_is_in_design_api_section(module, name):
    """Every name of the public modules' __all__ appears in the code of docs/design.md §4."""
    assert name in _code_identifiers(_section(DESIGN.read_text(), 4)), (
        f"{module}.{name} is public (in {module}.__all__) but docs/design.md §4 does not list it"
    )


def test_readme_is_short_with_an_example_near_the_top():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    starts = [i + 1 for i, line in enumerate(lines) if line.strip() == "```python"]
    assert starts, "README.md has no ```python example"
    assert starts[0] <= EXAMPLE_WITHIN_LINES, (
        f"README.md's first python example starts at line {starts[0]} (at most {EXAMPLE_WITHIN_LINES})"
    )


def test_readme_example_runs(tmp_path):
    """The README's first python example, as a script in a fresh interpreter."""
    block = re.search(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M).group(1)
    script = tmp_path / "readme_example.py"
    script.write_text(block)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"README.md's example failed:\n{run.stderr[-3000:]}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set:
    text = FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _links(page: pathlib.Path) -> list:
    return LINK.findall(FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    """Each relative link's file exists (inside the repository) and its #anchor is a heading there."""
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if ROOT not in file.parents and file != ROOT:
            broken.append(f"{target} (outside the repository)")
        elif not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + ", ".join(broken)


def test_link_checker_sees_links():
    """The link pattern finds the README's links to the docs pages (a checker that finds nothing
    would pass on any tree)."""
    targets = _links(README)
    assert "docs/design.md" in targets and "docs/numerics.md" in targets
    assert _slug("## 4. Public API (names the outside world relies on)".lstrip("# ")) == (
        "4-public-api-names-the-outside-world-relies-on"
    )
