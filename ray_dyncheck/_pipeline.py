"""One save of the torch hook, on every rank: copy the state into host memory (the only part that
blocks training with ``save_mode: async``), write it in a background thread, report it at once.

A plain model is written by rank 0 alone (``format_version`` 1). A sharded model (FSDP2) is written by
every rank, its own shard, with ``torch.distributed.checkpoint`` on a gloo group of the writer
threads (collectives there never interleave with the training thread's); rank 0 then writes the
manifest, listing every rank's files. A failure on any rank fails the write on every rank, so half a
checkpoint is never stored as complete. One save is in flight at a time (:class:`WorkerCore`
agrees on it at each check).
"""

from __future__ import annotations

import logging
import pickle
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from ._core import Plan, WorkerCore
from ._core.agree import Agreement
from ._state import (
    SHARDED_FORMAT_VERSION,
    Captured,
    Stateful,
    capture_rank_state,
    capture_state,
    is_hf_model,
    unwrap_model,
    write_files,
    write_manifest,
)
from ._state.memory import write_snapshot
from ._state.sharded import DCP_ERRORS, is_sharded
from ._state.snapshot import HostCopier, Keep, KeptBuffers, on_cuda

__all__ = ["SavePipeline"]

logger = logging.getLogger(__name__)

# Destroying a gloo group is local and quick; longer means it is stuck behind a hung collective.
_GROUP_CLOSE_S = 10.0


@dataclass
class _Write:
    """One save handed to the writer thread."""

    step: int
    directory: str
    captured: Captured
    states: list[Any] | None
    copier: HostCopier
    """Holds this save's host buffers (the kept ones, or fresh): released when its write ends."""
    snapshot: Future[dict[str, bytes]] | None = None
    """Rank 0, when the memory snapshot of this step is the save's content: its files (set once serialised)."""
    future: Future[dict[str, int]] = field(default_factory=Future)
    started: float | None = None
    """When the writer thread began it (``time.monotonic()``); guarded by the pipeline's ``_lock``."""


def gather_rank_states(agreement: Agreement, extra_state: Mapping[str, Stateful],
                       what: str) -> tuple[list[Any] | None, str | None]:
    """Every rank, at the same step: every rank's small state (RNG, ``extra_state``) gathered on rank 0, and rank
    0's joined error when some rank could not capture its own (``None`` elsewhere). A rank that fails still
    joins the gather."""
    try:
        mine: dict[str, Any] = capture_rank_state(extra_state)
        pickle.dumps(mine)  # gather_object pickles before it talks: fail here, not skip it
    except Exception as exc:
        logger.exception("dyncheck: rank %d could not capture its state at %s", agreement.rank, what)
        mine = {"error": f"rank {agreement.rank}: {type(exc).__name__}: {exc}"}
    states = agreement.gather(mine)  # every rank, even after an error
    if states is None:
        return None, None
    errors = [s["error"] for s in states if isinstance(s, dict) and "error" in s]
    return states, "; ".join(errors) or None


class SavePipeline:
    """Construct on every rank at the same point (it creates the writers' gloo group).

    Threads: the training thread calls :meth:`save` and :meth:`close`; it copies the state into host
    buffers it leases from :attr:`buffers` and hands the save to the writer thread. The writer thread
    (``dyncheck-write``, a daemon, so a hung write never holds up the process's exit) runs one save's
    write at a time, in order, touching only that save's directory, host copy and buffers (and the
    writers' group); it gives the buffers back when the write ends. ``_writes`` (saves handed over and
    not finished), ``_closed`` and each save's future and start time are guarded by ``_lock``.

    ``keep`` says which tensors are copied into host buffers kept from one save to the next (default:
    CUDA tensors, pinned); ``write`` writes one rank's files (:func:`~ray_dyncheck._state.capture.write_files`).
    """

    def __init__(self, core: WorkerCore, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 lr_scheduler: Any | None, extra_state: Mapping[str, Stateful], keep: Keep = on_cuda,
                 write: Callable[..., dict[str, int]] = write_files) -> None:
        self.core = core
        self.model, self.optimizer, self.lr_scheduler, self.extra_state = model, optimizer, lr_scheduler, extra_state
        self.rank = core.rank
        self.sharded = is_sharded(unwrap_model(model))
        self.buffers = KeptBuffers(keep)
        self._write_files = write
        # Collective: the writer threads' own group (DCP's plan exchange, every rank's file list).
        self.writers = Agreement(timeout_s=core.config.collective_timeout_s)
        self._lock = threading.Lock()
        self._writes: list[_Write] = []
        self._closed = False
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.last_blocked_s = 0.0
        """Seconds the newest save blocked training on this rank."""

    def save(self, plan: Plan, metrics: Mapping[str, Any] | None,
             snapshot: Future[dict[str, bytes]] | None = None) -> None:
        """Every rank, at the same step: write this rank's state for ``plan.kind`` and report it.

        ``snapshot`` (rank 0, a full plan, the plain layout): the memory snapshot taken at this step; its
        files are written instead of copying the state a second time."""
        t0 = time.perf_counter()
        assert plan.kind is not None, "save() of a plan that saves nothing"
        step, kind = plan.step, plan.kind.value  # a plain str in what is saved
        agreement = self.core.agreement
        states, error = gather_rank_states(agreement, self.extra_state, f"step {step}")
        captured: Captured | None = None
        directory: str | None = None
        copier: HostCopier | None = None
        written: Future[dict[str, int]] | None = None
        job: _Write | None = None
        try:
            if error is None and (self.sharded or self.rank == 0):
                try:
                    directory = tempfile.mkdtemp(prefix=f"dyncheck-{step}-")
                    copier = self.buffers.lease()
                    module = unwrap_model(self.model)
                    if snapshot is not None and not self.sharded and kind == "full" and not is_hf_model(module):
                        # (A Hugging Face model is saved with save_pretrained, config.json included: not these bytes.)
                        captured = Captured(kind=kind, step=step, sharded=False, tensors={}, lr_scheduler=None,
                                            module=module)
                    else:
                        snapshot = None
                        captured = capture_state(self.model, self.optimizer, self.lr_scheduler, kind=kind,
                                                 step=step, copier=copier, sharded=self.sharded)
                except Exception as exc:
                    logger.exception("dyncheck: rank %d could not copy its %s state at step %d", self.rank, kind,
                                     step)
                    error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            # Every rank: nobody starts a write (a collective when sharded) that another rank will not join.
            error = agreement.shared_error(error, "capture its state")
            if error is None and captured is not None and directory is not None and copier is not None:
                job = _Write(step, directory, captured, states, copier, snapshot=snapshot)
                written = self._submit(job)
        finally:
            if written is None:  # never handed to the writer: its buffers are free for the next save
                if copier is not None:
                    copier.release()
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
                    directory = None
        if written is not None and self.core.config.save_mode == "sync":
            timeout = self.core.config.commit_timeout_s
            try:
                written.result(timeout=timeout)  # bounded: a hung disk must not hang training
            except FutureTimeout:
                error = (f"rank {self.rank}: the write did not finish within commit_timeout_s={timeout:g} s "
                         "(storage hung?); raise commit_timeout_s if it is only slow")
                assert job is not None
                # Given up: the writer thread removes its folder if it ever finishes (not this thread,
                # on a disk that may hang), and its host copy goes with it.
                self._settle(job, exc=TimeoutError(error))
                with self._lock:
                    if job.started is None:  # still queued behind a hung write: its host copy goes now
                        job.captured.tensors.clear()
                        job.copier.release()
                directory = None
            except Exception as exc:
                error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            written = None
        self.last_blocked_s = time.perf_counter() - t0
        self.core.report(plan, directory, metrics, error=error, t0=t0, written=written)

    def _submit(self, job: _Write) -> Future[dict[str, int]]:
        with self._lock:
            if self._closed:
                raise RuntimeError("dyncheck: save() after close(): the save pipeline is closed")
            self._writes.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dyncheck-write", daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job.future

    def _run(self) -> None:
        """The writer thread: each save handed over, in turn, until the close's ``None``."""
        while (job := self._queue.get()) is not None:
            try:
                with self._lock:
                    # Given up by close() (its future failed) or cancelled: not written.
                    given_up = job.future.done() and not job.future.cancelled()
                    run = not given_up and job.future.set_running_or_notify_cancel()
                    job.started = time.monotonic()
                if not run:
                    shutil.rmtree(job.directory, ignore_errors=True)
                    continue
                try:
                    settled = self._settle(job, files=self._write(job))
                except BaseException as exc:  # DCP's failures too: whoever waits for the future sees it
                    settled = self._settle(job, exc=exc)
                if not settled:  # given up by close() meanwhile: nobody stores these files
                    shutil.rmtree(job.directory, ignore_errors=True)
            finally:
                job.copier.release()
                with self._lock:
                    self._writes.remove(job)

    def _settle(self, job: _Write, *, files: dict[str, int] | None = None, exc: BaseException | None = None) -> bool:
        """Complete ``job``'s future unless close() has given it up already; ``False`` then."""
        with self._lock:
            if job.future.done():
                return False
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(files or {})
            return True

    def _write(self, job: _Write) -> dict[str, int]:
        """In the writer thread of every rank that captured state. Raises when this checkpoint must not
        be stored (on every rank, for a sharded one)."""
        directory, captured, states = job.directory, job.captured, job.states
        group = self.writers.group if self.sharded else None
        error: str | None = None
        files: dict[str, int] = {}
        try:
            if job.snapshot is not None:  # the snapshot's bytes, the very files a write would make
                files = write_snapshot(job.snapshot.result(timeout=self.core.config.commit_timeout_s), directory)
            else:
                files = self._write_files(directory, captured, rank=self.rank, rank_states=states, group=group)
        except DCP_ERRORS as exc:
            logger.exception("dyncheck: rank %d could not write its files of the step-%d checkpoint", self.rank,
                             captured.step)
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        finally:
            captured.tensors.clear()  # the host copy is no longer needed
            job.copier.release()  # this save's buffers (only): the next save may copy into them
        if self.sharded:
            everyone: list[Any] = self.writers.all_gather((error, files))
            errors = [str(entry[0]) for entry in everyone if entry[0] is not None]
            if errors:
                raise RuntimeError("; ".join(errors))
            if self.rank == 0:
                merged: dict[str, int] = {}
                for entry in everyone:
                    merged.update(entry[1])
                write_manifest(directory, merged, kind=captured.kind, step=captured.step,
                               world_size=self.core.world_size, format_version=SHARDED_FORMAT_VERSION,
                               layout="sharded")
            return files
        if error is not None:
            raise RuntimeError(error)
        return write_manifest(directory, files, kind=captured.kind, step=captured.step,
                              world_size=self.core.world_size)

    def close(self, *, clean: bool = True, timeout: float | None = None) -> None:
        """Training thread, after the core's close (which waits for the stores). Every wait here ends.

        ``clean``: the writes still queued or running get up to ``timeout`` seconds (default:
        ``commit_timeout_s``) to end; any still running then is logged, given up (its checkpoint is not
        stored: whoever waits for it gets a ``TimeoutError``) and left to its daemon thread.
        ``clean=False`` (left by an exception): writes not begun are cancelled, and one running (perhaps
        hung in a collective with a dead rank) is waited for only ``timeout`` seconds (default: not at
        all) and left to run. Either way the writers' group is closed, and that cannot hang either.
        """
        if timeout is None:
            timeout = self.core.config.commit_timeout_s if clean else 0.0
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            jobs = list(self._writes)
            if not clean:
                for job in jobs:
                    if job.started is None:
                        job.future.cancel()
        self._queue.put(None)  # the writer thread ends after the writes handed over before
        futures.wait([job.future for job in jobs], timeout=max(0.0, deadline - time.monotonic()))
        left = [job for job in jobs if not job.future.done()]
        if left:
            self._leave(left, clean, timeout)
        self._close_writers()
        self.buffers.clear()

    def _leave(self, jobs: list[_Write], clean: bool, timeout: float) -> None:
        """Training thread, at close: say what still runs, and give it up after a clean close."""
        now = time.monotonic()
        what = []
        with self._lock:
            for job in jobs:
                if job.started is None:
                    what.append(f"the write of the step-{job.step} checkpoint is queued")
                else:
                    what.append(f"the write of the step-{job.step} checkpoint is still running after "
                                f"{now - job.started:.1f} s")
                if clean and not job.future.done():
                    job.future.set_exception(TimeoutError(
                        f"the write of the step-{job.step} checkpoint did not end within {timeout:g} s of the "
                        "close (commit_timeout_s): not stored"))
        if clean:
            logger.error("dyncheck: rank %d: %s; closing without it (not stored, left to its thread). Check "
                         "the local disk (the temporary folder) or the writers' peers; raise commit_timeout_s "
                         "(now %g s) to wait longer", self.rank, "; ".join(what), timeout)
        else:
            logger.warning("dyncheck: rank %d: %s; not waited for after the exception", self.rank, "; ".join(what))

    def _close_writers(self) -> None:
        """Close the writers' group in a thread of its own: destroying it while a hung write is still in
        one of its collectives could block."""
        if self.writers.group is None:
            return
        closer = threading.Thread(target=self.writers.close, name="dyncheck-close-writers", daemon=True)
        closer.start()
        closer.join(_GROUP_CLOSE_S)
        if closer.is_alive():
            logger.error("dyncheck: rank %d: closing the writers' group still blocks after %.0f s (a write hung "
                         "in one of its collectives?); left behind", self.rank, _GROUP_CLOSE_S)
