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

import posixpath
import time
from typing import Any

import pyarrow.fs as pafs

from ._backends.local import COMMIT_MARKER
from ._requests.files import (
    CLAIMED,
    RECEIPTS,
    REQUESTS,
    RUN_MARKER,
    bounded,
    new_id,
    read_json,
    read_json_large,
    resolve_run_dir,
    write_json,
)
from ._state import MANIFEST_FILE
from .errors import RunNotFoundError
from .vocab import Status

__all__ = ["RunNotFoundError", "list_checkpoints", "request_save", "run_status"]

# Ray Train's controller writes the checkpoints it registered here (Ray 2.5x-2.60).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def open_run(run: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve and check a run directory: it must exist and hold Ray's run marker. Every call on the
    filesystem gives up in bounded time: one given as an S3/GCS filesystem is rebuilt with bounded
    retries and timeouts (its own options kept)."""
    try:
        fs, path = resolve_run_dir(run, None if filesystem is None else bounded(filesystem))
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
        return {"id": rid, "status": Status.PENDING.value}
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
    """The run's checkpoint directories with their metadata, size and state, oldest step first.

    ``state`` is ``committed`` (Ray registered it, or :class:`~ray_dyncheck.LocalBackend` wrote its
    commit marker: a new run resumes from it), ``torn`` (files missing or truncated: a writer died),
    or ``uncommitted`` (complete files that nothing registered: never resumed from).
    """
    registered = _registered(fs, path)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        meta = read_json(fs, posixpath.join(info.path, ".metadata.json")) or {}
        files = {posixpath.relpath(f.path, info.path): f.size
                 for f in fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
                 if f.type == pafs.FileType.File}
        committed = info.base_name in registered or COMMIT_MARKER in files
        state = "torn" if _torn(fs, info.path, files) else "committed" if committed else "uncommitted"
        out.append({"dir": info.base_name, "kind": meta.get("kind"), "step": meta.get("step"),
                    "reason": meta.get("reason"), "time": meta.get("time"), "state": state,
                    "size": sum(size or 0 for size in files.values())})
    return sorted(out, key=lambda c: (c["step"] is None, c["step"] or 0, c["dir"]))


def _registered(fs: pafs.FileSystem, path: str) -> set[str]:
    """Checkpoint directory names Ray's controller registered (its snapshot in the run directory)."""
    snapshot = read_json_large(fs, posixpath.join(path, RAY_SNAPSHOT))
    results = snapshot.get("checkpoint_results", []) if snapshot else []
    return {r["checkpoint_dir_name"] for r in results if isinstance(r, dict) and "checkpoint_dir_name" in r}


def _torn(fs: pafs.FileSystem, path: str, files: dict[str, int | None]) -> bool:
    """Our manifest lists a file that is missing or of another size (a checkpoint without our
    manifest is judged by the commit marker or Ray's registry alone)."""
    manifest = read_json(fs, posixpath.join(path, MANIFEST_FILE))
    if manifest is None:
        return MANIFEST_FILE in files  # there, but unreadable
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return True
    return any(name not in files or (size is not None and files[name] != size) for name, size in listed.items())


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

