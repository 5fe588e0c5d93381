"""Rank 0's poller: a daemon thread that claims requests and writes receipts, so the training thread
never touches storage for the request channel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ..vocab import Status
from .channel import Request, RequestChannel
from .files import ErrorLog, guard

__all__ = ["RequestPoller"]

logger = logging.getLogger(__name__)


class RequestPoller:
    """Polls the channel every ``interval_s``; writes receipts and attempt marks it is handed.

    The training thread only calls :meth:`take`, :meth:`requeue`, :meth:`begin` and
    :meth:`complete` (no I/O). A storage error is logged (at most once a minute per message) and
    retried at the next poll; it never reaches the training loop, and a queued receipt is never
    dropped. If a filesystem call hangs, :meth:`close` gives up after its timeout and leaves the
    daemon thread behind.
    """

    def __init__(self, channel: RequestChannel, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_claim: Callable[[Request], None] | None = None) -> None:
        self.channel = channel
        self._on_claim = on_claim
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[Request] = []
        self._outbox: list[tuple[str, list[Request], Any]] = []
        self._busy = 0
        self._stopping = False
        self._final: tuple[int, str] | None = None
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

    def pending_count(self) -> int:
        """How many claimed requests wait for the next check (no lock, no I/O: a hint)."""
        return len(self._pending)

    def begin(self, requests: Sequence[Request]) -> threading.Event:
        """A save for these requests starts: record one more attempt for each, in the background.

        The returned event is set once the marks were written (or the write failed); waiting on it
        briefly makes a save that kills the workers count as an attempt.
        """
        done = threading.Event()
        if not requests:
            done.set()
            return done
        with self._wake:
            self._outbox.append(("mark", list(requests), done))
            self._wake.notify_all()
        return done

    def complete(self, requests: Sequence[Request], receipt: dict[str, Any], written: set[str] | None = None) -> None:
        """Queue the final receipt for these requests and their retirement; done on the poller thread.
        ``written``: ids whose receipt is already written (only their claims are left to delete)."""
        if not requests:
            return
        with self._wake:
            self._outbox.append(("retire", list(requests), (dict(receipt), set(written or ()))))
            self._wake.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued receipt is written; ``False`` on timeout."""
        deadline = self._clock() + timeout
        with self._wake:
            self._wake.notify_all()
            while self._outbox or self._busy or self._final is not None:
                left = deadline - self._clock()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._wake.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 10.0, *, unserved: tuple[int, str] | None = None) -> None:
        """Write outstanding receipts, then stop; abandons the thread if storage hangs.

        With ``unserved=(step, why)`` (training ended cleanly) a last poll claims what is new, and every
        request not answered yet gets an ``unserved`` receipt first.
        """
        if not self._thread.is_alive():
            return
        if unserved is not None:
            with self._wake:
                self._final = unserved
                self._wake.notify_all()
        if not self.flush(timeout):
            logger.error("dyncheck: receipts not written within %.0f s (storage slow or unreachable); "
                         "giving up on them", timeout)
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=1.0)

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = 0.0
        retry: list[tuple[str, list[Request], Any]] = []  # failed jobs: tried again at each poll
        while True:
            with self._wake:
                while (not self._stopping and not self._outbox and self._final is None
                       and self._clock() < next_poll):
                    self._wake.wait(max(0.0, next_poll - self._clock()))
                if self._stopping:
                    return
                outbox, self._outbox = self._outbox, []
                final, self._final = self._final, None
                due = self._clock() >= next_poll
                if due:
                    outbox, retry = retry + outbox, []
                self._busy = len(outbox) + len(retry) + (final is not None)
            retry += [job for job in outbox if not self._do(*job)]
            if final is not None:
                retry += self._answer_unserved(*final)
                next_poll = self._clock() + 1e6  # that was the last poll: nothing is claimed after it
            elif due:
                # Polled whatever failed above: a receipt that cannot be written never starves claims.
                self._poll()
                next_poll = self._clock() + self.interval_s
            with self._wake:
                self._busy = len(retry)  # flush() waits for these too: a receipt is never dropped
                self._wake.notify_all()
    def _do(self, what: str, requests: list[Request], arg: Any) -> bool:
        if what == "mark":
            _, ok = guard(self._errors, "record a save attempt", self.channel.run_dir,
                          self.channel.mark_attempt, requests)
            arg.set()  # the save goes on either way; a failed mark is logged
            return True
        receipt, written = arg
        _, ok = guard(self._errors, "write receipts", self.channel.run_dir, self.channel.retire, requests,
                      receipt, written)
        return ok

    def _poll(self) -> None:
        found, _ = guard(self._errors, "read requests", self.channel.run_dir, self.channel.poll)
        self.polls += 1
        if found:
            now = time.monotonic()
            found = [replace(req, claimed_at=now) for req in found]
            for req in found:
                logger.info("dyncheck: request %s (%s, kind=%s, stop=%s) claimed",
                            req.id, req.source, req.kind, req.stop)
                if self._on_claim is not None:
                    try:
                        self._on_claim(req)
                    except Exception:  # a metric never costs a claim
                        logger.debug("dyncheck: on_claim failed", exc_info=True)
            with self._lock:
                self._pending.extend(found)

    def _answer_unserved(self, step: int, why: str) -> list[tuple[str, list[Request], Any]]:
        self._poll()
        left = self.take()
        if not left:
            return []
        logger.warning("dyncheck: training ended at step %d with %d request(s) not served (%s): %s", step,
                       len(left), why, ", ".join(r.id for r in left))
        job: tuple[str, list[Request], Any] = ("retire", left,
                                               ({"status": Status.UNSERVED, "step": step, "error": why}, set()))
        return [] if self._do(*job) else [job]
