"""The request channel: a trigger file and a request folder in the run directory, read by rank 0.

Layout of a run directory ``RUN = <storage_path>/<name>/`` (any ``pyarrow.fs`` filesystem)::

    RUN/dyncheck.save                   the trigger: any file there asks for one full checkpoint
    RUN/.dyncheck/requests/<id>.json    {"id", "kind": "full"|"weights", "stop": bool}
    RUN/.dyncheck/claimed/<id>.*        claimed, not yet saved (survive a worker restart)
    RUN/.dyncheck/receipts/<id>.json    what became of each request

A request is claimed (moved into ``claimed/``) before it is acted on, so a new ``touch`` during a save
is a new request; it is retired (deleted, receipt written) only once its checkpoint is stored. A
request older than the run's start marker is stale: discarded with a warning. Nothing here imports
Ray; the poller runs on rank 0 only, in a daemon thread.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

__all__ = ["Request", "RequestChannel", "RequestPoller", "resolve_run_dir"]

logger = logging.getLogger(__name__)

CHANNEL_DIR = ".dyncheck"
REQUESTS = f"{CHANNEL_DIR}/requests"
CLAIMED = f"{CHANNEL_DIR}/claimed"
RECEIPTS = f"{CHANNEL_DIR}/receipts"
# Written by Ray Train when a run's storage is set up, i.e. once per `fit()` (not on a worker
# restart inside one fit): requests older than it were written before this run started.
RUN_MARKER = ".validate_storage_marker"
MAX_BODY_BYTES = 64 * 1024
KINDS = ("full", "weights", "none")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Request:
    """One claimed request: what was asked for and where its claimed file now sits."""

    id: str
    kind: str = "full"
    stop: bool = False
    source: str = "request"
    """``trigger`` (the trigger file) or ``request`` (the request folder)."""
    path: str | None = None
    """The claimed file to delete on retirement; ``None`` when it could not be moved."""
    identity: tuple[Any, ...] = field(default=(), compare=False)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def resolve_run_dir(run: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a run directory given as a local path or a URI."""
    if filesystem is not None:
        return filesystem, run
    if "://" in run:
        fs, path = pafs.FileSystem.from_uri(run)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), posixpath.normpath(run)


def parse_body(raw: bytes, stem: str) -> Request:
    """Parse a request file's bytes (data only, size-capped). Raises ``ValueError`` saying why."""
    if len(raw) > MAX_BODY_BYTES:
        raise ValueError(f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    body: Any = {}
    if raw.strip():
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"id", "kind", "stop", "time", "source"})
    if unknown:
        raise ValueError(f"unknown request field(s): {', '.join(unknown)}")
    rid = body.get("id", stem)
    if not isinstance(rid, str) or rid != stem:
        raise ValueError(f"request id {rid!r} does not match its file name {stem!r}.json")
    kind = body.get("kind", "full")
    if kind not in KINDS:
        raise ValueError(f"request kind must be 'full', 'weights' or 'none', got {kind!r}")
    stop = body.get("stop", False)
    if not isinstance(stop, bool):
        raise ValueError(f"request stop must be true or false, got {stop!r}")
    if kind == "none" and not stop:
        raise ValueError("request kind 'none' (no save) only makes sense with stop: true")
    source = body.get("source", "request")
    if source not in ("request", "interrupt"):
        raise ValueError(f"request source must be 'request' or 'interrupt', got {source!r}")
    return Request(id=rid, kind=kind, stop=stop, source=source)


def write_json(fs: pafs.FileSystem, path: str, data: dict[str, Any]) -> None:
    """Write JSON so readers never see half a file: temp + rename locally, one PUT elsewhere."""
    blob = json.dumps(data, indent=1, sort_keys=True).encode("utf-8")
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if fs.type_name == "local":
        tmp = f"{posixpath.dirname(path)}/.tmp-{secrets.token_hex(4)}-{posixpath.basename(path)}"
        with fs.open_output_stream(tmp) as f:
            f.write(blob)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(blob)


class ErrorLog:
    """Logs each distinct storage error at most once a minute: a hung NFS or an S3 outage must not
    flood the logs, and training goes on."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, every_s: float = 60.0) -> None:
        self._clock, self._every_s = clock, every_s
        self._last: dict[str, float] = {}

    def log(self, what: str, where: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        now = self._clock()
        if now - self._last.get(msg, -1e18) >= self._every_s:
            self._last[msg] = now
            logger.error("dyncheck: cannot %s in %s: %s (retrying; training goes on)", what, where, msg)


class RequestChannel:
    """Reads, claims and retires requests in one run directory. Used from rank 0's poller thread.

    Args:
        fs: The run's filesystem (Ray's ``storage_filesystem``).
        run_dir: The run directory on ``fs``.
        trigger_file_path: From the config: relative to ``run_dir``, or absolute, or a URI.
    """

    def __init__(self, fs: pafs.FileSystem, run_dir: str, trigger_file_path: str) -> None:
        self.fs = fs
        self.run_dir = run_dir.rstrip("/")
        if "://" in trigger_file_path:
            self.trigger_fs, self.trigger = pafs.FileSystem.from_uri(trigger_file_path)
            self._trigger_on_run_fs = False
        elif posixpath.isabs(trigger_file_path):
            # An absolute path is a path on this machine, unless the run lives here too.
            local = fs.type_name == "local"
            self.trigger_fs = fs if local else pafs.LocalFileSystem()
            self.trigger = posixpath.normpath(trigger_file_path)
            self._trigger_on_run_fs = local
        else:
            self.trigger_fs = fs
            self.trigger = posixpath.normpath(f"{self.run_dir}/{trigger_file_path}")
            self._trigger_on_run_fs = True
        self._marker: float | None = None
        self._recovered = False
        # Versions of triggers that could not be moved away: acted on once, never again.
        self._acted: dict[str, tuple[Any, ...]] = {}
        self._warned: set[str] = set()
        self._errors = ErrorLog()
        self._last_ok = True

    def path(self, sub: str, name: str = "") -> str:
        return posixpath.join(self.run_dir, sub, name) if name else posixpath.join(self.run_dir, sub)

    def _marker_mtime(self) -> float | None:
        if self._marker is None:
            info = self.fs.get_file_info(posixpath.join(self.run_dir, RUN_MARKER))
            if info.type == pafs.FileType.File and info.mtime is not None:
                self._marker = info.mtime.timestamp()
        return self._marker

    def _is_stale(self, info: pafs.FileInfo, on_run_fs: bool = True) -> bool:
        marker = self._marker_mtime()
        # Compared on the storage's own clock; equal times (coarse clocks, e.g. 1 s on S3) are kept.
        return bool(on_run_fs and marker is not None and info.mtime is not None
                    and info.mtime.timestamp() < marker)

    def poll(self) -> list[Request]:
        """Claim everything new: leftovers in ``claimed/`` (first call), the trigger, the folder.

        Each source is read on its own: one that fails (logged, at most once a minute per message)
        never drops what another already claimed.
        """
        found: list[Request] = []
        if not self._recovered:
            found += self._guard("read claimed requests", self._recover_claimed) or []
            self._recovered = self._last_ok
        trig = self._guard("read the trigger", self._poll_trigger)
        if trig is not None:
            found.append(trig)
        found += self._guard("read requests", self._poll_folder) or []
        return found

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        self._last_ok = False
        try:
            out = fn()
        except Exception as exc:  # storage errors must never reach the training loop
            self._errors.log(what, self.run_dir, exc)
            return None
        self._last_ok = True
        return out

    def _recover_claimed(self) -> list[Request]:
        """Claimed but never retired: a worker restart inside this fit keeps them pending."""
        out = []
        for info in self._list(CLAIMED):
            stem, _, ext = info.base_name.rpartition(".")
            if self._is_stale(info):
                self._discard(info.path, stem if ext == "json" else None, "claimed before this run started")
                continue
            if ext == "trigger":
                out.append(Request(id=stem, source="trigger", path=info.path))
            elif ext == "json":
                req = self._read_request(info.path, stem)
                if req is not None:
                    out.append(req)
        if out:
            logger.warning("dyncheck: %d request(s) claimed earlier and not yet saved are pending again: %s",
                           len(out), ", ".join(r.id for r in out))
        return out

    def _poll_trigger(self) -> Request | None:
        fs, path = self.trigger_fs, self.trigger
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            self._acted.pop(path, None)
            return None
        identity = (info.type, info.mtime, info.size)
        if self._acted.get(path) == identity:
            return None
        if self._is_stale(info, self._trigger_on_run_fs):
            logger.warning("dyncheck: ignoring trigger %s: it was written before this run started "
                           "(touch it again to save)", path)
            self._retire_or_remember(fs, path, identity)
            return None
        rid = new_id("trigger")
        if info.type == pafs.FileType.File and self._trigger_on_run_fs:
            dest = self.path(CLAIMED, f"{rid}.trigger")
            try:
                fs.create_dir(self.path(CLAIMED), recursive=True)
                fs.move(path, dest)
                return Request(id=rid, source="trigger", path=dest)
            except FileNotFoundError:
                return None
            except OSError as exc:
                reason = f"it cannot be moved ({exc})"
        elif info.type == pafs.FileType.File:
            # On another filesystem it cannot be moved into claimed/: claim this version by identity.
            self._acted[path] = identity
            return Request(id=rid, source="trigger", path=None, identity=identity)
        else:
            reason = "it is a directory, not a file"
        self._acted[path] = identity
        logger.error("dyncheck: trigger %s is acted on once but %s; it will not fire again until it "
                     "changes. Remove it so the next touch creates a fresh trigger.", path, reason)
        return Request(id=rid, source="trigger", path=None, identity=identity)

    def _poll_folder(self) -> list[Request]:
        out = []
        for info in self._list(REQUESTS):
            name = info.base_name
            if name.startswith(".") or info.type != pafs.FileType.File:
                continue
            stem = name[:-5] if name.endswith(".json") else name
            if not _ID_RE.match(stem) or not name.endswith(".json"):
                self._warn_once(info.path, "dyncheck: ignoring %s: request files are named <id>.json with "
                                "letters, digits, '.', '_' or '-' in the id", info.path)
                continue
            if self._is_stale(info):
                self._discard(info.path, stem, "written before this run started")
                continue
            dest = self.path(CLAIMED, name)
            try:
                self.fs.create_dir(self.path(CLAIMED), recursive=True)
                self.fs.move(info.path, dest)
            except FileNotFoundError:
                continue
            req = self._read_request(dest, stem)
            if req is not None:
                out.append(req)
        return out

    def _read_request(self, path: str, stem: str) -> Request | None:
        try:
            with self.fs.open_input_stream(path) as f:
                raw = f.read(MAX_BODY_BYTES + 1)
            return replace(parse_body(raw, stem), path=path)
        except ValueError as exc:
            logger.error("dyncheck: rejected request %s: %s", stem, exc)
            self.write_receipt({"id": stem, "status": "rejected", "error": str(exc)})
            self._delete(path)
            return None

    def _discard(self, path: str, rid: str | None, why: str) -> None:
        logger.warning("dyncheck: discarding request %s: %s", path, why)
        if rid is not None:
            self.write_receipt({"id": rid, "status": "discarded", "error": why})
        self._delete(path)

    def _retire_or_remember(self, fs: pafs.FileSystem, path: str, identity: tuple[Any, ...]) -> None:
        try:
            fs.delete_file(path)
        except OSError as exc:
            self._acted[path] = identity
            logger.error("dyncheck: cannot remove %s (%s); it will be ignored until it changes", path, exc)

    def retire(self, requests: Sequence[Request], receipt: dict[str, Any]) -> None:
        """After the checkpoint is stored (or failed): write one receipt per request, delete claims."""
        for req in requests:
            self.write_receipt({**receipt, "id": req.id, "source": req.source,
                                "requested_kind": req.kind, "stop": req.stop})
            if req.path is not None:
                self._delete(req.path)
            elif req.source == "trigger" and req.identity:
                # Not moved at claim time: remove it only if it is still the version we acted on.
                info = self.trigger_fs.get_file_info(self.trigger)
                if info.type == pafs.FileType.File and (info.type, info.mtime, info.size) == req.identity:
                    self._retire_or_remember(self.trigger_fs, self.trigger, req.identity)

    def write_receipt(self, receipt: dict[str, Any]) -> None:
        receipt.setdefault("time", utc_now())
        write_json(self.fs, self.path(RECEIPTS, f"{receipt['id']}.json"), receipt)

    def _list(self, sub: str) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path(sub), allow_not_found=True)
        return sorted(self.fs.get_file_info(sel), key=lambda i: (i.mtime or 0, i.path))

    def _delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.error("dyncheck: cannot delete %s: %s", path, exc)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)


class RequestPoller:
    """Rank 0's daemon thread: polls the channel every ``interval_s`` and writes receipts.

    The training thread only calls :meth:`take` (no I/O). A storage error is logged (at most once a
    minute per message) and retried at the next poll; it never reaches the training loop. If a
    filesystem call hangs, :meth:`close` gives up after its timeout and leaves the thread behind.
    """

    def __init__(self, channel: RequestChannel, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.channel = channel
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[Request] = []
        self._outbox: list[tuple[list[Request], dict[str, Any]]] = []
        self._busy = 0
        self._stopping = False
        self._errors = ErrorLog(clock)
        self.polls = 0
        self._thread = threading.Thread(target=self._run, name="dyncheck-poller", daemon=True)

    def start(self) -> RequestPoller:
        self._thread.start()
        return self

    def take(self) -> list[Request]:
        """Pending requests, removed from the queue: the caller now owns them (no I/O)."""
        with self._lock:
            out, self._pending = self._pending, []
        return out

    def requeue(self, requests: Sequence[Request]) -> None:
        """Put taken requests back, first in line (no I/O)."""
        with self._lock:
            self._pending[:0] = list(requests)

    def has_pending(self) -> bool:
        """Whether a claimed request waits for the next check (no lock, no I/O: a hint)."""
        return bool(self._pending)

    def complete(self, requests: Sequence[Request], receipt: dict[str, Any]) -> None:
        """Queue receipts + retirement for these requests; done on the poller thread."""
        if not requests:
            return
        with self._wake:
            self._outbox.append((list(requests), dict(receipt)))
            self._wake.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued receipt is written; ``False`` on timeout."""
        deadline = self._clock() + timeout
        with self._wake:
            self._wake.notify_all()
            while self._outbox or self._busy:
                left = deadline - self._clock()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._wake.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write outstanding receipts, then stop; abandons the thread if storage hangs."""
        if not self._thread.is_alive():
            return
        if not self.flush(timeout):
            logger.error("dyncheck: receipts not written within %.0f s (storage slow or unreachable); "
                         "giving up on them", timeout)
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        next_poll = 0.0
        while True:
            with self._wake:
                while not self._stopping and not self._outbox and self._clock() < next_poll:
                    self._wake.wait(max(0.0, next_poll - self._clock()))
                if self._stopping:
                    return
                outbox, self._outbox = self._outbox, []
                self._busy = len(outbox)
            failed = []
            for requests, receipt in outbox:
                if self._guard("write receipts", self.channel.retire, requests, receipt) is False:
                    failed.append((requests, receipt))
            with self._wake:
                self._outbox[:0] = failed  # retried at the next poll: a receipt is never dropped
                self._busy = 0
                self._wake.notify_all()
            if self._clock() >= next_poll:
                found = self._guard("read requests", self.channel.poll)
                self.polls += 1
                if found:
                    for req in found:
                        logger.info("dyncheck: request %s (%s, kind=%s, stop=%s) claimed",
                                    req.id, req.source, req.kind, req.stop)
                    with self._lock:
                        self._pending.extend(found)
                next_poll = self._clock() + self.interval_s

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn``; on an error log it (rate-limited) and return ``False``."""
        try:
            return fn(*args)
        except Exception as exc:  # storage errors must never reach the training loop
            self._errors.log(what, self.channel.run_dir, exc)
            return False
