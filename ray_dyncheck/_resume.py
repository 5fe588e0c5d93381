"""Resume for the plain hook, on every rank: rank 0 chooses the newest complete state (a memory snapshot
newer than the newest committed checkpoint of ours, else that checkpoint), every rank loads the same one, and
every rank fails the same way. A memory snapshot that some rank cannot fetch sends every rank to storage."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ._backends.base import Backend
from ._core.agree import Agreement, chosen_by_rank0, fail_together
from ._snapshots import MemorySnapshots
from ._state import CheckpointInfo, Stateful, load_checkpoint, read_manifest, read_stored_manifest
from ._state.fetch import STOP, newest
from ._state.memory import Held, materialize
from ._state.sharded import DCP_ERRORS

__all__ = ["Restorer"]

logger = logging.getLogger(__name__)


class Restorer:
    """One restore of :class:`~ray_dyncheck.hook.DynamicCheckpoint` (every rank makes one, at the same point)."""

    def __init__(self, backend: Backend, snapshots: MemorySnapshots | None, *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None, lr_scheduler: Any | None,
                 extra_state: Mapping[str, Stateful]) -> None:
        self.backend, self.snapshots = backend, snapshots
        self.rank, self.world_size = backend.rank, backend.world_size
        self.model, self.optimizer, self.lr_scheduler, self.extra_state = model, optimizer, lr_scheduler, extra_state

    def restore(self, agreement: Agreement) -> tuple[CheckpointInfo, str] | None:
        """Every rank: load the state rank 0 chose; ``(info, "memory" | "storage")``, or ``None`` when there is
        none (or the newest checkpoint is not ours). Raises the same error on every rank when any failed."""
        choice = chosen_by_rank0(agreement, self._choose)
        if choice is not None and "memory" in choice:
            info = self._restore_memory(agreement, choice["memory"])
            if info is not None:
                return info, "memory"
            choice = choice["storage"]  # the same on every rank: the memory path failed on some rank
        if choice is None:
            return None
        path = choice["path"]
        info, error = None, None
        with contextlib.ExitStack() as stack:
            # What each rank does alone (download, file checks) is agreed on before the load, whose
            # collectives (sharded state) every rank must then join.
            directory = ""
            try:
                directory = stack.enter_context(self.backend.open(path))
                if read_manifest(directory) is None:
                    raise ValueError(f"{path} has no manifest after download")
            except DCP_ERRORS as exc:
                logger.exception("dyncheck: rank %d could not fetch checkpoint %s", self.rank, path)
                error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            fail_together(agreement, error, path)
            info = self._load(agreement, directory, f"checkpoint {path}", path)
        return info, "storage"

    def _load(self, agreement: Agreement, directory: str, what: str, where: str) -> CheckpointInfo:
        """Every rank, once every rank has ``directory``: load it; any rank's failure raises on every rank."""
        info, error = None, None
        try:
            info = load_checkpoint(directory, model=self.model, optimizer=self.optimizer,
                                   lr_scheduler=self.lr_scheduler, extra_state=self.extra_state,
                                   rank=self.rank, group=agreement.group)
        except DCP_ERRORS as exc:
            logger.exception("dyncheck: rank %d could not load %s", self.rank, what)
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        fail_together(agreement, error, where)
        assert info is not None  # loaded here, or raised above
        return info

    def _restore_memory(self, agreement: Agreement, chosen: dict[str, Any]) -> CheckpointInfo | None:
        """Every rank: load the memory snapshot rank 0 chose. ``None`` on every rank when some rank could
        not fetch it (the caller falls back to storage); a failed load raises on every rank, as from storage."""
        snapshots = self.snapshots
        held = Held(chosen["step"], chosen["meta"], tuple(chosen["holders"]))
        where = f"the memory snapshot of step {held.step}"
        directory = ""
        try:
            error = None
            try:
                directory = tempfile.mkdtemp(prefix="dyncheck-memory-")
                if snapshots is None or snapshots.store is None:  # rank 0 found holders, this rank none
                    raise RuntimeError("this rank found no memory holders")
                materialize(snapshots.store.get(held), directory, kind=held.meta["kind"], step=held.step,
                            world_size=self.world_size)
            except Exception as exc:
                logger.exception("dyncheck: rank %d could not fetch %s", self.rank, where)
                error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            error = agreement.shared_error(error, f"fetch {where}")
            if error is not None:
                if self.rank == 0:
                    logger.warning("dyncheck: %s is lost (%s): resuming from storage", where, error)
                return None
            info = self._load(agreement, directory, where, where)
            if snapshots is not None:
                snapshots.resumed_from(held.step)
            return replace(info, path=f"memory (step {held.step}, held on {len(held.holders)} node(s))")
        finally:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)

    def _choose(self) -> dict[str, Any] | None:
        """Rank 0: the newest complete state, in memory or in storage: the memory snapshot when it is
        newer than the newest committed checkpoint of ours (``{"memory": ..., "storage": fallback}``)."""
        stored = self._choose_stored()
        if stored is not None and "foreign" in stored:
            return None  # the newest checkpoint is not ours: state left as it is, memory included (logged)
        held = None
        if self.snapshots is not None and self.snapshots.active:
            try:
                held = self.snapshots.newest()
            except Exception:
                logger.exception("dyncheck: could not ask the memory holders for a snapshot; resuming from storage")
        if held is not None and (stored is None or held.step > stored["step"]):
            return {"memory": {"step": held.step, "meta": held.meta, "holders": list(held.holders)}, "storage": stored}
        if held is not None and stored is not None:
            logger.info("dyncheck: the stored checkpoint of step %d is newer than the memory snapshot of step %d",
                        stored["step"], held.step)
        return stored

    def _choose_stored(self) -> dict[str, Any] | None:
        """Rank 0: the newest complete checkpoint of ours, judged by its manifest in storage; ``{"foreign": path}``
        when the newest one is not ours."""
        storage = self.backend.storage()
        if storage is None:
            return None
        fs = storage[0]
        foreign: list[str] = []

        def judge(path: str, is_newest: bool) -> Any:
            manifest = read_stored_manifest(fs, path)  # raises when torn or unreadable: skipped
            if manifest is not None:
                return {"path": path, "step": int(manifest["step"])}
            if is_newest:
                logger.warning("dyncheck: the newest checkpoint (%s) was not written by ray_dyncheck; training "
                               "state left as it is", path)
                foreign.append(path)
                return STOP
            return None

        chosen = newest(self.backend.checkpoints(), judge)
        return {"foreign": foreign[0]} if foreign else chosen
