"""Rank 0's final answers for checkpoints in flight: ``ok`` only once the backend says a checkpoint
is committed (a new run would resume from it), else ``error`` with why; one receipt per request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ._channel import Request

if TYPE_CHECKING:
    from ._core import OnDone, WorkerCore

__all__ = ["Receipts"]

logger = logging.getLogger(__name__)


class Receipts:
    """Turns "stored" into a final receipt: ``ok`` only once the backend says the checkpoint is
    committed, else ``error`` with why; one receipt per request, whatever retries happen below.

    ``on_done`` runs in the backend's upload thread, where asking Ray whether the checkpoint is
    registered would deadlock (Ray queues the report only after the upload returns); so rank 0
    confirms commits in a thread of its own.
    """

    def __init__(self, core: WorkerCore) -> None:
        self.core = core
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
                if self.core.rank != 0:
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
                timeout = self.core.config.commit_timeout_s
                try:
                    ok = self.core.backend.committed(path, timeout)
                    why = None if ok else (f"Ray did not register it within {timeout:g} s (or removed it at "
                                           "once: see CheckpointConfig(num_to_keep))")
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
            receipt.update(status="ok", checkpoint=path, checkpoint_uri=self.core.uri(path))
        else:
            logger.error("dyncheck: the %s checkpoint at step %d is not committed: %s", record["kind"],
                         record["step"], record["error"])
            receipt.update(status="error", error=record["error"])
        with self._cv:
            if self._last is not None and self._last[0] is record:
                self._last_receipt = receipt
            requests = list(requests)  # requests attached until now are answered here
        try:
            self.core.settled(record, requests, path)
        except Exception:  # metrics and measurements never cost a receipt
            logger.exception("dyncheck: could not record the outcome of the save at step %d", record["step"])
        if not requests or self.core.poller is None:
            return
        logger.info("dyncheck: receipt %s for %s (step %d)", receipt["status"], ", ".join(r.id for r in requests),
                    record["step"])
        written: set[str] = set()
        channel = self.core.channel
        # Not while the poller holds the channel in a hung storage call: then the poller writes it.
        if now and channel is not None and channel.lock.acquire(timeout=5.0):
            try:
                channel.retire(requests, receipt, written)
                return
            except Exception as exc:
                logger.error("dyncheck: could not write receipts now (%s: %s); the poller retries",
                             type(exc).__name__, exc)
            finally:
                channel.lock.release()
        self.core.poller.complete(requests, receipt, written)

    def attach(self, requests: list[Request]) -> None:
        """Rank 0: let the newest save answer ``requests`` too (they asked for what it holds while it
        was in flight); at once if its receipt is already written."""
        with self._cv:
            if self._last is not None and self._last_receipt is None:
                self._last[1].extend(requests)
                return
            receipt = self._last_receipt
        if receipt is None:
            receipt = {"status": "error", "step": self.core.last_step, "kind": None,
                       "error": "no save in flight to answer it"}
        if self.core.poller is not None:
            self.core.poller.complete(requests, receipt)

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
