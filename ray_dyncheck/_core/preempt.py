"""Preemption notices (a node of this run is draining, with a deadline), folded into the one decision.

Ray's preemption watcher marks every worker of the group when a node that hosts one of them drains
(``PreemptionInfo``: a deadline and the ranks on that node); Ray restarts the group at the deadline
plus ``FailureConfig.preemption_grace_s``. Rank 0 reads its own worker's copy at each check (an
attribute read, no round trip; ``ray.train.get_preemption_info()`` itself is a collective through an
actor) and, for a notice not yet served, saves at that check with ``reason: preemption``: full when the
last full save's measured time to commit fits before the deadline with room to spare, else
weights-only. Training goes on; the restarted group resumes from it. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import threading
import time

from .._backends.base import Notice

__all__ = ["PreemptionPlan"]

logger = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 120.0
"""Ray's restart delay when a drain reports no deadline (``DEFAULT_PREEMPTION_DEADLINE_S``)."""
SAFETY = 1.5
"""A full save is chosen when ``SAFETY x`` its measured time to commit, plus ``MARGIN_S``, fits."""
MARGIN_S = 5.0
UNMEASURED_FULL_S = 60.0
"""Before any save was measured: full when at least this many seconds are left."""


class PreemptionPlan:
    """Rank 0: which notices are new, and which kind of save fits before their deadline.

    Threads: the training thread calls :meth:`pending`, :meth:`choose`, :meth:`left_s` and
    :meth:`served`; the commit/upload thread calls :meth:`failed` and :meth:`observe_commit`. All
    state is guarded by ``_lock``.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        """``auto``, ``full``, ``weights`` or ``none`` (``on_preemption``)."""
        self.commit_s: dict[str, float] = {}
        """The newest measured seconds from decision to commit, per kind."""
        self._served: Notice | None = None
        self._served_by: int | None = None
        """The step of the save that answers the served notice."""
        self._seen_at: dict[Notice, float] = {}
        self._lock = threading.Lock()
        """Guards ``commit_s``, ``_served``, ``_served_by`` and ``_seen_at`` (two threads, above)."""

    def observe_commit(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.commit_s[kind] = seconds

    def pending(self, notice: Notice | None) -> Notice | None:
        """``notice`` when a save should start for it now (new, and saving on preemption is on)."""
        if notice is None or self.mode == "none":
            return None
        with self._lock:
            if notice == self._served:
                return None
            self._seen_at.setdefault(notice, time.time())
        return notice

    def left_s(self, notice: Notice, now: float | None = None) -> float:
        """Seconds until Ray restarts the group (without its grace period)."""
        now = time.time() if now is None else now
        deadline = notice.deadline
        if deadline is None:
            with self._lock:
                deadline = self._seen_at.get(notice, now) + DEFAULT_DEADLINE_S
        return deadline - now

    def choose(self, notice: Notice, now: float | None = None) -> tuple[str, str]:
        """``(kind, why)`` for a save that starts now."""
        if self.mode in ("full", "weights"):
            return self.mode, f"on_preemption: {self.mode}"
        left = self.left_s(notice, now)
        with self._lock:
            full_s, weights_s = self.commit_s.get("full"), self.commit_s.get("weights")
        basis = "the last full save committed in"
        if full_s is None and weights_s is not None:
            # Model + two optimizer moments (Adam): about three times the weights.
            full_s, basis = 3 * weights_s, "estimated from the last weights save:"
        if full_s is None:
            kind = "full" if left >= UNMEASURED_FULL_S else "weights"
            return kind, f"no save measured yet; {left:.0f} s left"
        kind = "full" if SAFETY * full_s + MARGIN_S <= left else "weights"
        return kind, f"{basis} {full_s:.1f} s; {left:.0f} s left"

    def served(self, notice: Notice, by_step: int) -> None:
        """The save of step ``by_step`` answers ``notice`` (one starting now, or one in flight)."""
        with self._lock:
            self._served, self._served_by = notice, by_step

    def failed(self, step: int) -> None:
        """The save of ``step`` committed nothing: if it was to answer the newest notice, the next check
        tries again."""
        with self._lock:
            if self._served is not None and self._served_by == step:
                self._served = self._served_by = None
