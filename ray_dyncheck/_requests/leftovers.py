"""Attempt marks (one empty file per save started for a claim), and answering what a run left when it
ended: every request still waiting or claimed gets its final receipt."""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterable

import pyarrow.fs as pafs

from ..vocab import FINAL_STATUSES, Status
from .files import CLAIMED, RECEIPTS, REQUESTS, delete_quietly, read_capped, utc_now, write_json
from .request import Request

__all__ = ["ATTEMPT_RE", "answer_leftovers", "attempt_marks", "mark_attempts"]

logger = logging.getLogger(__name__)

ATTEMPT_RE = re.compile(r"^(.+)\.attempt(\d+)$")
"""``<claim stem>.attempt<n>``: the n-th save started for that claim."""


def attempt_marks(infos: Iterable[pafs.FileInfo]) -> dict[str, dict[int, str]]:
    """``{claim stem: {n: path of its n-th attempt mark}}`` among ``infos``."""
    marks: dict[str, dict[int, str]] = {}
    for info in infos:
        m = ATTEMPT_RE.match(info.base_name)
        if m:
            marks.setdefault(m.group(1), {})[int(m.group(2))] = info.path
    return marks


def mark_attempts(fs: pafs.FileSystem, requests: Iterable[Request]) -> None:
    """A save for these claims starts: one more attempt each (an empty file next to the claim)."""
    for req in requests:
        if req.path is not None:
            with fs.open_output_stream(f"{req.path.rsplit('.', 1)[0]}.attempt{req.attempts + 1}"):
                pass


def answer_leftovers(fs: pafs.FileSystem, run_dir: str, why: str) -> list[str]:
    """After a run has ended: every request still waiting or claimed gets a final receipt (unless it
    has one) and is removed: ``unserved``, or ``error`` for a claim whose save was started (attempt
    marks) and never finished, i.e. the workers died during it. Returns the ids answered. Any process.
    """
    answered = []
    for sub in (CLAIMED, REQUESTS):  # a claim knows its attempts: answered first
        infos = fs.get_file_info(pafs.FileSelector(posixpath.join(run_dir, sub), allow_not_found=True))
        attempts = {stem: max(marks) for stem, marks in attempt_marks(infos).items()}
        for info in infos:
            stem, _, ext = info.base_name.rpartition(".")
            if info.type != pafs.FileType.File or info.base_name.startswith(".") or ext not in ("json", "trigger"):
                continue
            receipt_path = posixpath.join(run_dir, RECEIPTS, f"{stem}.json")
            try:
                old = json.loads(read_capped(fs, receipt_path))
            except FileNotFoundError:
                old = None
            except (OSError, ValueError) as exc:  # cannot tell: never overwrite what may be final
                logger.error("dyncheck: cannot read receipt %s (%s); leaving request %s as it is",
                             receipt_path, exc, stem)
                continue
            if not (isinstance(old, dict) and old.get("status") in FINAL_STATUSES):
                n = attempts.get(stem, 0)
                receipt = ({"status": Status.ERROR, "attempts": n, "error": f"its save was started {n} time(s) and "
                            f"the workers died during it; {why}"} if n else {"status": Status.UNSERVED, "error": why})
                write_json(fs, receipt_path, {"id": stem, **receipt, "time": utc_now()})
                answered.append(stem)
            delete_quietly(fs, info.path)
        for info in infos:  # attempt marks of claims now gone
            if ATTEMPT_RE.match(info.base_name):
                delete_quietly(fs, info.path)
    return answered
