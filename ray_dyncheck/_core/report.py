"""Reporting one save on every rank (the same number of times), and rank 0's bookkeeping once it is
committed or failed: the save's record, metrics, the preemption plan's measurements."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any

import torch

from .._backends.base import Backend
from .._backends.metrics import Metrics
from .._requests.request import Request
from .._state import FORMAT_VERSION
from ..vocab import Kind, Reason, Status
from .agree import Agreement
from .decision import Plan
from .preempt import PreemptionPlan
from .receipts import Receipts

__all__ = ["Reporter", "iso_time"]

logger = logging.getLogger(__name__)


def iso_time(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc).isoformat()


def _plain(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    # Only called when saving: .item() on a CUDA tensor synchronises, so never on a plain step.
    return {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
            for k, v in (metrics or {}).items()}


class Reporter:
    """One per rank: names each save (the same on every rank), reports it through the backend, and on
    rank 0 keeps one record per save in ``saves`` and settles it (metrics, work at risk).

    ``answer(requests, receipt)`` writes receipts (rank 0); ``gauges()`` refreshes the gauges.
    """

    def __init__(self, backend: Backend, agreement: Agreement, receipts: Receipts, *, token: str,
                 metrics: Metrics, preemption: PreemptionPlan, saves: list[dict[str, Any]],
                 answer: Callable[[Sequence[Request], dict[str, Any]], None], gauges: Callable[[], None]) -> None:
        self.backend, self.agreement, self.receipts = backend, agreement, receipts
        self.rank, self.world_size = backend.rank, backend.world_size
        self.metrics, self.preemption, self.saves = metrics, preemption, saves
        self._token = token
        self._answer = answer
        self._gauges = gauges
        self._count = 0
        self.last_kind: Kind | None = None
        """The kind of the newest save (every rank): what a save still in flight holds."""
        self.committed_step = 0
        """Rank 0: the step of the newest committed checkpoint (or where training resumed)."""

    def report(self, plan: Plan, directory: str | None, metrics: Mapping[str, Any] | None, *,
               error: str | None = None, t0: float | None = None, written: Future[Any] | None = None) -> None:
        """Every rank, the same number of times: report this rank's ``directory`` (or ``None``) for
        ``plan``. See :meth:`WorkerCore.report`."""
        assert plan.kind is not None, "report() of a plan that saves nothing"
        self.last_kind = Kind(plan.kind)
        # Plain strings in everything that leaves the core (metadata, metrics, records).
        step, kind, reason, requests = plan.step, self.last_kind.value, _plain_word(plan.reason), plan.requests
        t0 = plan.t0 if t0 is None else t0
        t_written = time.perf_counter()
        # Unique per report (a resumed run can save the same step again), the same on every rank.
        self._count += 1
        name = f"checkpoint_{step:08d}_{kind}_{self._token}{self._count}"
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
        if self.backend.merges_rank_dirs:
            # Every rank: the others' shares must not be merged into a checkpoint rank 0 dropped.
            error = self.agreement.shared_error(error, "write its part")
        if error is not None and directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
            directory = None
        record = {"step": step, "kind": kind, "reason": reason, "requests": ids, "name": name,
                  "path": None, "error": error}
        if self.rank == 0:
            self.saves.append(record)
        report_metrics = {**_plain(metrics), "step": step, "dyncheck_kind": kind, "dyncheck_reason": reason}
        on_done = self.receipts.expect(record, list(requests), t0) if directory is not None else _ignore
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
                self.abandon(plan, f"report failed: {type(exc).__name__}: {exc}")
            raise
        if self.rank != 0:
            return
        if error is not None:
            self.abandon(plan, error)
        elif directory is None and requests:
            # Rank 0 had nothing to store (the torch hook always has): nothing will answer them.
            self.abandon(plan, "rank 0 stored no files for this checkpoint")
        else:
            blocked = time.perf_counter() - t0
            self.metrics.blocked(kind, blocked)
            logger.info("dyncheck: %s checkpoint at step %d (%s%s): training blocked %.3f s; %s", kind, step,
                        reason, f", requests {', '.join(ids)}" if ids else "", blocked,
                        "writing and storing in the background" if written is not None and not written.done()
                        else f"written in {t_written - t0:.2f} s, storing")

    def abandon(self, plan: Plan, why: str) -> None:
        """Rank 0: a save that stored no checkpoint is logged, and its requests get an error receipt
        (never dropped silently)."""
        if self.rank != 0:
            return
        logger.error("dyncheck: no checkpoint at step %d (%s): %s", plan.step, plan.reason, why)
        try:
            self.settled({"step": plan.step, "kind": _plain_word(plan.kind), "reason": _plain_word(plan.reason)},
                         plan.requests, None)
        except Exception:  # metrics never cost a receipt
            logger.exception("dyncheck: could not record the failed save at step %d", plan.step)
        if plan.requests:
            self._answer(plan.requests, {"status": Status.ERROR, "step": plan.step, "kind": _plain_word(plan.kind),
                                         "reason": _plain_word(plan.reason), "error": why})

    def settled(self, record: dict[str, Any], requests: Sequence[Request], path: str | None) -> None:
        """Rank 0, once per save, when it is committed (``path``) or failed: metrics and measurements."""
        kind, reason = record["kind"], record["reason"]
        if path is None:
            self.metrics.failed(kind, reason)
            self.preemption.failed(int(record["step"]))  # if it answered a notice: the next check tries again
            return
        commit_s = record.get("commit_s")
        if isinstance(commit_s, float):
            self.preemption.observe_commit(kind, commit_s)
        claimed = [r.claimed_at for r in requests if r.claimed_at]
        since = time.monotonic() - min(claimed) if claimed else commit_s
        if isinstance(since, float):
            self.metrics.committed(kind, reason, since)
        record["committed_at"] = time.time()
        self.committed_step = max(self.committed_step, int(record["step"]))
        self._gauges()  # work at risk drops now, not at the next check


def _plain_word(word: Kind | Reason | str | None) -> str | None:
    return None if word is None else str(word)


def _ignore(path: str | None, exc: BaseException | None) -> None:
    return None
