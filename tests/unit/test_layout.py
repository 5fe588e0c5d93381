"""The test tree's layout. Every test file lives in a tier folder (``conftest.py`` marks its tests by
that folder, so ``pytest tests/unit`` and ``-m "not ray and not gloo"`` select the same tests), and its
name is unique across the folders: they are not packages, so pytest imports each test file by its
name alone and cannot collect a second file of the same name."""

from __future__ import annotations

import collections
import pathlib

TESTS = pathlib.Path(__file__).resolve().parents[1]
TIERS = {"unit", "gloo", "ray", "cluster"}  # the folders conftest.py knows


def _test_files() -> list[pathlib.Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)


def test_every_test_file_is_in_a_tier_folder():
    misplaced = [str(p.relative_to(TESTS)) for p in _test_files()
                 if p.parent.parent != TESTS or p.parent.name not in TIERS]
    assert not misplaced, f"test files outside tests/{{{','.join(sorted(TIERS))}}}/: {misplaced}"


def test_no_two_test_files_share_a_name():
    by_name = collections.defaultdict(list)
    for p in _test_files():
        by_name[p.name].append(str(p.relative_to(TESTS)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not shared, f"rename one of each (pytest imports test files by name): {shared}"
