"""No test, harness module or benchmark reaches into the private state of the objects ray_dyncheck hands
out: an attribute ``._name`` read or set on a hook, its core, poller or pipeline, or a callback. They use
the public read-outs instead (``dc.check_interval``, ``dc.reads_requests``, ``dc.pending_requests``,
``dc.in_flight``, ``dc.last_blocked_s``, ``dc.wait_stored()``, setting ``dc.global_step``) and find our
threads by name (``dyncheck-...``). A module's own objects (``self._x``) and other libraries' objects are
not ours to judge here."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The names these objects go by in our sources.
OURS = {"dc", "hook", "hooks", "core", "_core", "poller", "pipeline", "_pipeline", "callback", "cb"}
# Where no public way exists yet (file, expression): each with what it would need.
ALLOWED = {
    # use_pipeline gives the hook a pipeline with an injected write and keep-everything host buffers: it
    # would need the hook to take a ``write`` and a ``keep`` for its pipeline.
    ("tests/harness/pipeline_workers.py", "dc._pipeline"),
    ("tests/harness/pipeline_workers.py", "dc._core"),
    # The "auto, no floor" variant turns auto's floor off (no config key sets it without also polling
    # faster), and each segment restarts the hook's step timer (no public call does).
    ("benchmarks/checks.py", "hooks[v]._core"),
}


def _owner(node: ast.expr) -> str | None:
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def private_uses(source: str) -> list[tuple[int, str]]:
    """``(line, expression)`` of every ``._name`` attribute on one of our objects in ``source``."""
    return [(node.lineno, ast.unparse(node)) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and _owner(node.value) in OURS]


def test_the_scan_finds_private_state_and_leaves_public_and_own_state_alone():
    found = private_uses("dc._core.poller._pending\nhooks[v]._core.interval = 1\nx = self._lock\n"
                         "dc.pending_requests\nother._x\n")
    assert sorted(found) == [(1, "dc._core"), (1, "dc._core.poller._pending"), (2, "hooks[v]._core")]


def test_no_test_or_benchmark_reaches_into_private_state():
    found = []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        found += [f"{rel}:{line}: {expr}" for line, expr in private_uses(path.read_text(encoding="utf-8"))
                  if (rel, expr) not in ALLOWED]
    assert not found, "private state of ray_dyncheck's objects (use a public read-out):\n" + "\n".join(found)
