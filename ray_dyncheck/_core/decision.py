"""What every rank does at a check: rank 0 decides from the requests it claimed (and a preemption
notice), one collective delivers it, and a save still in flight defers or answers it.

The result is a :class:`Plan`: the one place a save's kind and reason are decided. Adapters read
``plan.kind`` and write their framework's state for it; the requests it answers stay inside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .._backends.base import Notice
from .._requests.poller import RequestPoller
from .._requests.request import Request
from ..vocab import Kind, Reason, Source
from .agree import Agreement, Decision
from .preempt import PreemptionPlan

__all__ = ["Decider", "Plan", "decide"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What every rank does at this step: save a ``kind`` checkpoint (``None``: no save) for ``reason``,
    and/or ``stop``. The same on every rank; only rank 0's carries the requests it answers."""

    step: int
    kind: Kind | None
    reason: Reason
    stop: bool = False
    decision: Decision | None = None
    """The agreed decision of the check that made it (``None``: a save no check agreed on)."""
    t0: float = field(default_factory=time.perf_counter)
    """When it was decided (``time.perf_counter()``): the request-to-commit time starts here."""
    requests: tuple[Request, ...] = field(default=(), repr=False)
    """Rank 0: the claimed requests this save answers."""

    @property
    def save(self) -> bool:
        return self.kind is not None

    def at_least(self, kind: Kind) -> Plan:
        """This plan, saving at least ``kind`` (a schedule's full save at the same step covers it)."""
        return replace(self, kind=Kind.widest(self.kind, kind))

    def at_step(self, step: int) -> Plan:
        """This plan, carried out at ``step`` (a framework that saved later than asked)."""
        return replace(self, step=step)

    def joined(self, later: Plan) -> Plan:
        """One save for this plan (not yet carried out) and a later one: the wider kind, every request,
        the rest as the later one says."""
        return replace(later, kind=Kind.widest(self.kind, later.kind), requests=self.requests + later.requests)


def decide(requests: Sequence[Request], interval: int) -> Decision:
    """Rank 0's decision for the requests claimed since the last check."""
    if not requests:
        return Decision(next_interval=interval)
    kind = Kind.widest(*(r.kind for r in requests))
    sources = {r.source for r in requests}
    reason = Reason.INTERRUPT if Source.INTERRUPT in sources else Reason.TRIGGER if Source.TRIGGER in sources \
        else Reason.REQUEST
    return Decision(save=kind is not None, kind=kind, stop=any(r.stop for r in requests),
                    next_interval=interval, reason=reason)


class Decider:
    """One per rank: the decision at each check.

    Rank 0 takes the claimed requests from ``poller()``, reads the backend's preemption ``notice``
    (``read_notice``), and folds both into its local decision; :meth:`decide` delivers it to every
    rank and applies what only the collective can tell (a save in flight on some rank).
    ``count_request`` counts a preemption notice as a request (metrics); ``attach`` lets the save in
    flight answer requests too; ``last`` says the kind and step of the newest save (every rank).
    """

    def __init__(self, agreement: Agreement, plan: PreemptionPlan, *, poller: Callable[[], RequestPoller | None],
                 read_notice: Callable[[], Notice | None], count_request: Callable[[str], None],
                 attach: Callable[[list[Request]], None], last: Callable[[], tuple[Kind | None, int | None]]) -> None:
        self.agreement = agreement
        self.rank = agreement.rank
        self.preemption = plan
        self._poller = poller
        self._read_notice = read_notice
        self._count_request = count_request
        self._attach = attach
        self._last = last
        self._notice_logged: Notice | None = None
        self._notice_broken = False

    @property
    def poller(self) -> RequestPoller | None:
        """Rank 0's poller while it runs (``None`` elsewhere, and once closed)."""
        return self._poller()

    def decide(self, step: int, interval: int, busy: bool) -> tuple[Decision, list[Request], float]:
        """Every rank at a check step: ``(agreed decision, rank 0's requests for it, seconds spent on
        bookkeeping that is the save's, not the check's)``."""
        requests: list[Request] = []
        notice: Notice | None = None
        local = Decision(next_interval=interval, busy=busy)
        if self.rank == 0:
            try:
                requests = self.poller.take() if self.poller is not None else []
                local = replace(decide(requests, interval), busy=busy)
                notice = self.preemption.pending(self._notice())
                if notice is not None:
                    local, requests = self._for_preemption(local, requests, notice, step)
            except Exception:  # never skip the collective below: log, and decide "no request"
                logger.exception("dyncheck: rank 0 could not make a decision at step %d", step)
                local = Decision(next_interval=interval, busy=busy)
                if requests and self.poller is not None:
                    self.poller.requeue(requests)  # not lost: decided on at the next check
                requests, notice = [], None
        agreed = self.agreement.agree(local)
        last_kind, last_step = self._last()
        if agreed.save and agreed.busy:
            agreed, requests = self._defer(agreed, requests, step, last_kind)
            if notice is not None and last_kind in (Kind.FULL, local.kind) and last_step is not None:
                logger.warning("dyncheck: step %d: the %s save in flight (step %d) answers the preemption notice",
                               step, last_kind, last_step)
                self.preemption.served(notice, last_step)
        elif notice is not None and agreed.save:
            self.preemption.served(notice, step)
        marks_s = 0.0
        if agreed.save and requests and self.poller is not None:
            # Count the attempt before the save starts, so a save that kills the workers (out of
            # memory) is not retried after every restart. Bounded: a slow store only delays it.
            t_marks = time.perf_counter()
            self.poller.begin(requests).wait(2.0)
            marks_s = time.perf_counter() - t_marks
        return agreed, requests, marks_s

    def _notice(self) -> Notice | None:
        """Rank 0: the backend's preemption notice; a backend that cannot say turns the feature off
        (logged once), never the requests."""
        if self._notice_broken:
            return None
        try:
            return self._read_notice()
        except Exception:
            self._notice_broken = True
            logger.exception("dyncheck: cannot read Ray's preemption notice; saving on preemption is off")
            return None

    def _for_preemption(self, local: Decision, requests: list[Request], notice: Notice,
                        step: int) -> tuple[Decision, list[Request]]:
        """Rank 0: fold a preemption notice into this check's decision (a save; never a stop)."""
        kind, why = self.preemption.choose(notice)
        if self._notice_logged != notice:
            self._notice_logged = notice
            self._count_request(Source.PREEMPTION)
            logger.warning("dyncheck: step %d: Ray reports node(s) %s (ranks %s) preempted in %.0f s: a %s "
                           "save now (%s)", step, ", ".join(n[:8] for n in notice.nodes) or "?",
                           list(notice.ranks), self.preemption.left_s(notice), kind, why)
        reason = local.reason if local.save and local.reason == Reason.INTERRUPT else Reason.PREEMPTION
        if local.save and local.stop:  # a stop (the interrupt) keeps its own kind: it has its own deadline
            return replace(local, reason=reason), requests
        if local.kind == Kind.FULL and kind == Kind.WEIGHTS and self.poller is not None:
            # A full save would not commit before the deadline: weights now, the requests after it.
            logger.info("dyncheck: step %d: %s wait(s) for the next check", step, ", ".join(r.id for r in requests))
            self.poller.requeue(requests)
            return replace(local, save=True, kind=Kind.WEIGHTS, stop=False, reason=Reason.PREEMPTION), []
        return replace(local, save=True, kind=Kind.widest(local.kind, kind), reason=reason), requests

    def _defer(self, agreed: Decision, requests: list[Request], step: int,
               last_kind: Kind | None) -> tuple[Decision, list[Request]]:
        """A save is still in flight on some rank (every rank knows, from the one collective): start no
        second one. A stop whose kind that save holds (full covers weights) is answered by it and stops
        now; anything else waits for the first check after it is stored."""
        covered = agreed.stop and last_kind is not None and last_kind.covers(agreed.kind)
        if self.rank == 0 and requests and self.poller is not None:
            if covered:
                logger.warning("dyncheck: step %d: the %s save in flight answers %s", step, last_kind,
                               ", ".join(r.id for r in requests))
                self._attach(requests)
            else:
                logger.info("dyncheck: step %d: a save is still in flight; %s wait(s) for the next check",
                            step, ", ".join(r.id for r in requests))
                self.poller.requeue(requests)
        return replace(agreed, save=False, kind=None, stop=covered), []
