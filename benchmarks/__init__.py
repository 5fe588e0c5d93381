"""The benchmarks: ``python -m benchmarks.run`` from the repository root (see ``benchmarks/run.py``).

The S3 server on loopback and the interrupt driver are the tests' own (``tests/harness``): that folder
goes on ``sys.path`` here, as the tests' ``conftest.py`` does, so its modules import by their names.
"""

from __future__ import annotations

import os
import sys

HARNESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "harness")
if HARNESS not in sys.path:
    sys.path.insert(0, HARNESS)
