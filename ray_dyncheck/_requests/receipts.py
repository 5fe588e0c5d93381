"""The receipts folder (``.dyncheck/receipts/<id>.json``): one final receipt per request, written once,
never overwritten."""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

import pyarrow.fs as pafs

from ..vocab import FINAL_STATUSES
from .files import RECEIPTS, read_capped, utc_now, write_json

__all__ = ["ReceiptFolder"]

logger = logging.getLogger(__name__)


class ReceiptFolder:
    """Reads and writes one run's receipts on ``fs``."""

    def __init__(self, fs: pafs.FileSystem, run_dir: str) -> None:
        self.fs = fs
        self.folder = posixpath.join(run_dir, RECEIPTS)

    def read(self, rid: str) -> dict[str, Any] | None:
        """The receipt written for ``rid``, or ``None``. A storage error raises: the caller must not
        take "cannot read" for "not answered" (that would save an answered request again)."""
        try:
            raw = read_capped(self.fs, posixpath.join(self.folder, f"{rid}.json"))
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def final(self, rid: str) -> bool:
        """Whether ``rid`` has its final receipt (a storage error raises)."""
        receipt = self.read(rid)
        return receipt is not None and receipt.get("status") in FINAL_STATUSES

    def write(self, receipt: dict[str, Any]) -> bool:
        """Write a request's final receipt, unless it already has one: a final receipt is never
        overwritten, whichever path answers again. Returns whether it was written; a storage error
        raises (an unreadable receipt is never taken for a missing one)."""
        rid = receipt["id"]
        old = self.read(rid)
        if old is not None and old.get("status") in FINAL_STATUSES:
            logger.warning("dyncheck: request %s already has its final receipt (%s); not writing %s", rid,
                           old["status"], receipt.get("status"))
            return False
        receipt.setdefault("time", utc_now())
        write_json(self.fs, posixpath.join(self.folder, f"{rid}.json"), receipt)
        return True
