"""The per-worker hook for plain PyTorch loops: count steps, check for requests, save and report on
every rank, resume.

Runs inside each Ray Train worker (one object per rank, in the training thread). Ray itself is one
adapter (:mod:`ray_dyncheck._backends.ray`) behind the small :class:`Backend` contract, so the same hook runs
in a plain ``torch.distributed`` world without Ray (:class:`LocalBackend`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import torch

from ._backends.base import Backend, require
from ._backends.local import LocalBackend
from ._core import Plan, WorkerCore
from ._core.agree import Agreement, Decision
from ._pipeline import SavePipeline
from ._resume import Restorer
from ._snapshots import MemorySnapshots
from ._state import (
    CheckpointInfo,
    Stateful,
    unwrap_model,
)
from ._state.sharded import check_supported
from .config import DynamicCheckpointConfig, load_config
from .vocab import Kind, Reason

__all__ = ["Backend", "DynamicCheckpoint", "LocalBackend"]

logger = logging.getLogger(__name__)


class DynamicCheckpoint:
    """On-demand checkpoints for one worker of a Ray Train ``TorchTrainer``.

    Create one on **every** rank, at the same point of the training function (after the process
    group exists and the model is prepared), then call :meth:`restore` once and :meth:`step` once per
    optimizer step, on every rank. When someone touches ``<run dir>/dyncheck.save`` or writes a
    request, every rank saves one checkpoint at the next check and calls ``ray.train.report`` the
    same number of times (ranks other than 0 pass ``checkpoint=None``); training goes on.

    Example (inside ``train_loop_per_worker``)::

        with rdc.DynamicCheckpoint(config["dynamic_checkpoint"], model=model, optimizer=opt,
                                   lr_scheduler=sched) as dc:
            dc.restore()
            while dc.global_step < config["steps"]:
                loss = train_step(dc.global_step)
                dc.step(metrics={"loss": loss})
                if dc.should_stop:
                    break

    Args:
        config: The ``dynamic_checkpoint`` block (dict, YAML path or config), ``None`` for defaults.
        model: The model, possibly wrapped in DDP; its unwrapped weights are saved.
        optimizer: Saved in ``full`` checkpoints.
        lr_scheduler: Saved in every checkpoint.
        extra_state: Named objects with ``state_dict()``/``load_state_dict()`` saved per rank
            (e.g. a data loader position). Their state must load with ``torch.load(weights_only=True)``.
        backend: Where to report; default: Ray Train (this must run inside a Ray Train worker).
    """

    def __init__(
        self,
        config: DynamicCheckpointConfig | Mapping[str, Any] | str | None = None,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        extra_state: Mapping[str, Stateful] | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = load_config(config)
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.extra_state = dict(extra_state or {})
        for name, obj in self.extra_state.items():
            if not isinstance(obj, Stateful):
                raise ValueError(f"extra_state[{name!r}] must have state_dict() and load_state_dict(), "
                                 f"got {type(obj).__name__}")
        if backend is None:
            from ._backends.ray import RayBackend

            backend = RayBackend()
        self.backend = require(backend)
        self.rank, self.world_size = backend.rank, backend.world_size
        check_supported(unwrap_model(model))
        self._step = 0
        self.should_stop = False
        self._save_steps = self.config.save_steps
        self._snapshots: MemorySnapshots | None = None
        self._core = WorkerCore(self.config, backend)  # collective: every rank constructs it here
        try:
            self._pipeline = SavePipeline(self._core, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                          extra_state=self.extra_state)  # collective too
        except BaseException:
            self._core.close(clean=False)  # its poller and side group
            raise
        if self.config.snapshots_on:
            try:
                self._snapshots = self._memory_snapshots()  # collective: every rank agrees whether they run
            except BaseException:
                self.close(clean=False)
                raise

    def _memory_snapshots(self) -> MemorySnapshots:
        store = None
        try:
            store = self.backend.memory()
        except Exception:
            logger.exception("dyncheck: rank %d could not find the memory holders", self.rank)
        storage = self.backend.storage()
        return MemorySnapshots(self.config.memory_snapshots, self._core.agreement, store, model=self.model,
                               optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, extra_state=self.extra_state,
                               run=storage[1] if storage is not None else "", metrics=self._core.metrics,
                               buffers=self._pipeline.buffers)

    @property
    def memory_snapshot_step(self) -> int | None:
        """Rank 0: the step of the newest complete memory snapshot this worker made or resumed from (``None``:
        none, or ``memory_snapshots`` is off or has no holders)."""
        return self._snapshots.newest_step if self._snapshots is not None else None

    @property
    def memory_snapshot_interval(self) -> int | None:
        """Steps between memory snapshots now (``auto``: what rank 0 chose last); ``None`` when none are taken."""
        return self._snapshots.interval if self._snapshots is not None and self._snapshots.active else None

    @property
    def saves(self) -> list[dict[str, Any]]:
        """Rank 0: one entry per save (step, kind, reason, requests, name, path once stored)."""
        return self._core.saves

    @property
    def global_step(self) -> int:
        """Optimizer steps done (set by :meth:`restore`, counted by :meth:`step`). Setting it (every rank,
        the same value: training resumes after that step from state of your own) moves the next check to
        the next multiple of ``check_interval`` after it."""
        return self._step

    @global_step.setter
    def global_step(self, step: int) -> None:
        self._step = int(step)
        self._core.start_at(self._step)
        if self._snapshots is not None:
            self._snapshots.start_at(self._step)

    @property
    def check_interval(self) -> int:
        """Steps between checks now: ``check_interval``, or what ``auto`` agreed on last."""
        return self._core.current_interval

    @property
    def reads_requests(self) -> bool:
        """Whether this rank reads the run's triggers and requests (world rank 0 alone, when enabled and
        the run has a directory)."""
        return self._core.poller is not None

    @property
    def pending_requests(self) -> int:
        """Rank 0: requests claimed and not yet served by a save (0 on other ranks)."""
        return self._core.poller.pending_count() if self._core.poller is not None else 0

    @property
    def in_flight(self) -> bool:
        """This rank has a save whose files are not yet written and stored (``save_mode: async``)."""
        return self._core.in_flight

    @property
    def last_blocked_s(self) -> float:
        """Seconds the newest save blocked training on this rank."""
        return self._pipeline.last_blocked_s

    def wait_stored(self) -> None:
        """Until this rank's newest save is written and stored (bounded: it logs an error and returns
        after ``commit_timeout_s`` plus a minute, or half of ``collective_timeout_s``)."""
        self._core.wait_stored()

    def __enter__(self) -> DynamicCheckpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Left by an exception: the claims stay for a restarted worker group (or for rdc.fit).
        self.close(clean=exc_type is None)

    def close(self, timeout: float | None = None, *, clean: bool = True) -> None:
        """Wait until this rank's checkpoints are stored and their receipts final, then stop the poller.

        ``clean`` (the loop ended normally): requests still pending or claimed get an ``unserved``
        receipt; the ``with`` block passes ``clean=False`` when it is left by an exception. Every path
        ends our threads (the poller, the commit and writer threads, a :class:`LocalBackend`'s store
        thread: it starts again if the backend is used again) and our gloo side groups.
        """
        try:
            self._core.close(timeout, clean=clean)
        finally:
            try:
                self._pipeline.close(clean=clean)
                if self._snapshots is not None:
                    self._snapshots.close()
            finally:
                self.backend.close(timeout=0.0)  # its stores were waited for above (LocalBackend's thread ends)

    # -- resume ------------------------------------------------------------------------------------

    def restore(self, timeout_s: float = 1800.0) -> CheckpointInfo | None:
        """Load the run's newest checkpoint into the model, optimizer, scheduler, RNG and
        ``extra_state``, and set :attr:`global_step`. Call on every rank, before training.

        Rank 0 chooses the checkpoint (the newest complete one written by ray_dyncheck, checked in
        storage without downloading it) and every rank loads that one. Returns ``None`` (state
        untouched) when the run has no checkpoint, or when the newest one was not written by
        ray_dyncheck. ``timeout_s`` bounds how long a rank waits for the others (their download
        included), on a side group made for this call.

        Raises:
            CheckpointRestoreError: on every rank, with the same message, when any rank failed.
        """
        restorer = Restorer(self.backend, self._snapshots, model=self.model, optimizer=self.optimizer,
                            lr_scheduler=self.lr_scheduler, extra_state=self.extra_state)
        agreement = Agreement(timeout_s=timeout_s)  # collective: every rank is here
        try:
            found = restorer.restore(agreement)
        finally:
            agreement.close()
        return None if found is None else self._resumed(*found)

    def _resumed(self, info: CheckpointInfo, source: str) -> CheckpointInfo:
        self.global_step = info.step  # the next check follows it
        if self.rank == 0:
            self._core.metrics.restored(source)
            logger.info("dyncheck: resumed from %s checkpoint at step %d (%s)", info.kind, info.step, info.path)
            if info.kind == "weights" and self.optimizer is not None:
                logger.warning("dyncheck: optimizer state starts fresh: the interrupt saved weights "
                               "only; use on_interrupt: full for an exact resume")
        return info

    # -- the per-step call -------------------------------------------------------------------------

    def step(self, metrics: Mapping[str, Any] | None = None) -> Decision | None:
        """Count one step; at check steps agree on a decision; save and report when asked.

        Call on every rank after each optimizer step. ``metrics`` (numbers or 1-element tensors) are
        attached to a checkpoint only when one is saved, so CUDA tensors cost no sync otherwise.
        Returns the agreed decision at a check step, else ``None``.
        """
        t_enter = time.perf_counter()
        self._step += 1
        step = self._step
        scheduled = self._save_steps is not None and step % self._save_steps == 0
        if not scheduled and self._core.tick(step, t_enter):
            if self._snapshots is not None:
                self._snapshots.step(step)  # at its own agreed steps; every rank
            return None  # most steps: no check due, no schedule
        plan = self._core.check(step, schedule=scheduled)
        snapshot = self._snapshot(step, plan)
        if plan is not None and plan.save:
            self._pipeline.save(plan, metrics, snapshot)
        if plan is not None and plan.stop:
            self.should_stop = True
        self._core.end_step()
        return None if plan is None else plan.decision

    def _snapshot(self, step: int, plan: Plan | None) -> Future[dict[str, bytes]] | None:
        """Every rank: the memory snapshot due at ``step``; a full save at this step takes one too (every rank
        knows the agreed plan alike) and writes its files instead of copying the state again (rank 0)."""
        if self._snapshots is None:
            return None
        return self._snapshots.step(step, force=plan is not None and plan.save and plan.kind == Kind.FULL)

    def save(self, kind: str = "full", metrics: Mapping[str, Any] | None = None) -> None:
        """Save and report a checkpoint now. Every rank must call it at the same step."""
        if kind not in (Kind.FULL, Kind.WEIGHTS):
            raise ValueError(f"kind must be 'full' or 'weights', got {kind!r}")
        self._core.wait_stored()  # every rank is here, so each may wait for its last save
        plan = self._core.plan(self._step, kind, Reason.MANUAL)
        self._pipeline.save(plan, metrics, self._snapshot(self._step, plan))
