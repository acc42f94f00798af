"""The user's pages hold together: code fences close, the Python examples parse, and every
relative link (and its #anchor) points at something that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block; a fence left open fails the test."""
    blocks: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang = line[3:].strip()
                assert lang, f"line {number}: an opening fence without a language"
                body = []
            else:
                assert line.strip() == "```", f"line {number}: a fence opened inside a block"
                blocks.append((lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, "a code fence is never closed"
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", outside, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_fences_close_and_python_parses(page: Path) -> None:
    blocks = fenced_blocks(page.read_text())
    if page.name == "README.md":
        assert [lang for lang, _ in blocks].count("python") >= 4
    for lang, body in blocks:
        if lang == "python":
            ast.parse(body)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to missing {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: no heading for #{anchor} in {file.name}"


def test_slug_matches_github() -> None:
    assert slug("Coverage (`bench/bench_coverage.py`)") == "coverage-benchbench_coveragepy"
    assert slug("Transformers (issue 31)") == "transformers-issue-31"
