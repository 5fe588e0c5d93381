"""The benchmark suite's own checks: the JSON shape check and the paired ratio."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks._common import paired_ratio  # noqa: E402
from benchmarks.run import check_shape  # noqa: E402


def test_shape_check_names_what_is_missing():
    good = {"machine": {}, "mode": "smoke", "sections": {"save": {"mode": "smoke", "seconds": 1.0, "result": {}}}}
    assert check_shape(good) == []
    bad = {"mode": "smoke", "sections": {"save": {"mode": "smoke", "seconds": "1", "result": {}}}}
    assert check_shape(bad) == ["missing 'machine'", "sections.save.seconds: expected float, got '1'"]


def test_paired_ratio_is_the_median_per_round_difference():
    r = paired_ratio([1.1, 1.2, 1.0, 1.1], [1.0, 1.0, 1.0, 1.0])
    assert abs(r["median"] - 0.1) < 1e-9 and r["n"] == 4
    assert r["lo"] <= r["median"] <= r["hi"]

