"""Rank 0's final answers for checkpoints in flight: ``ok`` only once the backend says a checkpoint
is committed (a new run would resume from it), else ``error`` with why; one receipt per request.

Built from collaborators, not from the core: ``confirm(path)`` (is it registered?), ``answer(requests,
receipt, now)`` (write the receipts), ``settled(record, requests, path)`` (metrics, measurements) and
``uri(path)``; so a test can drive it with plain functions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .._backends.base import OnDone
from .._requests.request import Request
from ..vocab import Status

__all__ = ["Receipts"]

Confirm = Callable[[str], tuple[bool, "str | None"]]
"""``confirm(path) -> (committed, why not)``; may block (it runs in the commit thread)."""
Answer = Callable[[list[Request], dict[str, Any], bool], None]
"""``answer(requests, receipt, now)``: write their final receipts (``now``: from the upload thread, which
Ray fails right after)."""
Settled = Callable[[dict[str, Any], list[Request], "str | None"], None]

logger = logging.getLogger(__name__)


class Receipts:
    """Turns "stored" into a final receipt: ``ok`` only once the backend says the checkpoint is
    committed, else ``error`` with why; one receipt per request, whatever retries happen below.

    ``on_done`` runs in the backend's upload thread, where asking Ray whether the checkpoint is
    registered would deadlock (Ray queues the report only after the upload returns); so rank 0
    confirms commits in a thread of its own.
    """

    def __init__(self, *, rank: int, confirm: Confirm, answer: Answer, settled: Settled,
                 uri: Callable[[str], str | None] = lambda path: path,
                 last_step: Callable[[], int] = lambda: 0) -> None:
        self.rank = rank
        self._confirm, self._answer_with, self._settled, self._uri = confirm, answer, settled, uri
        self._last_step = last_step
        self.busy = 0
        self.storing = 0
        """Checkpoints of this rank whose files are not yet stored (a save in flight)."""
        self._cv = threading.Condition()
        self._queue: list[tuple[dict[str, Any], list[Request], float, str]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last: tuple[dict[str, Any], list[Request]] | None = None
        self._last_receipt: dict[str, Any] | None = None

    def expect(self, record: dict[str, Any], requests: list[Request], t0: float) -> OnDone:
        """Count one checkpoint in flight on this rank; the returned ``on_done`` settles it once."""
        with self._cv:
            self.busy += 1
            self.storing += 1
            self._last, self._last_receipt = (record, requests), None
        settled = [False]

        def on_done(path: str | None, exc: BaseException | None) -> None:
            with self._cv:
                if settled[0]:
                    return
                settled[0] = True
                self.storing -= 1
                self._cv.notify_all()
            try:
                record["path"] = path
                if self.rank != 0:
                    return
                if exc is None and path is not None:
                    with self._cv:
                        self.busy += 1  # handed to the commit thread, counted until it answers
                        self._queue.append((record, requests, t0, path))
                        self._start()
                        self._cv.notify_all()
                    return
                record["error"] = (f"not stored: {type(exc).__name__}: {exc}" if exc is not None
                                   else "not stored: the backend reported no path")
                # Written now: from Ray's upload thread, Ray fails the worker group right after.
                self._answer(record, requests, None, now=True)
            finally:
                self._done()

        return on_done

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dyncheck-commits", daemon=True)
            self._thread.start()

    def _done(self) -> None:
        with self._cv:
            self.busy -= 1
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                record, requests, t0, path = self._queue.pop(0)
            try:
                try:
                    ok, why = self._confirm(path)
                except Exception as exc:  # an unreachable controller: the receipt says so
                    ok, why = False, f"could not confirm it was registered: {type(exc).__name__}: {exc}"
                if ok:
                    record["commit_s"] = time.perf_counter() - t0
                    logger.info("dyncheck: %s checkpoint for step %d committed at %s (%.2f s after the decision)",
                                record["kind"], record["step"], path, record["commit_s"])
                else:
                    record["error"] = why
                self._answer(record, requests, path if ok else None)
            finally:
                self._done()

    def _answer(self, record: dict[str, Any], requests: list[Request], path: str | None, *,
                now: bool = False) -> None:
        receipt: dict[str, Any] = {"step": record["step"], "kind": record["kind"], "reason": record["reason"]}
        if path is not None:
            receipt.update(status=Status.OK, checkpoint=path, checkpoint_uri=self._uri(path))
        else:
            logger.error("dyncheck: the %s checkpoint at step %d is not committed: %s", record["kind"],
                         record["step"], record["error"])
            receipt.update(status=Status.ERROR, error=record["error"])
        with self._cv:
            if self._last is not None and self._last[0] is record:
                self._last_receipt = receipt
            requests = list(requests)  # requests attached until now are answered here
        try:
            self._settled(record, requests, path)
        except Exception:  # metrics and measurements never cost a receipt
            logger.exception("dyncheck: could not record the outcome of the save at step %d", record["step"])
        if requests:
            logger.info("dyncheck: receipt %s for %s (step %d)", receipt["status"],
                        ", ".join(r.id for r in requests), record["step"])
            self._answer_with(requests, receipt, now)

    def attach(self, requests: list[Request]) -> None:
        """Rank 0: let the newest save answer ``requests`` too (they asked for what it holds while it
        was in flight); at once if its receipt is already written."""
        with self._cv:
            if self._last is not None and self._last_receipt is None:
                self._last[1].extend(requests)
                return
            receipt = self._last_receipt
        if receipt is None:
            receipt = {"status": Status.ERROR, "step": self._last_step(), "kind": None,
                       "error": "no save in flight to answer it"}
        self._answer_with(requests, receipt, False)

    def wait_stored(self, timeout: float) -> bool:
        """Until this rank's checkpoints are all stored; ``False`` on timeout."""
        return self._wait_for_zero("storing", timeout)

    def wait(self, timeout: float) -> bool:
        """Until every checkpoint of this rank is stored and (rank 0) answered; ``False`` on timeout."""
        return self._wait_for_zero("busy", timeout)

    def _wait_for_zero(self, counter: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while getattr(self, counter):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
