"""Only the Ray backend needs Ray: with ``ray`` unimportable, the package, its worker core, request
channel, torch hook and local backend import (in a fresh interpreter: a module cache cannot be undone)."""

from __future__ import annotations

import subprocess
import sys

MODULES = ["ray_dyncheck", "ray_dyncheck._core", "ray_dyncheck._requests.poller", "ray_dyncheck.hook",
           "ray_dyncheck._backends.local", "ray_dyncheck.client", "ray_dyncheck._pipeline"]

SCRIPT = """
import importlib, sys
sys.modules["ray"] = None  # "import ray" raises ImportError
try:
    import ray  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("ray imported although blocked")
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted(n for n in sys.modules if n == "ray" or n.startswith("ray."))
print("ray modules:", loaded)
"""


def test_the_core_imports_with_ray_blocked():
    done = subprocess.run([sys.executable, "-c", SCRIPT, *MODULES], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray modules: ['ray']" in done.stdout, done.stdout


def test_the_ray_backend_needs_ray():
    """The check can fail: the Ray backend does not import with Ray blocked."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, "ray_dyncheck._backends.ray"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "ModuleNotFoundError: No module named 'ray.train'" in done.stderr, done.stderr
