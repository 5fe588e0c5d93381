"""A real ``pyarrow.fs`` filesystem that fails on purpose: a ``PyFileSystem`` handler wrapping the
local one, raising or hanging on a chosen operation and path, on a chosen rank.

The plan is a JSON file (so a test can change it while ranks and Ray workers run):
``[{"op": "move", "path": ".dyncheck/claimed", "action": "raise", "rank": 0, "times": 1}, ...]``

- ``op``: a handler method (``get_file_info``, ``get_file_info_selector``, ``create_dir``,
  ``delete_file``, ``move``, ``copy_file``, ``open_input_stream``, ``open_input_file``,
  ``open_output_stream``, ...) or ``*``;
- ``path``: a substring every path argument is matched against (``""`` matches all);
- ``action``: ``raise`` (an ``OSError``) or ``hang`` (sleep ``seconds``, then go on);
- ``rank``: only in the process whose ``torch.distributed`` rank is this (``"driver"``: only where no
  process group exists); absent: everywhere;
- ``pid``: only in this process (a restarted worker is a new process: the fault is gone there);
- ``times``: how many matching calls, per process, it affects (absent: all).

It is not the local filesystem as far as ray_dyncheck can tell (``type_name`` is ``py::faultfs``), so
the code paths for object stores run: no renames, commit markers, downloads.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pyarrow.fs as pafs


def _rank() -> int | str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    return "driver"


class FaultHandler(pafs.FileSystemHandler):
    def __init__(self, plan_path: str) -> None:
        self.plan_path = plan_path
        self._fs = pafs.LocalFileSystem()
        self._used: dict[int, int] = {}
        self._cache: tuple[float, list[dict[str, Any]]] = (-1.0, [])

    def __reduce__(self):
        return FaultHandler, (self.plan_path,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FaultHandler) and other.plan_path == self.plan_path

    def __ne__(self, other: object) -> bool:
        return not self == other

    def _plan(self) -> list[dict[str, Any]]:
        try:
            mtime = os.stat(self.plan_path).st_mtime_ns
        except FileNotFoundError:
            return []
        if mtime != self._cache[0]:
            try:
                with open(self.plan_path) as f:
                    plan = json.load(f)
            except ValueError:  # being rewritten: keep the last one
                return self._cache[1]
            self._cache = (mtime, plan)
            self._used = {}
        return self._cache[1]

    def _maybe_fail(self, op: str, *paths: str) -> None:
        for i, rule in enumerate(self._plan()):
            if rule.get("op", "*") not in ("*", op):
                continue
            if not any(rule.get("path", "") in p for p in paths):
                continue
            if "rank" in rule and rule["rank"] != _rank():
                continue
            if "pid" in rule and rule["pid"] != os.getpid():  # this process only, not its restart
                continue
            if "times" in rule and self._used.get(i, 0) >= rule["times"]:
                continue
            self._used[i] = self._used.get(i, 0) + 1
            with open(f"{self.plan_path}.hits", "a") as f:  # the test checks the fault was hit
                f.write(json.dumps({"rule": i, "op": op, "path": paths[0], "rank": _rank()}) + "\n")
            if rule.get("action", "raise") == "hang":
                time.sleep(float(rule.get("seconds", 3600)))
                return
            raise OSError(f"injected fault: {op} {paths[0]}")

    # -- FileSystemHandler ----------------------------------------------------------------------

    def get_type_name(self) -> str:
        return "faultfs"

    def normalize_path(self, path: str) -> str:
        return self._fs.normalize_path(path)

    def get_file_info(self, paths):
        for p in paths:
            self._maybe_fail("get_file_info", p)
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self._maybe_fail("get_file_info_selector", selector.base_dir)
        return self._fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._maybe_fail("create_dir", path)
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._maybe_fail("delete_dir", path)
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._maybe_fail("delete_dir_contents", path)
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the root directory")

    def delete_file(self, path):
        self._maybe_fail("delete_file", path)
        self._fs.delete_file(path)

    def move(self, src, dest):
        self._maybe_fail("move", src, dest)
        self._fs.move(src, dest)

    def copy_file(self, src, dest):
        self._maybe_fail("copy_file", src, dest)
        self._fs.copy_file(src, dest)

    def open_input_stream(self, path):
        self._maybe_fail("open_input_stream", path)
        return self._fs.open_input_stream(path)

    def open_input_file(self, path):
        self._maybe_fail("open_input_file", path)
        return self._fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self._maybe_fail("open_output_stream", path)
        return self._fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        self._maybe_fail("open_append_stream", path)
        return self._fs.open_append_stream(path, metadata=metadata)


def fault_fs(plan_path: str | os.PathLike[str]) -> pafs.PyFileSystem:
    """The filesystem; write the plan with :func:`set_plan` (an empty plan: no faults)."""
    return pafs.PyFileSystem(FaultHandler(os.fspath(plan_path)))


def hits(plan_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every fault injected so far (all processes)."""
    try:
        with open(f"{os.fspath(plan_path)}.hits") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def set_plan(plan_path: str | os.PathLike[str], rules: list[dict[str, Any]]) -> None:
    """Replace the plan atomically (ranks reading it never see half a file)."""
    tmp = f"{os.fspath(plan_path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(rules, f)
    os.replace(tmp, plan_path)
    # Same-second rewrites must still look new to readers that cache by mtime.
    now = time.time_ns()
    os.utime(plan_path, ns=(now, now))
