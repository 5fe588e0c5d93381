"""What every per-worker adapter shares: when to check, the one agreed decision, and reporting a
checkpoint on every rank with its receipts.

:class:`~ray_dyncheck.DynamicCheckpoint` (plain PyTorch loops) and ``DynamicCheckpointCallback``
(Hugging Face ``Trainer``) differ only in who writes a checkpoint's files; both drive one
:class:`WorkerCore` per rank, in the training thread.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, ContextManager, Protocol

import pyarrow.fs as pafs
import torch

from ._channel import Request, RequestChannel
from ._files import bounded
from ._logs import console
from ._metrics import Metrics
from ._poller import RequestPoller
from ._preempt import Notice, PreemptionPlan
from ._receipts import Receipts
from .agree import Agreement, AutoInterval, Decision
from .config import DynamicCheckpointConfig
from .errors import CheckpointRestoreError
from .state import FORMAT_VERSION

__all__ = ["Backend", "OnDone", "WorkerCore"]

logger = logging.getLogger(__name__)

OnDone = Callable[[str | None, BaseException | None], None]


class Backend(Protocol):
    """Where checkpoints go and come from. :mod:`ray_dyncheck._ray` implements it for Ray Train,
    :class:`~ray_dyncheck.LocalBackend` for plain ``torch.distributed``."""

    rank: int
    world_size: int
    merges_rank_dirs: bool
    """``True`` when the directories every rank reports are merged into one checkpoint."""

    def storage(self) -> tuple[pafs.FileSystem, str] | None:
        """The run directory's filesystem and path, or ``None`` when there is none."""

    def prepare(self, directory: str, metadata: dict[str, Any]) -> None:
        """Rank 0, before :meth:`report`: attach ``metadata`` to the checkpoint in ``directory``.
        May raise: the caller then reports without a checkpoint."""

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone, written: Future[Any] | None = None) -> None:
        """Called on every rank, the same number of times; ``directory`` is ``None`` on ranks with
        nothing to write. ``written``, when given, completes once the files in ``directory`` are
        written (a background save; it raises if they could not be): store them only then, never
        by waiting in the training thread. ``on_done(path, error)`` runs once, when that rank's files
        are stored or finally failed to be."""

    def committed(self, path: str, timeout: float) -> bool:
        """Rank 0, in a background thread, after ``on_done(path, None)``: whether the checkpoint is
        registered (a new run would resume from it)."""

    def checkpoints(self) -> Iterator[str]:
        """The run's committed checkpoints, newest first (paths on the run's storage)."""

    def open(self, path: str) -> ContextManager[str]:
        """One checkpoint as a local directory (downloaded first when remote)."""

    # Optional (looked up with getattr): ``metrics`` (a :class:`~ray_dyncheck._metrics.Metrics`, on
    # rank 0), ``preemption()`` (rank 0, at each check: the drain notice for this run, or ``None``;
    # cheap: no I/O, no collective) and ``node_local(path)`` (whether a local path is on this node only).


def iso_time(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc).isoformat()


def _plain(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    # Only called when saving: .item() on a CUDA tensor synchronises, so never on a plain step.
    return {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
            for k, v in (metrics or {}).items()}


def chosen_by_rank0(agreement: Agreement, choose: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Every rank: the checkpoint rank 0's ``choose()`` picked (``None``: none). An error there
    becomes the same :class:`~ray_dyncheck.errors.CheckpointRestoreError` on every rank."""
    choice: Any = None
    if agreement.rank == 0:
        try:
            choice = choose()
        except Exception as exc:
            logger.exception("dyncheck: could not list the run's checkpoints")
            choice = {"error": f"rank 0 could not list the checkpoints: {type(exc).__name__}: {exc}"}
    choice = agreement.broadcast(choice)  # every rank: the same checkpoint, or none
    if isinstance(choice, dict) and "error" in choice:
        raise CheckpointRestoreError(choice["error"])
    return choice


def fail_together(agreement: Agreement, error: str | None, path: str) -> None:
    """Every rank, after trying to load ``path``: when any rank has an ``error``, every rank raises the
    same :class:`~ray_dyncheck.errors.CheckpointRestoreError`, so no rank trains on alone."""
    errors = [e for e in agreement.all_gather(error) if e is not None]
    if errors:
        raise CheckpointRestoreError(f"resuming from {path} failed on {len(errors)} rank(s): "
                                     f"{'; '.join(str(e) for e in errors)}. No rank resumed; fix the cause, "
                                     "or move that checkpoint aside to resume from an older one")


def decide(requests: Sequence[Request], interval: int) -> Decision:
    """Rank 0's decision for the requests claimed since the last check."""
    if not requests:
        return Decision(next_interval=interval)
    kinds = {r.kind for r in requests}
    kind = "full" if "full" in kinds else "weights" if "weights" in kinds else None
    sources = {r.source for r in requests}
    reason = "interrupt" if "interrupt" in sources else "trigger" if "trigger" in sources else "request"
    return Decision(save=kind is not None, kind=kind, stop=any(r.stop for r in requests),
                    next_interval=interval, reason=reason)


class WorkerCore:
    """One per rank. Construct it on every rank at the same point: it creates the gloo side group.

    Per optimizer step, every rank calls :meth:`check`, then (when the agreed decision, or a
    schedule, says so) writes its files and calls :meth:`report`, then :meth:`finish`.
    """

    def __init__(self, config: DynamicCheckpointConfig, backend: Backend,
                 saves: list[dict[str, Any]] | None = None) -> None:
        self.config = config
        self.backend = backend
        self.rank, self.world_size = backend.rank, backend.world_size
        console(self.rank)
        self.saves: list[dict[str, Any]] = saves if saves is not None else []
        """Rank 0: one entry per save (step, kind, reason, requests, name, path once stored)."""
        # Collective: every rank constructs it here.
        self.agreement = Agreement(timeout_s=config.collective_timeout_s)
        # About half a poll interval at least between checks (a check between two polls carries nothing new).
        self._auto = AutoInterval(config.max_check_overhead, min_period_s=config.poll_interval_s / 2) \
            if config.auto_interval else None
        self.interval = 1
        self._logged_interval = 0
        self._next_check = self._first_check_after(0)
        """The next check step (every rank): a multiple of ``check_interval``, or as ``auto`` agreed."""
        self._train_s = 0.0
        self._steps_since_check = 0
        self._check_s = 0.0
        """Rank 0: how long the last check took (its whole call)."""
        self._tick_s = 0.0
        """Our own time in the ordinary steps since the last check (measured inside tick/check)."""
        self._t_exit: float | None = None
        self._announced = False
        self.last_step = 0
        self._receipts = Receipts(self)
        self.last_kind: str | None = None
        """The kind of the newest save (every rank): what a save still in flight holds."""
        self._saves = 0
        metrics = getattr(backend, "metrics", None)
        self.metrics: Metrics = metrics if isinstance(metrics, Metrics) else Metrics()
        self._preemption = PreemptionPlan(config.on_preemption)
        self._notice_logged: Notice | None = None
        self._notice_broken = False
        self._committed_step = 0
        """Rank 0: the step of the newest committed checkpoint (or where training resumed)."""
        # Checkpoint names are the same on every rank (each rank may store its own files into it).
        self._token = str(self.agreement.broadcast(secrets.token_hex(3)))
        self.poller: RequestPoller | None = None
        self.channel: RequestChannel | None = None
        if config.enabled and self.rank == 0:
            self._start_poller()
        self._watch = self._auto is None and self.poller is not None
        """Rank 0 with a fixed interval: say when a waiting request will be seen."""
        self._timed = self._auto is not None and self.rank == 0
        """Rank 0 with ``auto``: the step and check times choose the interval."""

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
        node_local = getattr(self.backend, "node_local", None)
        trigger = self.config.trigger_file_path
        if "://" not in trigger and os.path.isabs(trigger) and node_local is not None:
            # Off the training thread: it asks Ray for the nodes and reads the mount table.
            threading.Thread(target=_warn_node_local, args=(node_local, trigger), name="dyncheck-trigger-check",
                             daemon=True).start()
        logger.info("dyncheck: watching %s and %s/.dyncheck/requests/ (check_interval=%s)",
                    self.channel.trigger.path, run_dir, self.config.check_interval)

    @property
    def current_interval(self) -> int:
        """Steps between checks now (every rank)."""
        return self.interval if self._auto is not None else int(self.config.check_interval)

    @property
    def in_flight(self) -> bool:
        """This rank has a save whose files are not yet written and stored (its host copy is held)."""
        return self._receipts.storing > 0

    def wait_stored(self) -> None:
        """Before a save that was not agreed at a check (a schedule, ``save()``): let this rank's
        previous save be stored, so at most one is in flight. Every rank saves, so none waits alone."""
        # Bounded well inside collective_timeout_s: the other ranks may be waiting in our next collective.
        timeout = min(self.config.commit_timeout_s + 60.0, self.config.collective_timeout_s / 2)
        if self.in_flight and not self._receipts.wait_stored(timeout):
            logger.error("dyncheck: the previous save is still being stored after %.0f s (half of "
                         "collective_timeout_s); saving again anyway: check the storage", timeout)

    def start_at(self, step: int) -> None:
        """Training (re)starts after ``step`` (a resume): the next check is the next step (``auto``) or
        the next multiple of ``check_interval``."""
        self._next_check = self._first_check_after(step)
        self.last_step = step
        self._committed_step = step

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
        if not self._receipts.wait(timeout):
            logger.error("dyncheck: %d checkpoint(s) not yet stored and registered after %.0f s; their "
                         "receipts are left unwritten", self._receipts.busy, timeout)
        if self.poller is not None:
            unserved = (self.last_step, f"training ended at step {self.last_step} before a check served "
                        "it") if clean else None
            self.poller.close(max(1.0, deadline - time.monotonic()), unserved=unserved)
            self.poller = None
        self._receipts.stop()
        self.agreement.close()

    # -- the per-step check --------------------------------------------------------------------

    def tick(self, step: int, t_enter: float | None = None) -> bool:
        """The common step, as cheap as it can be: when no check is due (and no waiting request is to
        be announced) count it and return ``True``; else ``False``, and :meth:`check` must run.
        ``t_enter``: when the caller's own per-step work began (its time counts as ours, not training)."""
        if step >= self._next_check or (self._watch and not self._announced and self.poller is not None
                                        and self.poller.has_pending()):
            return False
        self._steps_since_check += 1
        self.last_step = step
        if not self._timed:  # only rank 0 with ``auto`` needs the times
            return True
        t = time.perf_counter() if t_enter is None else t_enter
        if self._t_exit is not None:
            self._train_s += t - self._t_exit
        self._t_exit = time.perf_counter()
        self._tick_s += self._t_exit - t
        return True

    def check(self, step: int) -> tuple[Decision | None, list[Request]]:
        """Every rank, once per optimizer step, with the number of the step just finished.

        At check steps all ranks agree on one decision (one collective); otherwise returns
        ``(None, [])`` at the cost of a counter.
        """
        t_enter = time.perf_counter()
        self.last_step = step
        if self._t_exit is not None:
            self._train_s += t_enter - self._t_exit
        self._steps_since_check += 1
        if step >= self._next_check:
            self._announced = False
            return self._check(step, t_enter)
        # Every other step: a few counters (this path runs at every step; keep it short).
        if self._watch and not self._announced and self.poller is not None and self.poller.has_pending():
            self._announced = True  # a fixed interval can be long: say when the request will be seen
            logger.warning("dyncheck: a request is waiting; the next check is in %d step(s) (check_interval=%s)",
                           self._next_check - step, self.config.check_interval)
        self._tick_s += time.perf_counter() - t_enter
        return None, []

    def finish(self, decision: Decision | None, requests: Sequence[Request], step: int, *, saved: bool) -> bool:
        """After the step's save (if any): answer a stop that saved nothing; ``True`` to stop."""
        if decision is not None and decision.stop and not saved and requests and self.poller:
            # A stop without a save (on_interrupt: none) still answers its requests.
            self.poller.complete(requests, {"status": "ok", "kind": None, "step": step,
                                            "reason": decision.reason, "checkpoint": None})
        stop = decision is not None and decision.stop
        if stop and self.rank == 0:
            logger.warning("dyncheck: stop requested: leaving the training loop at step %d", step)
        self.end_step()
        return stop

    def end_step(self) -> None:
        """Our own work ends here; time from now to the next :meth:`check` is training."""
        self._t_exit = time.perf_counter()

    def _first_check_after(self, step: int) -> float:
        if not self.config.enabled:
            return math.inf
        if self._auto is None:
            n = int(self.config.check_interval)
            return (step // n + 1) * n
        return step + 1

    def _check(self, step: int, t_enter: float) -> tuple[Decision, list[Request]]:
        requests: list[Request] = []
        notice: Notice | None = None
        busy = self.in_flight
        local = Decision(next_interval=self.interval, busy=busy)
        if self.rank == 0:
            try:
                if self._auto is not None and self._train_s > 0:
                    steps = self._steps_since_check
                    self.interval = self._auto.observe(self._train_s / steps, self._check_s,
                                                       self._tick_s / max(1, steps - 1))
                requests = self.poller.take() if self.poller is not None else []
                local = replace(decide(requests, self.interval), busy=busy)
                notice = self._preemption.pending(self._notice())
                if notice is not None:
                    local, requests = self._for_preemption(local, requests, notice, step)
            except Exception:  # never skip the collective below: log, and decide "no request"
                logger.exception("dyncheck: rank 0 could not make a decision at step %d", step)
                local = Decision(next_interval=self.interval, busy=busy)
                if requests and self.poller is not None:
                    self.poller.requeue(requests)  # not lost: decided on at the next check
                requests, notice = [], None
        agreed = self.agreement.agree(local)
        if agreed.save and agreed.busy:
            agreed, requests = self._defer(agreed, requests, step)
            if notice is not None and self.last_kind in ("full", local.kind) and self.saves:
                logger.warning("dyncheck: step %d: the %s save in flight (step %d) answers the preemption notice",
                               step, self.last_kind, self.saves[-1]["step"])
                self._preemption.served(notice, self.saves[-1]["step"])
        elif notice is not None and agreed.save:
            self._preemption.served(notice, step)
        if agreed.save and requests and self.poller is not None:
            # Count the attempt before the save starts, so a save that kills the workers (out of
            # memory) is not retried after every restart. Bounded: a slow store only delays it.
            t_marks = time.perf_counter()
            self.poller.begin(requests).wait(2.0)
            t_enter += time.perf_counter() - t_marks  # the save's bookkeeping, not the check's cost
        if self._auto is not None:
            if self.rank == 0 and self._logged_interval != agreed.next_interval and self._auto.step_s:
                self._logged_interval = agreed.next_interval
                logger.info("dyncheck: check interval now %d steps (step %.2f ms, check %.3f ms, "
                            "limit %.2f%% of step time)", agreed.next_interval,
                            (self._auto.step_s or 0) * 1e3, (self._auto.check_s or 0) * 1e3,
                            self.config.max_check_overhead * 100)
            self.interval = agreed.next_interval
            self._next_check = step + agreed.next_interval
        else:
            self._next_check = self._first_check_after(step)
        if self.rank == 0:
            self._gauges()
        self._check_s = time.perf_counter() - t_enter
        self._tick_s = 0.0
        self._train_s, self._steps_since_check = 0.0, 0
        return agreed, requests

    def _notice(self) -> Notice | None:
        """Rank 0: the backend's preemption notice; a backend that cannot say turns the feature off
        (logged once), never the requests."""
        read = getattr(self.backend, "preemption", None)
        if read is None or self._notice_broken:
            return None
        try:
            return read()
        except Exception:
            self._notice_broken = True
            logger.exception("dyncheck: cannot read Ray's preemption notice; saving on preemption is off")
            return None

    def _for_preemption(self, local: Decision, requests: list[Request], notice: Notice,
                        step: int) -> tuple[Decision, list[Request]]:
        """Rank 0: fold a preemption notice into this check's decision (a save; never a stop)."""
        kind, why = self._preemption.choose(notice)
        if self._notice_logged != notice:
            self._notice_logged = notice
            self.metrics.request("preemption")
            logger.warning("dyncheck: step %d: Ray reports node(s) %s (ranks %s) preempted in %.0f s: a %s "
                           "save now (%s)", step, ", ".join(n[:8] for n in notice.nodes) or "?",
                           list(notice.ranks), self._preemption.left_s(notice), kind, why)
        reason = local.reason if local.save and local.reason == "interrupt" else "preemption"
        if local.save and local.stop:  # a stop (the interrupt) keeps its own kind: it has its own deadline
            return replace(local, reason=reason), requests
        if local.kind == "full" and kind == "weights" and self.poller is not None:
            # A full save would not commit before the deadline: weights now, the requests after it.
            logger.info("dyncheck: step %d: %s wait(s) for the next check", step, ", ".join(r.id for r in requests))
            self.poller.requeue(requests)
            return replace(local, save=True, kind="weights", stop=False, reason="preemption"), []
        return replace(local, save=True, kind="full" if "full" in (local.kind, kind) else kind, reason=reason), requests

    def _defer(self, agreed: Decision, requests: list[Request], step: int) -> tuple[Decision, list[Request]]:
        """A save is still in flight on some rank (every rank knows, from the one collective): start no
        second one. A stop whose kind that save holds (full covers weights) is answered by it and stops
        now; anything else waits for the first check after it is stored."""
        covered = agreed.stop and (self.last_kind == "full" or self.last_kind == agreed.kind)
        if self.rank == 0 and requests and self.poller is not None:
            if covered:
                logger.warning("dyncheck: step %d: the %s save in flight answers %s", step, self.last_kind,
                               ", ".join(r.id for r in requests))
                self._receipts.attach(requests)
            else:
                logger.info("dyncheck: step %d: a save is still in flight; %s wait(s) for the next check",
                            step, ", ".join(r.id for r in requests))
                self.poller.requeue(requests)
        return replace(agreed, save=False, kind=None, stop=covered), []

    # -- reporting -----------------------------------------------------------------------------

    def report(
        self,
        *,
        step: int,
        kind: str,
        reason: str,
        requests: Sequence[Request],
        directory: str | None,
        error: str | None,
        metrics: Mapping[str, Any] | None,
        t0: float,
        written: Future[Any] | None = None,
    ) -> None:
        """Every rank, the same number of times: report this rank's ``directory`` (or ``None``).

        ``error`` (on any rank) means this rank could not write its part: when any rank has one, every
        rank reports without a checkpoint (half a checkpoint is never reported) and the requests get
        an error receipt. ``t0`` is when the save began. If the backend's report itself raises (Ray
        failing), the requests get an error receipt, ``directory`` is removed (after its write) and
        the error propagates: Ray fails the worker group and its ``FailureConfig`` decides.
        """
        t_written = time.perf_counter()
        # Unique per report (a resumed run can save the same step again), the same on every rank.
        self._saves += 1
        self.last_kind = kind
        name = f"checkpoint_{step:08d}_{kind}_{self._token}{self._saves}"
        ids = [r.id for r in requests]
        metadata = {"format_version": FORMAT_VERSION, "kind": kind, "step": step, "reason": reason,
                    "request_id": ids[0] if ids else None, "request_ids": ids, "time": iso_time(),
                    "world_size": self.world_size}
        if self.rank == 0 and directory is not None and error is None:
            try:
                self.backend.prepare(directory, metadata)
            except Exception as exc:
                logger.exception("dyncheck: could not attach metadata to the checkpoint at step %d", step)
                error = f"rank 0: metadata: {type(exc).__name__}: {exc}"
        if self.backend.merges_rank_dirs and self.agreement.any_rank(error is not None):
            # Every rank: the others' shares must not be merged into a checkpoint rank 0 dropped.
            error = error or "another rank could not write its part (see its log)"
        if error is not None and directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
            directory = None
        record = {"step": step, "kind": kind, "reason": reason, "requests": ids, "name": name,
                  "path": None, "error": error}
        if self.rank == 0:
            self.saves.append(record)
        report_metrics = {**_plain(metrics), "step": step, "dyncheck_kind": kind, "dyncheck_reason": reason}
        on_done = self._receipts.expect(record, list(requests), t0) if directory is not None else _ignore
        try:
            self.backend.report(report_metrics, directory, name=name, metadata=metadata, on_done=on_done,
                                written=written)
        except BaseException as exc:
            on_done(None, exc)  # settles it: its requests get an error receipt (once)
            if directory is not None:  # never handed over: ours to remove, once its write (if any) ends
                dropped = directory
                if written is None:
                    shutil.rmtree(dropped, ignore_errors=True)
                else:
                    written.add_done_callback(lambda _: shutil.rmtree(dropped, ignore_errors=True))
            if directory is None:
                self.abandon(requests, step, kind, reason, f"report failed: {type(exc).__name__}: {exc}")
            raise
        if self.rank != 0:
            return
        if error is not None:
            self.abandon(requests, step, kind, reason, error)
        elif directory is None and requests:
            # Rank 0 had nothing to store (the torch hook always has): nothing will answer them.
            self.abandon(requests, step, kind, reason, "rank 0 stored no files for this checkpoint")
        else:
            blocked = time.perf_counter() - t0
            self.metrics.blocked(kind, blocked)
            logger.info("dyncheck: %s checkpoint at step %d (%s%s): training blocked %.3f s; %s", kind, step,
                        reason, f", requests {', '.join(ids)}" if ids else "", blocked,
                        "writing and storing in the background" if written is not None and not written.done()
                        else f"written in {t_written - t0:.2f} s, storing")

    def abandon(self, requests: Sequence[Request], step: int, kind: str, reason: str, why: str) -> None:
        """Rank 0: a save that stored no checkpoint is logged, and its requests get an error receipt
        (never dropped silently)."""
        if self.rank != 0:
            return
        logger.error("dyncheck: no checkpoint at step %d (%s): %s", step, reason, why)
        try:
            self.settled({"step": step, "kind": kind, "reason": reason}, requests, None)
        except Exception:  # metrics never cost a receipt
            logger.exception("dyncheck: could not record the failed save at step %d", step)
        if requests and self.poller is not None:
            self.poller.complete(requests, {"status": "error", "step": step, "kind": kind,
                                            "reason": reason, "error": why})

    def settled(self, record: dict[str, Any], requests: Sequence[Request], path: str | None) -> None:
        """Rank 0, once per save, when it is committed (``path``) or failed: metrics and measurements."""
        kind, reason = record["kind"], record["reason"]
        if path is None:
            self.metrics.failed(kind, reason)
            self._preemption.failed(int(record["step"]))  # if it answered a notice: the next check tries again
            return
        commit_s = record.get("commit_s")
        if isinstance(commit_s, float):
            self._preemption.observe_commit(kind, commit_s)
        claimed = [r.claimed_at for r in requests if r.claimed_at]
        since = time.monotonic() - min(claimed) if claimed else commit_s
        if isinstance(since, float):
            self.metrics.committed(kind, reason, since)
        record["committed_at"] = time.time()
        self._committed_step = max(self._committed_step, int(record["step"]))
        self._gauges()  # work at risk drops now, not at the next check

    def _gauges(self) -> None:
        """Rank 0: pending requests, the check interval, steps since the newest commit."""
        interval = self.interval if self._auto is not None else int(self.config.check_interval)
        self.metrics.check(self.poller.pending_count() if self.poller is not None else 0, interval,
                           max(0, self.last_step - self._committed_step))

    def uri(self, path: str | None) -> str | None:
        if path is None or self.channel is None:
            return path
        scheme = self.channel.fs.type_name
        return path if scheme == "local" else f"{scheme}://{path}"


def _warn_node_local(node_local: Callable[[str], bool], trigger: str) -> None:
    try:
        if node_local(trigger):
            logger.warning("dyncheck: trigger_file_path %s is on this node's disk only: after a restart rank 0 "
                           "may run on another node and never see it. Put it on storage every node shares (a "
                           "URI, an NFS path), or leave it relative to the run directory", trigger)
    except Exception:
        logger.debug("dyncheck: could not tell whether %s is node-local", trigger, exc_info=True)


def _ignore(path: str | None, exc: BaseException | None) -> None:
    return None
