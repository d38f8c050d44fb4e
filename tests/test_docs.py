"""The README stays one page, every docs page is reachable from it, and every relative link resolves.

Relative Markdown links in README.md and docs/*.md must point at an existing file or folder (relative to
the linking file); a ``#anchor`` into a Markdown file must match a heading there, slugged the way GitHub
does it.  External links (http, https, mailto, ...) are not fetched.  No network, no segtrain import.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); text may hold one level of brackets
INLINE_LINK = re.compile(
    r'!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^\s()<>]*(?:\([^\s()]*\)[^\s()<>]*)*)>?(?:\s+"[^"]*")?\s*\)'
)
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if m and m.group(1).startswith(fence):
                fence = None
            continue
        out.append(line)
    return out


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, without punctuation but '-' and '_',
    each space turned into '-'."""
    text = INLINE_LINK.sub(lambda m: m.group(1), heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()  # inline HTML
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the headings of ``path`` produce (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_anchor(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The link targets in ``path`` (inline and reference definitions), ignoring code."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = REFERENCE_DEF.match(line)
        if m:
            targets.append(m.group(1))
            continue
        line = INLINE_CODE.sub("", line)
        targets += [m.group(2) for m in INLINE_LINK.finditer(line)]
    return targets


def broken_links(path: Path) -> list[str]:
    """'target: why' for each relative link of ``path`` that does not resolve."""
    problems = []
    for target in links(path):
        if not target or EXTERNAL.match(target):
            continue  # external links are not fetched
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{target}: no heading in {dest.name} gives #{anchor}")
    return problems


def test_docs_pages_exist():
    assert DOCS, "docs/*.md holds no pages"


def test_readme_is_one_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; move detail to docs/ (max {MAX_README_LINES})"
    )


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert not broken_links(path), f"{path.relative_to(REPO)}: " + "; ".join(broken_links(path))


def test_every_docs_page_is_linked_from_readme():
    linked = set()
    for target in links(README):
        file_part = target.partition("#")[0]
        if file_part and not EXTERNAL.match(target):
            linked.add((README.parent / unquote(file_part)).resolve())
    missing = [p.relative_to(REPO).as_posix() for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {', '.join(missing)}"


def test_license_is_mit():
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("Quickstart", "quickstart"),
        ("Evaluating a checkpoint: `segtrain-eval`", "evaluating-a-checkpoint-segtrain-eval"),
        ("`keep_last`: the previous checkpoints", "keep_last-the-previous-checkpoints"),
        ("Multi-GPU: torchrun", "multi-gpu-torchrun"),
        ("Recipes and [published](x.md) numbers", "recipes-and-published-numbers"),
        ("Bad input: what you typed, what you get", "bad-input-what-you-typed-what-you-get"),
    ],
)
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_checker_catches_broken_links(tmp_path):
    """The checks above can fail: a missing file, a missing anchor; code and external links are skipped."""
    (tmp_path / "a.md").write_text("# Title\n\n## Some section\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md) [ok](a.md#some-section) [ok](#here) [web](https://example.invalid/x)\n"
        "# Here\n`[not a link](missing.md)`\n```\n[not a link](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](a.md#nope)\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert problems[0].startswith("missing.md:") and problems[1].startswith("a.md#nope:")
