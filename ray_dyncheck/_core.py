"""What every per-worker adapter shares: when to check, the one agreed decision, and reporting a
checkpoint on every rank with its receipts.

:class:`~ray_dyncheck.DynamicCheckpoint` (plain PyTorch loops) and ``DynamicCheckpointCallback``
(Hugging Face ``Trainer``) differ only in who writes a checkpoint's files; both drive one
:class:`WorkerCore` per rank, in the training thread.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, ContextManager, Protocol

import pyarrow.fs as pafs
import torch

from .agree import Agreement, AutoInterval, Decision
from .config import DynamicCheckpointConfig
from .requests import Request, RequestChannel, RequestPoller
from .state import FORMAT_VERSION

__all__ = ["Backend", "OnDone", "WorkerCore"]

logger = logging.getLogger(__name__)

OnDone = Callable[[str | None, BaseException | None], None]


class Backend(Protocol):
    """Where checkpoints go and come from. :mod:`ray_dyncheck._ray` implements it for Ray Train."""

    rank: int
    world_size: int
    merges_rank_dirs: bool
    """``True`` when the directories every rank reports are merged into one checkpoint (Ray);
    ``False`` when only rank 0's is stored."""

    def storage(self) -> tuple[pafs.FileSystem, str] | None:
        """The run directory's filesystem and path, or ``None`` when there is none."""

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone) -> None:
        """Called on every rank, the same number of times; ``directory`` is ``None`` on ranks with
        nothing to write. ``on_done(path, error)`` runs once that rank's files are stored."""

    def checkpoints(self) -> Iterator[ContextManager[str]]:
        """The run's checkpoints, newest first, each opened as a local directory."""


def iso_time(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc).isoformat()


def _plain(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    # Only called when saving: .item() on a CUDA tensor synchronises, so never on a plain step.
    return {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
            for k, v in (metrics or {}).items()}


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
        self.saves: list[dict[str, Any]] = saves if saves is not None else []
        """Rank 0: one entry per save (step, kind, reason, requests, name, path once stored)."""
        self.agreement = Agreement()  # collective: every rank constructs it here
        self._auto = AutoInterval(config.max_check_overhead) if config.auto_interval else None
        self.interval = 1
        self._logged_interval = 0
        self._next_check = 1
        self._train_s = 0.0
        self._steps_since_check = 0
        self._last_check_s = 0.0
        self._t_exit: float | None = None
        self._announced = False
        self._uploads = 0
        self._uploads_cv = threading.Condition()
        self.poller: RequestPoller | None = None
        self.channel: RequestChannel | None = None
        if config.enabled and self.rank == 0:
            self._start_poller()

    def _start_poller(self) -> None:
        storage = self.backend.storage()
        if storage is None:
            logger.warning("dyncheck: no run directory (Ray Train local mode?): triggers and requests "
                           "are off; scheduled saves and resume still work")
            return
        fs, run_dir = storage
        self.channel = RequestChannel(fs, run_dir, self.config.trigger_file_path)
        self.poller = RequestPoller(self.channel, self.config.poll_interval_s).start()
        logger.info("dyncheck: watching %s and %s/.dyncheck/requests/ (check_interval=%s)",
                    self.channel.trigger, run_dir, self.config.check_interval)

    def start_at(self, step: int) -> None:
        """Training (re)starts after ``step`` (a resume): the next check is the next step."""
        self._next_check = step + 1

    def close(self, timeout: float = 60.0) -> None:
        """Wait for this rank's checkpoint uploads and receipts, then stop the poller."""
        deadline = time.monotonic() + timeout
        with self._uploads_cv:
            while self._uploads and time.monotonic() < deadline:
                self._uploads_cv.wait(deadline - time.monotonic())
            if self._uploads:
                logger.error("dyncheck: %d checkpoint upload(s) still running after %.0f s",
                             self._uploads, timeout)
        if self.poller is not None:
            self.poller.close(max(1.0, deadline - time.monotonic()))
            self.poller = None

    # -- the per-step check --------------------------------------------------------------------

    def check(self, step: int) -> tuple[Decision | None, list[Request]]:
        """Every rank, once per optimizer step, with the number of the step just finished.

        At check steps all ranks agree on one decision (one collective); otherwise returns
        ``(None, [])`` at the cost of a counter.
        """
        t_enter = time.perf_counter()
        if self._t_exit is not None:
            self._train_s += t_enter - self._t_exit
        self._steps_since_check += 1
        if not self.config.enabled:
            return None, []
        if self._is_check_step(step):
            self._announced = False
            return self._check(step, t_enter)
        if self._auto is None and self.poller is not None and not self._announced and self.poller.has_pending():
            self._announced = True  # a fixed interval can be long: say when the request will be seen
            left = (-step) % int(self.config.check_interval)
            logger.warning("dyncheck: a request is waiting; the next check is in %d step(s) (check_interval=%s)",
                           left, self.config.check_interval)
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

    def _is_check_step(self, step: int) -> bool:
        if self._auto is None:
            return step % int(self.config.check_interval) == 0
        return step >= self._next_check

    def _check(self, step: int, t_enter: float) -> tuple[Decision, list[Request]]:
        requests: list[Request] = []
        local = Decision(next_interval=self.interval)
        if self.rank == 0:
            try:
                if self._auto is not None and self._train_s > 0:
                    self.interval = self._auto.observe(self._train_s / self._steps_since_check,
                                                       self._last_check_s)
                requests = self.poller.take() if self.poller is not None else []
                local = decide(requests, self.interval)
            except Exception:  # never skip the collective below: log, and decide "no request"
                logger.exception("dyncheck: rank 0 could not make a decision at step %d", step)
                local = Decision(next_interval=self.interval)
                if requests and self.poller is not None:
                    self.poller.requeue(requests)  # not lost: decided on at the next check
                requests = []
        agreed = self.agreement.agree(local)
        if self._auto is not None:
            if self.rank == 0 and self._logged_interval != agreed.next_interval and self._auto.step_s:
                self._logged_interval = agreed.next_interval
                logger.info("dyncheck: check interval now %d steps (step %.2f ms, check %.3f ms, "
                            "limit %.2f%% of step time)", agreed.next_interval,
                            (self._auto.step_s or 0) * 1e3, (self._auto.check_s or 0) * 1e3,
                            self.config.max_check_overhead * 100)
            self.interval = agreed.next_interval
            self._next_check = step + agreed.next_interval
        self._last_check_s = time.perf_counter() - t_enter
        self._train_s, self._steps_since_check = 0.0, 0
        return agreed, requests

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
    ) -> None:
        """Every rank, the same number of times: report this rank's ``directory`` (or ``None``).

        ``error`` (rank 0) means the checkpoint could not be written: every rank still reports,
        without a checkpoint, and the requests get an error receipt. ``t0`` is when the save began.
        """
        t_written = time.perf_counter()
        # Unique per report (a resumed run can save the same step again); Ray keeps rank 0's name.
        name = f"checkpoint_{step:08d}_{kind}_{secrets.token_hex(3)}"
        ids = [r.id for r in requests]
        metadata = {"format_version": FORMAT_VERSION, "kind": kind, "step": step, "reason": reason,
                    "request_id": ids[0] if ids else None, "request_ids": ids, "time": iso_time(),
                    "world_size": self.world_size}
        record = {"step": step, "kind": kind, "reason": reason, "requests": ids, "name": name,
                  "path": None, "error": error}
        if self.rank == 0:
            self.saves.append(record)
        report_metrics = {**_plain(metrics), "step": step, "dyncheck_kind": kind, "dyncheck_reason": reason}
        if directory is not None:
            with self._uploads_cv:
                self._uploads += 1
        on_done = self._make_on_done(record, list(requests), metadata, t0)
        self.backend.report(report_metrics, directory, name=name, metadata=metadata, on_done=on_done)
        if self.rank != 0:
            return
        if error is not None:
            self.abandon(requests, step, kind, reason, error)
        else:
            logger.info("dyncheck: %s checkpoint at step %d (%s%s): written in %.2f s, training "
                        "blocked %.2f s; uploading", kind, step, reason,
                        f", requests {', '.join(ids)}" if ids else "", t_written - t0,
                        time.perf_counter() - t0)

    def abandon(self, requests: Sequence[Request], step: int, kind: str, reason: str, why: str) -> None:
        """Rank 0: a save that stored no checkpoint is logged, and its requests get an error receipt
        (never dropped silently)."""
        if self.rank != 0:
            return
        logger.error("dyncheck: no checkpoint at step %d (%s): %s", step, reason, why)
        if requests and self.poller is not None:
            self.poller.complete(requests, {"status": "error", "step": step, "kind": kind,
                                            "reason": reason, "error": why})

    def _make_on_done(self, record: dict[str, Any], requests: list[Request], metadata: dict[str, Any],
                      t0: float) -> OnDone:
        counted = [False]

        def on_done(path: str | None, exc: BaseException | None) -> None:
            # Runs in the upload thread, once this rank's files are stored (or failed). Ray may retry
            # a failed upload: a later success rewrites the receipt.
            try:
                record["path"] = path
                if self.rank != 0:
                    return
                receipt: dict[str, Any] = {"step": metadata["step"], "kind": metadata["kind"],
                                           "reason": metadata["reason"]}
                if exc is None:
                    receipt.update(status="ok", checkpoint=path, checkpoint_uri=self._uri(path))
                    logger.info("dyncheck: checkpoint for step %d stored at %s (%.2f s after the "
                                "decision)", metadata["step"], path, time.perf_counter() - t0)
                else:
                    record["error"] = f"upload failed: {exc}"
                    receipt.update(status="error", error=record["error"])
                if requests and self.channel is not None:
                    try:
                        self.channel.retire(requests, receipt)
                    except Exception:
                        logger.exception("dyncheck: could not write receipts for %s; retrying from the "
                                         "poller", ", ".join(r.id for r in requests))
                        if self.poller is not None:
                            self.poller.complete(requests, receipt)
            finally:
                with self._uploads_cv:
                    if not counted[0]:
                        counted[0] = True
                        self._uploads -= 1
                    self._uploads_cv.notify_all()

        return on_done

    def _uri(self, path: str | None) -> str | None:
        if path is None or self.channel is None:
            return path
        scheme = self.channel.fs.type_name
        return path if scheme == "local" else f"{scheme}://{path}"
