"""Memory snapshots on every rank: at agreed steps, rank 0 copies the training state into host memory
and hands it to a :class:`~.store.MemoryStore` (its own node's holder and one on another node) in the
background; every rank adds its small state (RNG, ``extra_state``) through one gather.

The plain layout only: a DDP (or single-process) model is whole on rank 0, so rank 0's set is the
snapshot. Steps are agreed: a fixed ``memory_snapshots: N`` is known to every rank; with ``auto`` rank
0 picks the next interval at each snapshot and sends it to every rank in one broadcast.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import torch

from ._backends.metrics import Metrics
from ._core.agree import Agreement
from ._pipeline import gather_rank_states
from ._state import Stateful, capture_state, unwrap_model
from ._state.memory import Held, MemoryStore, snapshot_files
from ._state.sharded import is_sharded
from ._state.snapshot import KeptBuffers, on_cuda

__all__ = ["MemorySnapshots"]

logger = logging.getLogger(__name__)

AUTO_FIRST = 10
"""With ``auto``: steps to the first snapshot (then what the measured cost allows)."""
AUTO_BUDGET = 0.01
"""With ``auto``: the share of training time snapshots may cost (blocked time and the background
serialisation, counted as if it slowed training one for one)."""
AUTO_MAX = 100_000


class MemorySnapshots:
    """Construct on every rank at the same point (one broadcast: rank 0 says whether snapshots run), call
    :meth:`step` after every optimizer step on every rank, and :meth:`start_at` at a resume.

    Threads: the training thread calls :meth:`step`, :meth:`start_at` and :meth:`close`; rank 0's snapshot
    thread (``dyncheck-snapshot``, a daemon: a hung holder never holds up the process's exit) serialises one
    captured state and puts it into the store, then gives its host buffers back. ``_busy``, ``_newest`` and
    ``_cost_s`` are guarded by ``_lock``; one snapshot is in flight at a time (a due step that finds one
    still in flight is skipped on rank 0 alone: the gather still runs on every rank).
    """

    def __init__(self, setting: int | str, agreement: Agreement, store: MemoryStore | None, *,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, lr_scheduler: Any | None,
                 extra_state: Mapping[str, Stateful], run: str, metrics: Metrics | None = None,
                 buffers: KeptBuffers | None = None) -> None:
        self.agreement, self.store = agreement, store
        self.rank, self.world_size = agreement.rank, agreement.world_size
        self.model, self.optimizer, self.lr_scheduler, self.extra_state = model, optimizer, lr_scheduler, extra_state
        self.run = run
        self.auto = setting == "auto"
        self.interval = AUTO_FIRST if self.auto else int(setting)
        self.metrics = metrics if metrics is not None else Metrics()
        why: str | None = None
        if self.rank == 0:
            if store is None:
                why = ("no memory holders serve this run: start it with rdc.fit(trainer), whose driver owns them "
                       "(a plain trainer.fit() resumes from storage only)")
            elif is_sharded(unwrap_model(model)):
                why = "the model is sharded (FSDP2): memory snapshots hold the plain layout, so it resumes from storage"
        why = agreement.broadcast(why)  # type: ignore[assignment]  # collective: every rank agrees whether snapshots run
        self.active = why is None
        if self.rank == 0:
            if self.active:
                logger.info("dyncheck: memory snapshots every %s steps, %d cop%s each", "auto" if self.auto
                            else self.interval, store.copies if store else 0,
                            "y" if store and store.copies == 1 else "ies")
            else:
                logger.warning("dyncheck: memory_snapshots=%s is off for this run: %s", setting, why)
        self._next = self.interval
        self._start = 0
        # The save pipeline's (on a GPU: one set of pinned buffers for both; a lease taken by one makes the other
        # copy into fresh buffers meanwhile).
        self._buffers = buffers if buffers is not None else KeptBuffers(on_cuda)
        self._lock = threading.Lock()
        self._busy = False
        self._newest: int | None = None
        """Rank 0: the step of the newest complete snapshot; guarded by ``_lock``."""
        self._cost_s = 0.0
        """Rank 0: seconds the newest snapshot cost (blocked + background); guarded by ``_lock``."""
        self._t_last: tuple[int, float] | None = None
        self._last: tuple[int, Future[dict[str, bytes]]] | None = None
        """Rank 0, training thread: the step of the newest snapshot handed over, and its files."""
        self.taken = 0
        """Rank 0: snapshots held; guarded by ``_lock``."""
        self.skipped = 0

    @property
    def newest_step(self) -> int | None:
        """Rank 0: the step of the newest complete snapshot this process made or resumed from (``None``: none)."""
        with self._lock:
            return self._newest

    def resumed_from(self, step: int) -> None:
        """The run resumed from this process's store's snapshot of ``step``: it is the newest complete one."""
        with self._lock:
            self._newest = step

    def start_at(self, step: int) -> None:
        """Training (re)starts after ``step``: the next snapshot is an interval later (every rank alike)."""
        self._next = step + self.interval
        self._start = step
        self._t_last = None

    def step(self, step: int, *, force: bool = False) -> Future[dict[str, bytes]] | None:
        """Every rank, after each optimizer step: at a due step (or with ``force``, which every rank passes
        alike: a full save at this step), take a snapshot. Rank 0 gets the future of its files (set once
        serialised, before they go to the holders: a save of this step writes them); ``None`` elsewhere,
        and when none was taken."""
        if not (self.active and (force or step >= self._next)):
            return None
        t0 = time.perf_counter()
        states, error = gather_rank_states(self.agreement, self.extra_state, f"the step-{step} snapshot")
        interval = self.interval
        files: Future[dict[str, bytes]] | None = None
        if self.rank == 0 and self._last is not None and self._last[0] == step:
            files = self._last[1]  # taken at this step already (a save() after step()): the same state
        elif self.rank == 0:
            assert states is not None
            newest = self.newest_step
            self.metrics.snapshot_age(step - (newest if newest is not None else self._start))
            files = self._hand_over(step, states, error)
            if files is not None:  # a skipped one keeps the interval: its cost is not known yet
                self._last = (step, files)
                interval = self._next_interval(step, time.perf_counter() - t0)
        if self.auto:
            interval = int(self.agreement.broadcast(interval))  # type: ignore[call-overload]
        self.interval = interval
        self._next = step + interval
        return files

    def _hand_over(self, step: int, states: list[Any], error: str | None) -> Future[dict[str, bytes]] | None:
        if error is not None:
            logger.error("dyncheck: no memory snapshot at step %d: %s", step, error)
            return None
        with self._lock:
            if self._busy:
                self.skipped += 1
                log = logger.warning if self.skipped == 1 else logger.debug
                log("dyncheck: memory snapshot at step %d skipped: the previous one is still being handed to the "
                    "holders (a crash may lose up to two intervals; %s)", step,
                    "auto lengthens it" if self.auto else "raise memory_snapshots, or set it to auto")
                return None
            self._busy = True
        copier = self._buffers.lease()
        try:
            captured = capture_state(self.model, self.optimizer, self.lr_scheduler, kind="full", step=step,
                                     copier=copier, sharded=False)
        except Exception:
            copier.release()
            with self._lock:
                self._busy = False
            logger.exception("dyncheck: rank 0 could not copy its state for the step-%d snapshot", step)
            return None
        serialised: Future[dict[str, bytes]] = Future()

        def ship() -> None:
            t = time.perf_counter()
            held: Mapping[str, int] | None = None
            try:
                try:
                    files = snapshot_files(captured, states)
                except BaseException as exc:
                    serialised.set_exception(exc)
                    raise
                serialised.set_result(files)  # bytes: immutable, safe to share with the save's writer
                captured.tensors.clear()
                copier.release()
                meta = {"world_size": self.world_size, "kind": "full", "run": self.run,
                        "bytes": sum(len(b) for b in files.values())}
                assert self.store is not None
                holders = self.store.put(step, meta, files)
                del files
                held = self.store.held_bytes()
                logger.debug("dyncheck: memory snapshot of step %d held on %s", step, ", ".join(holders))
            except Exception as exc:
                logger.error("dyncheck: memory snapshot at step %d not held (%s: %s); the previous one stays",
                             step, type(exc).__name__, exc)
            finally:
                copier.release()
                with self._lock:  # one section: an older hand-over never overwrites a newer one's result
                    self._busy = False
                    self._cost_s += time.perf_counter() - t
                    if held is not None:
                        self._newest = step
                        self.taken += 1
            if held is not None:
                self.metrics.snapshot_held(held)

        try:
            threading.Thread(target=ship, name="dyncheck-snapshot", daemon=True).start()
        except Exception:  # no thread: nothing handed over (the caller still joins every collective)
            logger.exception("dyncheck: could not start the step-%d snapshot's thread", step)
            copier.release()
            with self._lock:
                self._busy = False
            return None
        return serialised

    def _next_interval(self, step: int, blocked_s: float) -> int:
        """Rank 0: the interval to the next snapshot (``auto``: within :data:`AUTO_BUDGET` of training time)."""
        if not self.auto:
            return self.interval
        now = time.perf_counter()
        last, self._t_last = self._t_last, (step, now)
        with self._lock:
            background, self._cost_s = self._cost_s, 0.0
        if last is None or step <= last[0]:
            return self.interval
        step_s = max(1e-6, (now - last[1] - blocked_s) / (step - last[0]))
        cost = blocked_s + background
        return max(1, min(AUTO_MAX, math.ceil(cost / (AUTO_BUDGET * step_s))))

    def newest(self) -> Held | None:
        """Rank 0, at a restore: the newest complete set the store has for this run and world size."""
        if self.store is None:
            return None
        held = self.store.newest()
        if held is None:
            return None
        if held.meta.get("run") != self.run:
            logger.warning("dyncheck: a memory snapshot held for another run (%s) is not used", held.meta.get("run"))
            return None
        if held.meta.get("world_size") != self.world_size:
            logger.warning("dyncheck: the memory snapshot of step %d was taken at world size %s, now %d: resuming "
                           "from storage (memory does not reshard)", held.step, held.meta.get("world_size"),
                           self.world_size)
            return None
        return held

    def close(self) -> None:
        """Training thread: drop the kept buffers (a snapshot in flight keeps its own until it ends)."""
        self._buffers.clear()
