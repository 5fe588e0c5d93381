"""Ask a running job for a checkpoint from anywhere that reaches its storage, and see what it holds.

Runs in any process (a laptop, a notebook, the CLI): it only reads and writes files in the run
directory, through ``pyarrow.fs`` (local, NFS, ``s3://``, ``gs://``). No Ray needed.

Example:
    >>> import ray_dyncheck as rdc
    >>> receipt = rdc.request_save("s3://bucket/ray_results/run1", wait=True, timeout=600)  # doctest: +SKIP
    >>> receipt["checkpoint"]                                                               # doctest: +SKIP
    'bucket/ray_results/run1/checkpoint_00001200_full_3fa2c1'
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Any

import pyarrow.fs as pafs

from .requests import CLAIMED, RECEIPTS, REQUESTS, RUN_MARKER, new_id, resolve_run_dir, write_json

__all__ = ["RunNotFoundError", "list_checkpoints", "request_save", "run_status"]


class RunNotFoundError(ValueError):
    """RUN is not a reachable Ray Train run directory."""


def open_run(run: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve and check a run directory: it must exist and hold Ray's run marker."""
    try:
        fs, path = resolve_run_dir(run, filesystem)
        info = fs.get_file_info(path)
        marker = fs.get_file_info(posixpath.join(path, RUN_MARKER))
    except Exception as exc:  # unreachable bucket, bad URI, permissions
        raise RunNotFoundError(f"cannot reach {run}: {type(exc).__name__}: {exc}") from None
    if info.type != pafs.FileType.Directory:
        raise RunNotFoundError(f"no run directory at {run}: expected <storage_path>/<name>/ of a Ray Train run")
    if marker.type != pafs.FileType.File:
        raise RunNotFoundError(f"{run} is not a Ray Train run directory (no {RUN_MARKER}): "
                               "pass <storage_path>/<name>/ of the run")
    return fs, path


def request_save(run: str, *, kind: str = "full", stop: bool = False, wait: bool = False,
                 timeout: float | None = None, filesystem: pafs.FileSystem | None = None,
                 poll_s: float = 0.5) -> dict[str, Any]:
    """Write a request into ``run``'s request folder; with ``wait``, return its receipt.

    Args:
        run: The run directory, ``<storage_path>/<name>``, as a path or URI.
        kind: ``full`` (resumable) or ``weights`` (weights + small state).
        stop: Ask every rank to leave its loop after the save.
        wait: Block until the receipt appears (the checkpoint is stored, or the save failed).
        timeout: Seconds to wait; ``None`` waits forever.

    Returns:
        The receipt (``status``: ``ok`` with ``checkpoint`` and ``step``; ``error``; ``rejected``;
        ``discarded``), or ``{"id", "status": "pending"}`` without ``wait``.

    Raises:
        RunNotFoundError: ``run`` is not a reachable Ray run directory.
        TimeoutError: no receipt within ``timeout``.
    """
    if kind not in ("full", "weights"):
        raise ValueError(f"kind must be 'full' or 'weights', got {kind!r}")
    fs, path = open_run(run, filesystem)
    rid = new_id("req")
    write_json(fs, posixpath.join(path, REQUESTS, f"{rid}.json"), {"id": rid, "kind": kind, "stop": stop})
    if not wait:
        return {"id": rid, "status": "pending"}
    deadline = None if timeout is None else time.monotonic() + timeout
    receipt_path = posixpath.join(path, RECEIPTS, f"{rid}.json")
    while True:
        receipt = read_json(fs, receipt_path)
        if receipt is not None:
            return receipt
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(
                f"no receipt for request {rid} within {timeout:g} s. Is the job running with a "
                f"DynamicCheckpoint hook (enabled: true), and does rank 0 reach {run}? "
                f"The request stays in {posixpath.join(run, REQUESTS)}/ until a check picks it up")
        time.sleep(poll_s)


def list_checkpoints(fs: pafs.FileSystem, path: str) -> list[dict[str, Any]]:
    """The run's checkpoint directories with their metadata and size, oldest step first."""
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        meta = read_json(fs, posixpath.join(info.path, ".metadata.json")) or {}
        files = fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
        out.append({"dir": info.base_name, "kind": meta.get("kind"), "step": meta.get("step"),
                    "reason": meta.get("reason"), "time": meta.get("time"),
                    "size": sum(f.size or 0 for f in files if f.type == pafs.FileType.File)})
    return sorted(out, key=lambda c: (c["step"] is None, c["step"] or 0, c["dir"]))


def run_status(run: str, filesystem: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Checkpoints, pending requests (written or claimed, not yet saved) and receipts of a run."""
    fs, path = open_run(run, filesystem)
    pending = []
    for sub, state in ((REQUESTS, "waiting"), (CLAIMED, "claimed")):
        for info in fs.get_file_info(pafs.FileSelector(posixpath.join(path, sub), allow_not_found=True)):
            if info.type == pafs.FileType.File and not info.base_name.startswith("."):
                pending.append({"id": info.base_name.rsplit(".", 1)[0], "state": state})
    receipts = []
    for info in fs.get_file_info(pafs.FileSelector(posixpath.join(path, RECEIPTS), allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
            receipts.append(read_json(fs, info.path) or {"id": info.base_name[:-5], "status": "unreadable"})
    receipts.sort(key=lambda r: str(r.get("time", "")))
    return {"run": run, "checkpoints": list_checkpoints(fs, path), "pending": pending, "receipts": receipts}


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """A small JSON file's contents; ``None`` if it is missing, unreadable or not JSON."""
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
