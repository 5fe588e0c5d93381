"""The request channel: the trigger file and the request folder of a run directory, claims and
receipts (layout in :mod:`ray_dyncheck._requests.files`). Used on rank 0, by its poller thread (and, to answer
a failed upload at once, by the upload thread; one lock).

A request is claimed (moved into ``claimed/``, or for a trigger that cannot be moved atomically, its
version recorded there: :mod:`ray_dyncheck._requests.trigger`) before it is acted on, so a new ``touch`` during
a save is a new request; it is retired (receipt written, claim deleted) only once it has its final
answer. Claims survive storage errors and worker restarts: whatever sits in ``claimed/`` and is not in
hand is picked up again. A request older than the run's start marker is stale: discarded with a
warning. Nothing is deleted that was not claimed: only our own claim files and attempt marks, and a
request file whose claim copy is already stored. A final receipt is never overwritten.
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pyarrow.fs as pafs

from ..vocab import FINAL_STATUSES, Source, Status
from .files import (
    CLAIMED,
    REQUESTS,
    RUN_MARKER,
    ErrorLog,
    delete_quietly,
    ensure_dir,
    guard,
    read_capped,
)
from .leftovers import answer_leftovers, attempt_marks, mark_attempts
from .receipts import ReceiptFolder
from .request import ID_RE, Request, parse_body
from .trigger import Trigger

__all__ = ["Request", "RequestChannel", "answer_leftovers", "parse_body"]

logger = logging.getLogger(__name__)

class RequestChannel:
    """Reads, claims and retires requests in one run directory. Used from rank 0's poller thread.

    Args:
        fs: The run's filesystem (Ray's ``storage_filesystem``).
        run_dir: The run directory on ``fs``.
        trigger_file_path: From the config: relative to ``run_dir``, or absolute, or a URI.
        max_attempts: A claim whose save was started this many times without an answer (each time
            the workers died) gets an error receipt instead of another try.
    """

    def __init__(self, fs: pafs.FileSystem, run_dir: str, trigger_file_path: str, *, max_attempts: int = 2) -> None:
        self.fs = fs
        self.run_dir = run_dir.rstrip("/")
        self.max_attempts = max_attempts
        self.receipts = ReceiptFolder(fs, self.run_dir)
        # No I/O here (the constructor runs on the training thread): a URI's filesystem is made at the
        # first poll, on the poller thread.
        self.trigger = Trigger(fs, self.run_dir, trigger_file_path, discard=self._discard, answered=self.receipts.final)
        self._trigger_blocked = True
        """Until a rescan has read every trigger claim: their versions must be known before a poll of the
        trigger (a version claimed before a restart must not fire again)."""
        self._marker: float | None = None
        # Claims in hand (handed out, not yet retired). Anything else in claimed/ is picked up again
        # by a rescan: on the first poll (a worker restart) and after any pass that had an error.
        self._known: set[str] = set()
        self._rescan = True
        # Request files whose claim copy is stored but which could not be removed (an object store's
        # move is a copy and a delete): removed when seen again, never claimed a second time.
        self._uncollected: set[str] = set()
        self._warned: set[str] = set()
        self._errors = ErrorLog()
        self._ok = True
        # The poller thread uses the channel; an upload thread may retire through it too.
        self.lock = threading.RLock()

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

    # -- claiming -------------------------------------------------------------------------------

    def poll(self) -> list[Request]:
        """Claim everything new: leftover claims (after a restart or an error), the trigger, the folder.

        Every file is handled on its own: one that fails (logged, at most once a minute per message)
        never drops what was already claimed; its claim is picked up by the rescan of the next poll.
        """
        with self.lock:
            return self._poll()

    def _poll(self) -> list[Request]:
        self._ok = True
        found: list[Request] = []
        if self._rescan:
            self._trigger_blocked = True
            found += self._guard("read claimed requests", self._recover_claimed) or []
            self._known.update(r.path for r in found if r.path is not None)
        if not self._trigger_blocked:
            trig = self._guard("read the trigger", self.trigger.poll)
            if trig is not None:
                found.append(trig)
                self._known.add(trig.path)
        found += self._guard("read requests", self._poll_folder) or []
        self._rescan = not self._ok
        self._known.update(r.path for r in found if r.path is not None)
        return found

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        out, ok = guard(self._errors, what, self.run_dir, fn, *args)
        self._ok = self._ok and ok
        return out

    def _recover_claimed(self) -> list[Request]:
        """Claimed, not in hand and not answered: pending again (a restart keeps requests)."""
        infos = self._list(CLAIMED)
        attempts = {stem: list(marks.values()) for stem, marks in attempt_marks(infos).items()}
        out = []
        claims = set()
        triggers_read = True
        for info in infos:
            stem, _, ext = info.base_name.rpartition(".")
            if ext not in ("json", "trigger") or info.path in self._known:
                continue
            claims.add(stem)
            marks = attempts.get(stem, [])
            req, ok = guard(self._errors, "read a claimed request", self.run_dir, self._recover_one, info, stem,
                            ext, len(marks))
            self._ok = self._ok and ok
            triggers_read = triggers_read and (ok or ext != "trigger")
            if req is None:
                if ok:  # answered: its attempt marks go with it (unreadable for now: tried again)
                    for mark in marks:
                        delete_quietly(self.fs, mark)
                continue
            out.append(req)
        in_hand = {posixpath.basename(p).rpartition(".")[0] for p in self._known}
        for stem, marks in attempts.items():
            if stem not in claims and stem not in in_hand:
                for mark in marks:  # a claim retired before its marks were removed
                    delete_quietly(self.fs, mark)
        self._trigger_blocked = not triggers_read
        if out:
            logger.warning("dyncheck: %d request(s) claimed earlier and not yet answered are pending again: %s",
                           len(out), ", ".join(r.id for r in out))
        return out

    def _recover_one(self, info: pafs.FileInfo, stem: str, ext: str, attempts: int) -> Request | None:
        if ext == "trigger":
            # A trigger claimed by its version: that version counts as served (never fires again),
            # and is stored as served before this claim can be removed.
            try:
                self.trigger.note_claimed(json.loads(read_capped(self.fs, info.path).decode("utf-8") or "null"))
            except FileNotFoundError:
                return None
            except ValueError:  # a moved trigger holds whatever the user wrote into it
                pass
        # A final receipt next: an answered claim is only removed, whatever else holds for it.
        receipt = self.receipts.read(stem)
        if receipt is not None and receipt.get("status") in FINAL_STATUSES:
            logger.info("dyncheck: claim %s already has its final receipt (%s); retiring it", stem,
                        receipt["status"])
            self.trigger.flush()
            delete_quietly(self.fs, info.path)
            return None
        if self._is_stale(info):
            self.trigger.flush()
            self._discard(info.path, stem, "claimed before this run started")
            return None
        if ext == "trigger":
            req: Request | None = Request(id=stem, source=Source.TRIGGER, path=info.path, attempts=attempts)
        else:
            req = self._read_request(info.path, stem)
            req = replace(req, attempts=attempts) if req is not None else None
        if req is not None and attempts >= self.max_attempts:
            why = (f"its save was started {attempts} times and each time the workers died before it was "
                   "stored (out of memory?); not trying again")
            logger.error("dyncheck: request %s: %s", stem, why)
            self.write_receipt({"id": stem, "status": Status.ERROR, "error": why, "attempts": attempts,
                                "source": req.source, "requested_kind": req.kind, "stop": req.stop})
            delete_quietly(self.fs, info.path)
            return None
        return req

    def _poll_folder(self) -> list[Request]:
        out = []
        for info in self._list(REQUESTS):
            req = self._guard("claim a request", self._claim_one, info)
            if req is not None:
                out.append(req)
        return out

    def _claim_one(self, info: pafs.FileInfo) -> Request | None:
        name = info.base_name
        if name.startswith(".") or info.type != pafs.FileType.File:
            return None
        stem = name[:-5] if name.endswith(".json") else name
        if not ID_RE.match(stem) or not name.endswith(".json"):
            self._warn_once(info.path, "dyncheck: ignoring %s: request files are named <id>.json with "
                            "letters, digits, '.', '_' or '-' in the id", info.path)
            return None
        if self._is_stale(info):
            self._discard(info.path, stem, "written before this run started")
            return None
        dest = self.path(CLAIMED, name)
        if info.path in self._uncollected:
            self._uncollected.discard(info.path)
            delete_quietly(self.fs, info.path)
            return None
        if (dest in self._known or self.fs.get_file_info(dest).type == pafs.FileType.File) \
                and self._same_bytes(info.path, dest):
            # The request file left behind by a claim whose copy landed (the delete of its source
            # failed): the same request, already claimed. Removed, never claimed a second time.
            delete_quietly(self.fs, info.path)
            return None
        if dest in self._known or self.receipts.read(stem) is not None:
            # One id, one request, one receipt: serving it would overwrite that receipt (or the claim
            # in hand). Left where it is, said once; the end of the run removes it.
            self._warn_once(info.path, "dyncheck: ignoring request %s: its id was used before (it has a "
                            "receipt or is being served); write each request with a new id", info.path)
            return None
        ensure_dir(self.fs, self.path(CLAIMED))
        try:
            self.fs.move(info.path, dest)
        except FileNotFoundError:
            return None
        except OSError:
            # On an object store a move is a copy, then a delete of the source. If the copy is
            # stored, the request is claimed; the request file left behind is removed when seen
            # again, never claimed a second time (that would save twice and rewrite the receipt).
            if self.fs.get_file_info(dest).type != pafs.FileType.File:
                raise
            self._uncollected.add(info.path)
            logger.warning("dyncheck: request %s claimed, but its request file could not be removed yet", stem)
        # Claimed from here on: if reading it fails, the rescan of the next poll picks it up.
        self._known.discard(dest)
        return self._read_request(dest, stem)

    def _same_bytes(self, a: str, b: str) -> bool:
        try:
            return read_capped(self.fs, a) == read_capped(self.fs, b)
        except FileNotFoundError:
            return False
        except ValueError:  # over the size cap: not a request of ours either way
            return False

    def _read_request(self, path: str, stem: str) -> Request | None:
        try:
            return replace(parse_body(read_capped(self.fs, path, what="request body"), stem), path=path)
        except FileNotFoundError:
            return None
        except ValueError as exc:
            logger.error("dyncheck: rejected request %s: %s", stem, exc)
            self.write_receipt({"id": stem, "status": Status.REJECTED, "error": str(exc)})
            delete_quietly(self.fs, path)
            return None

    def _discard(self, path: str, rid: str | None, why: str) -> None:
        """Answer a claim or request ``discarded`` and remove it (ours: a claim, or a request file
        written before the run)."""
        logger.warning("dyncheck: discarding request %s: %s", path, why)
        if rid is not None:
            self.write_receipt({"id": rid, "status": Status.DISCARDED, "error": why})
        delete_quietly(self.fs, path)

    # -- answering ------------------------------------------------------------------------------

    def mark_attempt(self, requests: Sequence[Request]) -> None:
        """A save for these claims starts: one more attempt each (an empty file next to the claim)."""
        with self.lock:
            mark_attempts(self.fs, requests)

    def retire(self, requests: Sequence[Request], receipt: dict[str, Any], written: set[str] | None = None) -> None:
        """Write one final receipt per request, then delete its claim (and attempt marks). The
        trigger itself is never deleted here: a moved trigger's claim is the file; a trigger claimed
        by its version stays where it is.

        ``written`` holds the ids whose receipt is already written (a retry after a failed delete):
        a receipt is written once, never rewritten. Raises if a claim could not be deleted, after
        trying all of them, so the caller retries the deletions.
        """
        with self.lock:
            self._retire(requests, receipt, set() if written is None else written)

    def _retire(self, requests: Sequence[Request], receipt: dict[str, Any], written: set[str]) -> None:
        failed: list[str] = []
        for req in requests:
            if req.id not in written:
                self.write_receipt({**receipt, "id": req.id, "source": req.source,
                                    "requested_kind": req.kind, "stop": req.stop})
                written.add(req.id)
            if req.path is not None and req.source == "trigger":
                try:  # a claim holding a trigger's version goes only once that version is stored as served
                    self.trigger.flush()
                except OSError as exc:
                    failed.append(f"{req.path}: kept until the served trigger version is stored ({exc})")
                    continue
            if req.path is not None:
                stem = req.path.rsplit(".", 1)[0]
                # Earlier attempts and this one; the claim itself last, so nothing is orphaned.
                for path in [f"{stem}.attempt{n}" for n in range(1, req.attempts + 2)] + [req.path]:
                    try:
                        self.fs.delete_file(path)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        failed.append(f"{path}: {exc}")
                if not failed:
                    self._known.discard(req.path)
        if failed:
            raise OSError(f"cannot delete answered claim(s): {'; '.join(failed)}")

    def write_receipt(self, receipt: dict[str, Any]) -> bool:
        """Write a request's final receipt, unless it already has one (see :meth:`ReceiptFolder.write`)."""
        return self.receipts.write(receipt)

    def _list(self, sub: str) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path(sub), allow_not_found=True)
        return sorted(self.fs.get_file_info(sel), key=lambda i: (i.mtime or 0, i.path))

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)
