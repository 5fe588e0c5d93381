"""The worker core: the one contract every per-worker adapter stands on.

Per optimizer step, every rank calls ``plan = core.check(step)`` (``None``: nothing to do at this step);
when ``plan.save``, it writes its framework's state for ``plan.kind`` and calls ``core.report(plan,
directory, metrics)``; when ``plan.stop``, it leaves the training loop; then ``core.end_step()``. A save
no check agreed on (a schedule, an explicit ``save()``) gets its plan from :meth:`WorkerCore.plan`.
Requests stay inside the core: adapters hand plans back, never requests.

:class:`WorkerCore` coordinates parts with one job each: :class:`~.cadence.Cadence` (when to check),
:class:`~.decision.Decider` (the agreed decision), :class:`~.report.Reporter` (every rank's report, rank
0's records), :class:`~.receipts.Receipts` (rank 0's final answers) and the backend's metrics.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from .._backends.base import Backend, require
from .._backends.metrics import Metrics
from .._logs import console
from .._requests.channel import RequestChannel
from .._requests.files import bounded
from .._requests.poller import RequestPoller
from .._requests.request import Request
from ..config import DynamicCheckpointConfig
from ..vocab import Kind, Reason, Status
from .agree import Agreement
from .cadence import Cadence
from .decision import Decider, Plan
from .preempt import PreemptionPlan
from .receipts import Receipts
from .report import Reporter

__all__ = ["WorkerCore"]

logger = logging.getLogger(__name__)


class WorkerCore:
    """One per rank. Construct it on every rank at the same point: it creates the gloo side group."""

    def __init__(self, config: DynamicCheckpointConfig, backend: Backend,
                 saves: list[dict[str, Any]] | None = None) -> None:
        self.config = config
        self.backend = require(backend)  # before anything with a side effect (the side group below)
        self.rank, self.world_size = backend.rank, backend.world_size
        console(self.rank)
        self.saves: list[dict[str, Any]] = saves if saves is not None else []
        """Rank 0: one entry per save (step, kind, reason, requests, name, path once stored)."""
        self.agreement = Agreement(timeout_s=config.collective_timeout_s)  # collective: every rank is here
        self.metrics: Metrics = backend.metrics if backend.metrics is not None else Metrics()
        self.poller: RequestPoller | None = None
        self.channel: RequestChannel | None = None
        if config.enabled and self.rank == 0:
            self._start_poller()
        poller = self.poller
        self.cadence = Cadence(config, timed=self.rank == 0,
                               waiting=None if poller is None else lambda: self.poller is not None
                               and self.poller.has_pending())
        self.receipts = Receipts(rank=self.rank, confirm=self._confirm, answer=self._answer, settled=self._settled,
                                 uri=self.uri, last_step=lambda: self.cadence.last_step)
        preemption = PreemptionPlan(config.on_preemption)
        # Checkpoint names are the same on every rank (each rank may store its own files into it).
        token = str(self.agreement.broadcast(secrets.token_hex(3)))
        self.reporter = Reporter(backend, self.agreement, self.receipts, token=token, metrics=self.metrics,
                                 preemption=preemption, saves=self.saves,
                                 answer=lambda requests, receipt: self._answer(list(requests), receipt, False),
                                 gauges=self._gauges)
        self.decider = Decider(self.agreement, preemption, poller=lambda: self.poller,
                               read_notice=lambda: self.backend.preemption(),
                               count_request=self.metrics.request, attach=self.receipts.attach,
                               last=self._last_save)

    def _start_poller(self) -> None:
        storage = self.backend.storage()
        if storage is None:
            logger.warning("dyncheck: no run directory (Ray Train local mode?): triggers and requests "
                           "are off; scheduled saves and resume still work")
            return
        fs, run_dir = storage
        # Our own copy of Ray's filesystem (same options), with bounded retries and timeouts: a
        # request of the poller gives up in seconds through an outage instead of minutes.
        self.channel = RequestChannel(bounded(fs), run_dir, self.config.trigger_file_path,
                                      max_attempts=self.config.max_save_attempts)
        self.poller = RequestPoller(self.channel, self.config.poll_interval_s,
                                    on_claim=lambda r: self.metrics.request(r.source)).start()
        trigger = self.config.trigger_file_path
        if "://" not in trigger and os.path.isabs(trigger):
            # Off the training thread: it asks Ray for the nodes and reads the mount table.
            threading.Thread(target=_warn_node_local, args=(self.backend.node_local, trigger),
                             name="dyncheck-trigger-check", daemon=True).start()
        logger.info("dyncheck: watching %s and %s/.dyncheck/requests/ (check_interval=%s)",
                    self.channel.trigger.path, run_dir, self.config.check_interval)

    # -- the contract ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        """This rank has a save whose files are not yet written and stored (its host copy is held)."""
        return self.receipts.storing > 0

    @property
    def current_interval(self) -> int:
        """Steps between checks now (every rank)."""
        return self.cadence.current

    @property
    def last_step(self) -> int:
        return self.cadence.last_step

    def tick(self, step: int, t_enter: float | None = None) -> bool:
        """The common step at the cost of a counter: ``True`` when nothing is due; else call :meth:`check`."""
        return self.cadence.tick(step, t_enter)

    def check(self, step: int, *, full_due: bool = False, schedule: bool = False, now: bool = False) -> Plan | None:
        """Every rank, once per optimizer step, with the number of the step just finished: at check steps
        all ranks agree on one plan (one collective); ``None`` on other steps.

        ``full_due``: a full save happens at this step anyway (the framework's own schedule), so an agreed
        save is a full one. ``schedule`` (``save_steps``): the same, and the core plans that full save
        itself when no agreed one covers it, waiting first for this rank's previous save to be stored;
        the requests of a stop without a save are then answered by it. ``now``: check whatever the interval
        says (every rank passes it at the same point: the end of a validation or evaluation loop, where a
        request may have waited longer than a check interval)."""
        due, t_enter = self.cadence.enter(step, now=now and self.config.enabled)
        if not due:
            return self._scheduled(step, None) if schedule else None
        interval = self.cadence.interval
        if self.rank == 0:
            try:
                interval = self.cadence.observe()
            except Exception:  # never skip the collective: keep the interval there is
                logger.exception("dyncheck: could not measure the check interval at step %d", step)
        decision, requests, marks_s = self.decider.decide(step, interval, self.in_flight)
        self.cadence.checked(step, decision.next_interval, rank0=self.rank == 0)
        if self.rank == 0:
            self._gauges()
        self.cadence.measured(t_enter + marks_s)
        full = full_due or schedule
        kind = Kind.widest(decision.kind, Kind.FULL if full else None) if decision.save else None
        plan = Plan(step, kind, decision.reason, decision.stop, decision, requests=tuple(requests))
        if schedule and not plan.save:
            plan = self._scheduled(step, plan)
        elif plan.stop and not plan.save and requests:
            # A stop without a save (on_interrupt: none) still answers its requests.
            self._answer(requests, {"status": Status.OK, "kind": None, "step": step, "reason": decision.reason,
                                    "checkpoint": None}, False)
        if plan.stop and self.rank == 0:
            logger.warning("dyncheck: stop requested: leaving the training loop at step %d", step)
        return plan

    def _scheduled(self, step: int, plan: Plan | None) -> Plan:
        """The schedule's full save at ``step``, no agreed save covering it: at most one save in flight (every
        rank is here, so each may wait for its last one); a check's stop rides along with its requests."""
        self.wait_stored()
        if plan is None:
            return Plan(step, Kind.FULL, Reason.SCHEDULE)
        return replace(plan, kind=Kind.FULL, reason=Reason.SCHEDULE)

    def plan(self, step: int, kind: Kind | str, reason: Reason) -> Plan:
        """A save no check agreed on (a schedule, ``save()``): every rank calls it at the same step."""
        return Plan(step, Kind(kind), reason)

    def report(self, plan: Plan, directory: str | None, metrics: Mapping[str, Any] | None = None, *,
               error: str | None = None, t0: float | None = None, written: Future[Any] | None = None) -> None:
        """Every rank, the same number of times: report this rank's ``directory`` (or ``None``) for ``plan``.

        ``error`` (on any rank) means this rank could not write its part: when any rank has one, every
        rank reports without a checkpoint (half a checkpoint is never reported) and the requests get
        an error receipt. ``t0`` (default: when the plan was made) starts the request-to-commit time.
        ``written``: completes when ``directory``'s files are written (a background save). If the
        backend's report itself raises (Ray failing), the requests get an error receipt,
        ``directory`` is removed (after its write) and the error propagates: Ray fails the worker group
        and its ``FailureConfig`` decides."""
        self.reporter.report(plan, directory, metrics, error=error, t0=t0, written=written)

    def abandon(self, plan: Plan, why: str) -> None:
        """Rank 0: the save of ``plan`` stored nothing (logged; its requests get an error receipt)."""
        self.reporter.abandon(plan, why)

    def end_step(self) -> None:
        """Our own work ends here; time from now to the next step is training."""
        self.cadence.end_step()

    def wait_stored(self) -> None:
        """Before a save that was not agreed at a check (a schedule, ``save()``): let this rank's
        previous save be stored, so at most one is in flight. Every rank saves, so none waits alone."""
        # Bounded well inside collective_timeout_s: the other ranks may be waiting in our next collective.
        timeout = min(self.config.commit_timeout_s + 60.0, self.config.collective_timeout_s / 2)
        if self.in_flight and not self.receipts.wait_stored(timeout):
            logger.error("dyncheck: the previous save is still being stored after %.0f s (half of "
                         "collective_timeout_s); saving again anyway: check the storage", timeout)

    def start_at(self, step: int) -> None:
        """Training (re)starts after ``step`` (a resume): the next check follows it."""
        self.cadence.start_at(step)
        self.reporter.committed_step = step

    def close(self, timeout: float | None = None, *, clean: bool = True) -> None:
        """Wait until this rank's checkpoints are stored and their receipts final, then stop the poller.

        ``clean``: the training loop ended normally, so every request still pending or claimed gets an
        ``unserved`` receipt. After an exception the claims stay, for a restarted worker group.
        ``timeout`` defaults to ``commit_timeout_s`` plus a minute for the receipts themselves; after an
        exception to 10 s (what is unanswered is served by the restarted group: do not hold up the restart).
        """
        if timeout is None:
            timeout = self.config.commit_timeout_s + 60.0 if clean else 10.0
        deadline = time.monotonic() + timeout
        if not self.receipts.wait(timeout):
            logger.error("dyncheck: %d checkpoint(s) not yet stored and registered after %.0f s; their "
                         "receipts are left unwritten", self.receipts.busy, timeout)
        if self.poller is not None:
            step = self.cadence.last_step
            unserved = (step, f"training ended at step {step} before a check served it") if clean else None
            self.poller.close(max(1.0, deadline - time.monotonic()), unserved=unserved)
            self.poller = None
        self.receipts.stop()
        self.agreement.close()

    def uri(self, path: str | None) -> str | None:
        if path is None or self.channel is None:
            return path
        scheme = self.channel.fs.type_name
        return path if scheme == "local" else f"{scheme}://{path}"

    # -- the parts' collaborators ---------------------------------------------------------------

    def _last_save(self) -> tuple[Kind | None, int | None]:
        return self.reporter.last_kind, (self.saves[-1]["step"] if self.saves else None)

    def _confirm(self, path: str) -> tuple[bool, str | None]:
        timeout = self.config.commit_timeout_s
        if self.backend.committed(path, timeout):
            return True, None
        return False, (f"Ray did not register it within {timeout:g} s (or removed it at once: see "
                       "CheckpointConfig(num_to_keep))")

    def _settled(self, record: dict[str, Any], requests: Sequence[Request], path: str | None) -> None:
        self.reporter.settled(record, requests, path)

    def _answer(self, requests: list[Request], receipt: dict[str, Any], now: bool) -> None:
        """Rank 0: final receipts for ``requests``. ``now`` (from the upload thread, which Ray fails right
        after): written at once, unless the poller holds the channel in a hung storage call."""
        poller, channel = self.poller, self.channel
        if poller is None or not requests:
            return
        written: set[str] = set()
        if now and channel is not None and channel.lock.acquire(timeout=5.0):
            try:
                channel.retire(requests, receipt, written)
                return
            except Exception as exc:
                logger.error("dyncheck: could not write receipts now (%s: %s); the poller retries",
                             type(exc).__name__, exc)
            finally:
                channel.lock.release()
        poller.complete(requests, receipt, written)

    def _gauges(self) -> None:
        """Rank 0: pending requests, the check interval, steps since the newest commit."""
        self.metrics.check(self.poller.pending_count() if self.poller is not None else 0, self.cadence.current,
                           max(0, self.cadence.last_step - self.reporter.committed_step))


def _warn_node_local(node_local: Callable[[str], bool], trigger: str) -> None:
    try:
        if node_local(trigger):
            logger.warning("dyncheck: trigger_file_path %s is on this node's disk only: after a restart rank 0 "
                           "may run on another node and never see it. Put it on storage every node shares (a "
                           "URI, an NFS path), or leave it relative to the run directory", trigger)
    except Exception:
        logger.debug("dyncheck: could not tell whether %s is node-local", trigger, exc_info=True)
