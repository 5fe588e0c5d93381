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
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ._channel import Request
from ._core import WorkerCore
from ._sharded import DCP_ERRORS, is_sharded
from ._snapshot import HostCopier
from .agree import Agreement
from .state import (
    SHARDED_FORMAT_VERSION,
    Captured,
    Stateful,
    capture_rank_state,
    capture_state,
    unwrap_model,
    write_files,
    write_manifest,
)

__all__ = ["SavePipeline"]

logger = logging.getLogger(__name__)


class SavePipeline:
    """Construct on every rank at the same point (it creates the writers' gloo group)."""

    def __init__(self, core: WorkerCore, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 lr_scheduler: Any | None, extra_state: Mapping[str, Stateful]) -> None:
        self.core = core
        self.model, self.optimizer, self.lr_scheduler, self.extra_state = model, optimizer, lr_scheduler, extra_state
        self.rank = core.rank
        self.sharded = is_sharded(unwrap_model(model))
        self.copier = HostCopier()
        # Collective: the writer threads' own group (DCP's plan exchange, every rank's file list).
        self.writers = Agreement(timeout_s=core.config.collective_timeout_s)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dyncheck-write")
        self.last_blocked_s = 0.0
        """Seconds the newest save blocked training on this rank."""

    def save(self, kind: str, reason: str, requests: Sequence[Request], metrics: Mapping[str, Any] | None,
             step: int) -> None:
        """Every rank, at the same step."""
        t0 = time.perf_counter()
        agreement = self.core.agreement
        try:
            mine: dict[str, Any] = capture_rank_state(self.extra_state)
            pickle.dumps(mine)  # gather_object pickles before it talks: fail here, not skip it
        except Exception as exc:
            logger.exception("dyncheck: rank %d could not capture its state at step %d", self.rank, step)
            mine = {"error": f"rank {self.rank}: {type(exc).__name__}: {exc}"}
        states = agreement.gather(mine)  # every rank, even after an error
        error: str | None = None
        if self.rank == 0:
            assert states is not None
            errors = [s["error"] for s in states if isinstance(s, dict) and "error" in s]
            error = "; ".join(errors) or None
        captured: Captured | None = None
        directory: str | None = None
        if error is None and (self.sharded or self.rank == 0):
            try:
                directory = tempfile.mkdtemp(prefix=f"dyncheck-{step}-")
                captured = capture_state(self.model, self.optimizer, self.lr_scheduler, kind=kind, step=step,
                                         copier=self.copier, sharded=self.sharded)
                self.copier.in_use = True
            except Exception as exc:
                logger.exception("dyncheck: rank %d could not copy its %s state at step %d", self.rank, kind, step)
                error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        # Every rank: nobody starts a write (a collective when sharded) that another rank will not join.
        if agreement.any_rank(error is not None):
            error = error or "another rank could not capture its state (see its log)"
        written: Future[dict[str, int]] | None = None
        if error is None and captured is not None and directory is not None:
            written = self._executor.submit(self._write, directory, captured, states)
            if self.core.config.save_mode == "sync":
                try:
                    written.result()
                except Exception as exc:
                    error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
                written = None
        elif directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
            directory = None
        self.last_blocked_s = time.perf_counter() - t0
        self.core.report(step=step, kind=kind, reason=reason, requests=requests, directory=directory,
                         error=error, metrics=metrics, t0=t0, written=written)

    def _write(self, directory: str, captured: Captured, states: list[Any] | None) -> dict[str, int]:
        """In the writer thread of every rank that captured state. Raises when this checkpoint must not
        be stored (on every rank, for a sharded one)."""
        group = self.writers.group if self.sharded else None
        error: str | None = None
        files: dict[str, int] = {}
        try:
            files = write_files(directory, captured, rank=self.rank, rank_states=states, group=group)
        except DCP_ERRORS as exc:
            logger.exception("dyncheck: rank %d could not write its files of the step-%d checkpoint", self.rank,
                             captured.step)
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        finally:
            captured.tensors.clear()  # the host copy is no longer needed
            self.copier.in_use = False
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

    def close(self, *, clean: bool = True) -> None:
        """After the core's close (which waits for the stores). ``clean=False`` (left by an exception):
        a write still hung in a collective with a dead rank is not waited for."""
        self._executor.shutdown(wait=clean, cancel_futures=not clean)
        if clean:
            self.writers.close()
        self.copier.release()
