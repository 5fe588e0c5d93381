"""The documentation's links resolve: every relative link in README.md and docs/*.md names a file that
exists and, when it has a #fragment, a heading of that file; the README stays a short front door."""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link is a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: str) -> set[str]:
    """The fragments GitHub gives the file's headings: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"^```.*?^```", "", open(path, encoding="utf-8").read(), flags=re.M | re.S)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: str) -> list[str]:
    return [t for t in LINK.findall(_prose(open(path, encoding="utf-8").read()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in _links(page):
        file, _, fragment = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(dest):
            broken.append(f"{target} (no file {os.path.relpath(dest, ROOT)})")
        elif fragment and dest.endswith(".md") and fragment not in _anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {os.path.relpath(dest, ROOT)})")
    assert not broken, f"{os.path.relpath(page, ROOT)}: {broken}"


def test_the_readme_is_a_short_front_door_that_links_every_docs_page():
    assert os.path.getsize(PAGES[0]) < 16_000, "README.md: move detail into docs/ and link to it"
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in _links(PAGES[0])}
    assert set(PAGES[1:]) <= linked, f"not linked from the README: {sorted(set(PAGES[1:]) - linked)}"
