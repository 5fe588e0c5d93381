"""The benchmark suite cannot rot: ``python -m benchmarks.run --smoke`` runs every section for real
(tiny sizes, a round or two) and its JSON has the documented shape. The numbers are not checked here:
performance claims come from a full run, never from timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import checks  # noqa: E402
from benchmarks.run import SECTIONS, check_shape  # noqa: E402


def test_smoke_run_writes_every_section_with_its_shape(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert check_shape(results) == []
    assert set(results["sections"]) == set(SECTIONS)
    assert results["machine"]["torch"] and results["machine"]["cpus"]
    [p1] = results["sections"]["checks"]["result"]["runs"]
    assert set(p1["rows"]) == set(checks.VARIANTS)
    for name, row in p1["rows"].items():
        assert 0 <= row["in_call"] < 1, (name, row)
        assert row["step_ms"] > 0
    assert p1["rows"]["auto"]["interval"] >= 1
    # Every section printed a table.
    for name, section in results["sections"].items():
        assert section["table"], name
    assert proc.stdout.count("## ") == len(SECTIONS)
