"""Files in a run directory: its layout, small JSON files (one size cap for everything we read back
from storage), request bodies (data only), and the one guard that turns a storage error into a
rate-limited log line.

Layout of a run directory ``RUN = <storage_path>/<name>/`` (any ``pyarrow.fs`` filesystem)::

    RUN/dyncheck.save                   the trigger: any file there asks for one full checkpoint
    RUN/.dyncheck/requests/<id>.json    {"id", "kind": "full"|"weights"|"none", "stop": bool}
    RUN/.dyncheck/claimed/<id>.*        claimed, not yet answered (survive a worker restart);
                                        <id>.attempt<N> marks the N-th save started for it
    RUN/.dyncheck/receipts/<id>.json    what became of each request (one final receipt)

Nothing here imports Ray.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

CHANNEL_DIR = ".dyncheck"
REQUESTS = f"{CHANNEL_DIR}/requests"
CLAIMED = f"{CHANNEL_DIR}/claimed"
RECEIPTS = f"{CHANNEL_DIR}/receipts"
# Written by Ray Train when a run's storage is set up, i.e. once per `fit()` (not on a worker
# restart inside one fit): requests older than it were written before this run started.
RUN_MARKER = ".validate_storage_marker"
# Everything read back from storage (request bodies, receipts, manifests, metadata) is small data.
MAX_JSON_BYTES = 64 * 1024

T = TypeVar("T")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


# Every filesystem we make for remote storage gives up in bounded time: Arrow's own defaults retry a
# connection error for many seconds (``from_uri``'s connect-retry strategy) and wait out a frozen
# server per attempt. A timeout does not cancel a request already sent (a timed-out DELETE can still
# land), so correctness never rests on these numbers: we never delete what we did not claim.
RETRY_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 5.0
"""Per request: an S3 request stalled this long fails (and is retried, ``RETRY_ATTEMPTS`` in all)."""


def bounded(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs`` with a bounded retry strategy and connect/request timeouts: an S3 filesystem is rebuilt
    from its own options (credentials, endpoint, region kept; timeouts the user set kept), a GCS one
    gets a retry time limit; any other filesystem is returned as it is."""
    if isinstance(fs, pafs.S3FileSystem):
        _, (options,) = fs.__reduce__()
        options = dict(options)
        if not options.get("connect_timeout") or options["connect_timeout"] <= 0:
            options["connect_timeout"] = CONNECT_TIMEOUT_S
        if not options.get("request_timeout") or options["request_timeout"] <= 0:
            options["request_timeout"] = REQUEST_TIMEOUT_S
        # Delayed open: a small file is one PUT, not a multipart upload of three requests.
        options["allow_delayed_open"] = True
        return pafs.S3FileSystem(**options,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS))
    if isinstance(fs, pafs.GcsFileSystem):
        _, (options,) = fs.__reduce__()
        options = dict(options)
        limit = options.get("retry_time_limit")
        if limit is None or limit.total_seconds() > RETRY_ATTEMPTS * REQUEST_TIMEOUT_S:
            options["retry_time_limit"] = timedelta(seconds=RETRY_ATTEMPTS * REQUEST_TIMEOUT_S)
        return pafs.GcsFileSystem(**options)
    return fs


def filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``pafs.FileSystem.from_uri`` with :func:`bounded` retries. It may do network I/O (an S3 URI
    without ``region`` looks the bucket's region up): never call it on the training thread."""
    fs, path = pafs.FileSystem.from_uri(uri)
    return bounded(fs), path


def resolve_run_dir(run: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a run directory given as a local path or a URI (bounded retries)."""
    if filesystem is not None:
        return filesystem, run
    if "://" in run:
        fs, path = filesystem_from_uri(run)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), posixpath.normpath(run)


def read_capped(fs: pafs.FileSystem, path: str, cap: int = MAX_JSON_BYTES, what: str | None = None) -> bytes:
    """A small file's bytes. Raises ``ValueError`` (naming ``what``, default the file name) when it is
    larger than ``cap``; storage errors (``OSError``, ``FileNotFoundError``) propagate."""
    with fs.open_input_stream(path) as f:
        raw = f.read(cap + 1)
    if len(raw) > cap:
        size = fs.get_file_info(path).size
        raise ValueError(f"{what or posixpath.basename(path)} is {size if size is not None else len(raw)} bytes; "
                         f"the limit is {cap}")
    return raw


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """A small JSON object's contents; ``None`` if it is missing, unreadable, too big or not an object."""
    try:
        data = json.loads(read_capped(fs, path).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_json_strict(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """Like :func:`read_json`, but a storage error raises: for records whose "cannot read now" must
    not be taken for "not there" (the caller retries)."""
    try:
        data = json.loads(read_capped(fs, path).decode("utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:  # too big, or not JSON
        return None
    return data if isinstance(data, dict) else None


def read_json_large(fs: pafs.FileSystem, path: str, cap: int = 64 * 1024 * 1024) -> dict[str, Any] | None:
    """Like :func:`read_json` for a file another program writes that grows with the run (Ray's
    checkpoint registry): capped at 64 MiB."""
    try:
        data = json.loads(read_capped(fs, path, cap).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(fs: pafs.FileSystem, path: str, data: dict[str, Any]) -> None:
    """Write JSON so readers never see half a file: temp + rename locally, one PUT elsewhere."""
    blob = json.dumps(data, indent=1, sort_keys=True).encode("utf-8")
    ensure_dir(fs, posixpath.dirname(path))
    if fs.type_name == "local":
        tmp = f"{posixpath.dirname(path)}/.tmp-{secrets.token_hex(4)}-{posixpath.basename(path)}"
        with fs.open_output_stream(tmp) as f:
            f.write(blob)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(blob)


def ensure_dir(fs: pafs.FileSystem, path: str) -> None:
    """Make a folder where folders exist; S3 has none (a marker object per level would cost one
    request each, at every claim)."""
    if fs.type_name != "s3":
        fs.create_dir(path, recursive=True)


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file; a missing one is fine, any other error is logged (never raised)."""
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.error("dyncheck: cannot delete %s: %s", path, exc)


class ErrorLog:
    """Logs each distinct storage error at most once a minute: a hung NFS or an S3 outage must not
    flood the logs, and training goes on. A repeat says how often it happened since it was last
    logged, so "failing once a minute" and "failing at every poll" read differently."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, every_s: float = 60.0) -> None:
        self._clock, self._every_s = clock, every_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}
        # Used from the poller thread and, for a failed upload, from the upload thread.
        self._lock = threading.Lock()

    def log(self, what: str, where: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        now = self._clock()
        with self._lock:
            self._count[msg] = self._count.get(msg, 0) + 1
            last = self._last.get(msg)
            if last is not None and now - last < self._every_s:
                return
            self._last[msg] = now
            count, self._count[msg] = self._count[msg], 0
        if last is None:
            logger.error("dyncheck: cannot %s in %s: %s (retrying; training goes on)", what, where, msg)
        else:
            logger.error("dyncheck: cannot %s in %s: %s (still failing: %d times in the last %s; retrying; "
                         "training goes on)", what, where, msg, count, _span(now - last))


def _span(seconds: float) -> str:
    return "minute" if round(seconds) <= 60 else f"{seconds:.0f} s"


def guard(errors: ErrorLog, what: str, where: str, fn: Callable[..., T], *args: Any) -> tuple[T | None, bool]:
    """``(fn(*args), True)``, or ``(None, False)`` after logging the error (rate-limited).

    The one place a storage error is turned into "nothing this time": it must never reach the
    training loop or make rank 0 skip a collective.
    """
    try:
        return fn(*args), True
    except Exception as exc:  # storage errors of every kind: logged, retried by the caller
        errors.log(what, where, exc)
        return None, False


NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse.",
              "9p", "virtiofs", "wekafs", "panfs")


def on_network_filesystem(path: str, mounts: str = "/proc/mounts") -> bool:
    """Whether ``path`` lies on a network (shared) filesystem, from the mount that holds it; ``True``
    when that cannot be told (no warning without cause)."""
    try:
        with open(mounts, encoding="utf-8") as f:
            table = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return True
    real = os.path.abspath(path)  # no I/O: a hung mount must not hang the check
    best, fstype = "", ""
    for point, kind in table:
        point = point.replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, kind
    return any(fstype == t or (t.endswith(".") and fstype.startswith(t)) for t in NETWORK_FS)
