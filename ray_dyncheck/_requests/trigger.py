"""The trigger file: Axolotl's ``touch``-to-save, read by rank 0's poller thread.

Two ways to claim it, chosen by what the store can do atomically:

- **Moved** (the trigger on the run's own local or NFS filesystem): renamed into
  ``RUN/.dyncheck/claimed/<id>.trigger`` in one step, so a ``touch`` a moment later creates a new file,
  a new request.
- **By identity** (an object store, whose move is a copy and a delete; or a trigger on another store
  than the run's): the trigger is never moved or deleted (a delete retried through an outage, or
  issued a moment after a check of the identity, can remove a newer trigger nobody served). Its
  version (type, modification time, size) is claimed instead: a claim file holding it is written to
  ``claimed/`` (so the request survives a worker restart and counts its attempts like any other), and
  the newest served version is kept in ``RUN/.dyncheck/served/``. The same version never fires twice,
  also after a restart; each new write of the trigger (a new modification time) is one request. An
  object store dates objects to the second: a write within the same second as the served one is
  taken for the served version.

A trigger written before the run started is stale: compared with Ray's start marker on the run's
store, or, for a trigger on another store, with that marker moved onto the other store's clock (one
probe object of ours on each store gives the offset). Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import secrets
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from ..vocab import Source
from .files import (
    CHANNEL_DIR,
    CLAIMED,
    RUN_MARKER,
    delete_quietly,
    ensure_dir,
    filesystem_from_uri,
    new_id,
    read_json_strict,
    utc_now,
    write_json,
)
from .request import Request

__all__ = ["Trigger"]

logger = logging.getLogger(__name__)

SERVED = f"{CHANNEL_DIR}/served"
TRIGGER_START = f"{CHANNEL_DIR}/trigger-start.json"


def identity_of(info: pafs.FileInfo) -> list[Any]:
    """A version of the trigger, as JSON: ``[type, mtime in ns, size]``."""
    return [int(info.type), info.mtime_ns, info.size]


class Trigger:
    """The trigger file of one run, seen from rank 0's poller thread (the channel's lock held).

    Args:
        fs: The run's filesystem.
        run_dir: The run directory on ``fs``.
        spec: ``trigger_file_path`` from the config (validated there): relative to ``run_dir``, an
            absolute path, or a URI. A URI's filesystem is made at the first poll, on the poller
            thread (it may look the bucket's region up), never in the constructor.
        discard: ``discard(claim path, id, why)``: answers a claim ``discarded`` and removes it.
        answered: ``answered(id)``: whether that request has its final receipt (a storage error raises).
    """

    def __init__(self, fs: pafs.FileSystem, run_dir: str, spec: str,
                 discard: Callable[[str, str, str], None], answered: Callable[[str], bool]) -> None:
        self.run_fs, self.run_dir, self.spec = fs, run_dir.rstrip("/"), spec
        self._discard, self._answered = discard, answered
        self.fs: pafs.FileSystem | None = None
        self.path = spec if "://" in spec else (
            posixpath.normpath(spec) if posixpath.isabs(spec) else posixpath.normpath(f"{self.run_dir}/{spec}"))
        """The trigger's path (the URI itself until it is resolved): for logs."""
        self.movable = False
        self.on_run_fs = False
        self._start: float | None = None
        self._start_known = False
        self._served: list[Any] | None = None
        self._served_loaded = False
        self._dirty = False
        self._warned: set[str] = set()

    # -- set-up (poller thread) -----------------------------------------------------------------

    def _resolve(self) -> pafs.FileSystem:
        if self.fs is None:
            if "://" in self.spec:
                fs, self.path = filesystem_from_uri(self.spec)
                self.on_run_fs = False
            elif posixpath.isabs(self.spec):
                # An absolute path is a path on this machine, unless the run lives here too.
                local = self.run_fs.type_name == "local"
                fs, self.on_run_fs = (self.run_fs if local else pafs.LocalFileSystem()), local
            else:
                fs, self.on_run_fs = self.run_fs, True
            # Only a rename on the run's own local filesystem is one atomic step into claimed/.
            self.movable = self.on_run_fs and self.run_fs.type_name == "local"
            self.fs = fs
        return self.fs

    def _served_path(self) -> str:
        key = hashlib.sha1(f"{self.spec}|{self.path}".encode()).hexdigest()[:16]
        return posixpath.join(self.run_dir, SERVED, f"trigger-{key}.json")

    def _load_served(self) -> None:
        """The newest served version, from storage (once). A storage error raises: polling the
        trigger without it could serve an old version again."""
        if self._served_loaded:
            return
        # A corrupt record reads as none: the start marker still guards older versions.
        data = read_json_strict(self.run_fs, self._served_path())
        identity = data.get("identity") if data is not None else None
        stored = identity if isinstance(identity, list) else None
        self._note(stored)
        if self._served is not None and self._served != stored:
            self._dirty = True  # a claim recovered before this load holds a newer version: store it
        self._served_loaded = True

    def _note(self, identity: list[Any] | None) -> bool:
        """Keep the newest of the served versions seen (by modification time): whether ``identity``
        became the newest."""
        if identity is None or len(identity) != 3 or identity == self._served:
            return False
        if self._served is None or (identity[1] or 0) >= (self._served[1] or 0):
            self._served = identity
            return True
        return False

    def note_claimed(self, body: Any) -> None:
        """A claim file recovered after a restart: the version it holds counts as served (and is
        stored as served before the claim can be removed)."""
        if isinstance(body, dict) and body.get("trigger") == self.spec and isinstance(body.get("identity"), list):
            if self._note(body["identity"]):
                self._dirty = True

    def flush(self) -> None:
        """Store the newest served version if storing it failed before (raises if it fails again)."""
        if self._dirty and self._served is not None:
            write_json(self.run_fs, self._served_path(), {"trigger": self.spec, "identity": self._served,
                                                          "time": utc_now()})
            self._dirty = False

    def _start_time(self) -> float | None:
        """When this run started, on the trigger's store's clock (``None``: unknown, nothing is stale)."""
        if self._start_known:
            return self._start
        info = self.run_fs.get_file_info(posixpath.join(self.run_dir, RUN_MARKER))
        marker = info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime is not None else None
        if marker is None or self.on_run_fs:
            self._start = marker
        else:
            try:
                self._start = self._own_marker(marker)
            except OSError as exc:
                # A read-only trigger store: the clocks cannot be compared, so the run's marker is taken
                # as it is (a trigger written just before the start, by a skewed clock, may fire).
                logger.warning("dyncheck: cannot measure the clock of trigger_file_path %s (writing a probe into "
                               "%s failed: %s); a trigger there is judged stale against the run's start as its "
                               "own clock says. Allow writes there (e.g. s3:PutObject and s3:DeleteObject) to "
                               "compare the two clocks", self.spec, posixpath.dirname(self.path), exc)
                self._start = marker
        self._start_known = marker is not None
        return self._start

    def _own_marker(self, run_marker: float) -> float | None:
        """The run's start on the trigger's store's clock, measured once per run and kept under
        ``RUN/.dyncheck/`` with the run's marker (a worker restart reuses it)."""
        record_path = posixpath.join(self.run_dir, TRIGGER_START)
        record = read_json_strict(self.run_fs, record_path)
        if (record is not None and record.get("run_marker") == run_marker
                and record.get("trigger") == self.spec and isinstance(record.get("start"), (int, float))):
            return float(record["start"])
        # The offset between the two stores' clocks, from one probe on each, written back to back:
        # the run's start on the trigger's clock is Ray's marker moved by that offset, less a second
        # for coarse clocks (S3 dates to the second): a touch just before the start may fire, a
        # touch just after it is never taken for stale.
        assert self.fs is not None
        run_probe = self._probe(self.run_fs, posixpath.join(self.run_dir, SERVED))
        trigger_probe = self._probe(self.fs, posixpath.dirname(self.path))
        if run_probe is None or trigger_probe is None:
            return None
        start = run_marker + (trigger_probe - run_probe) - 1.0
        write_json(self.run_fs, record_path, {"run_marker": run_marker, "trigger": self.spec, "start": start,
                                              "time": utc_now()})
        return start

    @staticmethod
    def _probe(fs: pafs.FileSystem, folder: str) -> float | None:
        """The store's clock now: the modification time of an empty object of ours, then removed."""
        probe = posixpath.join(folder, f".dyncheck-clock-{secrets.token_hex(6)}")
        ensure_dir(fs, folder)
        with fs.open_output_stream(probe):
            pass
        try:
            info = fs.get_file_info(probe)
        finally:
            delete_quietly(fs, probe)  # our own object, under a name nobody else uses
        return info.mtime.timestamp() if info.mtime is not None else None

    # -- polling (poller thread) ----------------------------------------------------------------

    def poll(self) -> Request | None:
        """A new request if the trigger holds a version nobody served; storage errors raise."""
        fs = self._resolve()
        self._load_served()
        self.flush()
        info = fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return None
        if self.movable and info.type == pafs.FileType.File:
            return self._claim_by_move()
        return self._claim_by_identity(info)

    def _is_stale(self, info: pafs.FileInfo) -> bool:
        start = self._start_time()
        # On the store's own clock; equal times (coarse clocks, e.g. 1 s on S3) are kept.
        return start is not None and info.mtime is not None and info.mtime.timestamp() < start

    def _claim_by_move(self) -> Request | None:
        rid = new_id("trigger")
        claimed = posixpath.join(self.run_dir, CLAIMED)
        dest = posixpath.join(claimed, f"{rid}.trigger")
        ensure_dir(self.run_fs, claimed)
        try:
            self.run_fs.move(self.path, dest)
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. another device under an absolute path: claimed by identity
            self.movable = False
            logger.warning("dyncheck: trigger %s cannot be moved into %s (%s); it stays where it is and each "
                           "new version of it is one request", self.path, claimed, exc)
            return None
        # A rename keeps the modification time: judged on the file we now own, so a touch that landed
        # just before the rename is served, never deleted as stale.
        if self._is_stale(self.run_fs.get_file_info(dest)):
            logger.warning("dyncheck: ignoring trigger %s: it was written before this run started "
                           "(touch it again to save)", self.path)
            self._discard(dest, rid, "the trigger was written before this run started")
            return None
        return Request(id=rid, source=Source.TRIGGER, path=dest)

    def _claim_by_identity(self, info: pafs.FileInfo) -> Request | None:
        identity = identity_of(info)
        if identity == self._served:
            return None
        if self._is_stale(info):
            self._warn_once(repr(identity), "dyncheck: ignoring trigger %s: it was written before this run "
                            "started (write it again to save)", self.path)
            return None
        # One id per version: a claim write that times out and lands later, or is written again by
        # the next poll, is the same claim (one object, one request), never a second one.
        key = hashlib.sha1(f"{self.spec}|{identity}".encode()).hexdigest()[:6]
        stamp = datetime.fromtimestamp((identity[1] or 0) / 1e9, timezone.utc).strftime("%Y%m%dT%H%M%S")
        rid = f"trigger-{stamp}-{key}"
        dest = posixpath.join(self.run_dir, CLAIMED, f"{rid}.trigger")
        if self._answered(rid):  # served before its version was stored as served
            self._served, self._dirty = identity, True
            self.flush()
            return None
        # The claim first: once it is stored the request survives a restart, and its version counts
        # as served (a restart reads it back); the served record follows, retried until stored.
        write_json(self.run_fs, dest, {"trigger": self.spec, "identity": identity, "time": utc_now()})
        self._served, self._dirty = identity, True
        try:
            self.flush()
        except OSError as exc:
            logger.warning("dyncheck: could not record trigger version as served (%s); retried at the next poll",
                           exc)
        if info.type != pafs.FileType.File:
            logger.error("dyncheck: trigger %s is acted on once but it is a directory, not a file; it will not "
                         "fire again until it changes. Remove it and touch a file instead.", self.path)
        return Request(id=rid, source=Source.TRIGGER, path=dest, identity=tuple(identity))

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)
