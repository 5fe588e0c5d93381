"""The one cross-rank decision per check, and the other small collectives on the same side group.

Shape (as in Lightning's cross-rank decisions): rank 0 computes the decision locally, one collective
delivers it, every rank acts on the same value. The collective runs on a CPU (gloo) side group, so
NCCL training never synchronises for it, and every rank calls it at the same steps, always. Nothing
here imports Ray.

Example (every rank runs this at the same step):
    >>> agreement = Agreement()          # world size 1 / no process group: local only
    >>> agreement.agree(Decision(save=True, kind="full", next_interval=7)).next_interval
    7
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .._backends.base import Backend
from .._state.fetch import release_downloads
from ..errors import CheckpointRestoreError
from ..vocab import Kind, Reason

__all__ = ["Agreement", "Decision", "chosen_by_rank0", "fail_together", "resume_agreed"]

logger = logging.getLogger(__name__)

_KINDS: dict[int, Kind | None] = {0: None, 1: Kind.WEIGHTS, 2: Kind.FULL}
_CODES = {v: k for k, v in _KINDS.items()}
REASONS = tuple(Reason)


@dataclass(frozen=True)
class Decision:
    """What all ranks do at this check."""

    save: bool = False
    kind: Kind | None = None
    """``full`` or ``weights`` when saving."""
    stop: bool = False
    """Leave the training loop after this step (after the save, if any)."""
    next_interval: int = 1
    """Steps until the next check (``check_interval: auto``)."""
    reason: Reason = Reason.REQUEST
    """Why it saves (for metrics and metadata on every rank)."""
    busy: bool = False
    """Some rank still has a save in flight (its files not yet stored): no new save starts."""

    def encode(self) -> list[int]:
        kind = Kind(self.kind) if self.save and self.kind is not None else None
        return [int(self.save), _CODES[kind], int(self.stop),
                max(1, int(self.next_interval)), REASONS.index(Reason(self.reason)), int(self.busy)]

    @classmethod
    def decode(cls, values: list[int]) -> Decision:
        save, kind, stop, interval, reason, busy = values
        return cls(save=bool(save), kind=_KINDS[kind] if save else None, stop=bool(stop),
                   next_interval=max(1, interval), reason=REASONS[reason], busy=bool(busy))


class Agreement:
    """Delivers rank 0's decision to every rank with one ``all_reduce(MAX)`` on a gloo group.

    Construct it on every rank at the same point (creating the side group is itself collective).
    Ranks other than 0 contribute zeros, so the result is rank 0's decision; any rank may raise a flag
    (``stop``) and every rank sees it. Without an initialised process group, or at world size 1, no
    collective runs. ``timeout_s`` bounds every collective on the side group: a rank that died makes
    the others raise after it, instead of waiting out the default (30 minutes).
    """

    def __init__(self, timeout_s: float | None = None) -> None:
        self.group: dist.ProcessGroup | None = None
        self.rank, self.world_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if self.world_size > 1:
                # A side group even when the default one is gloo: our collective never interleaves
                # with the user's on the same communicator.
                timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
                self.group = dist.new_group(backend="gloo", timeout=timeout)
                # Connect now: the first collective on a group is far slower than the rest, and
                # would mislead the first interval chosen by `auto`.
                dist.all_reduce(torch.zeros(6, dtype=torch.int64), group=self.group)

    def agree(self, local: Decision) -> Decision:
        """Every rank calls this at the same step. Rank 0's ``local`` is the decision; ``stop`` and
        ``busy`` are raised when any rank's is."""
        if self.group is None:
            return local
        values = local.encode() if self.rank == 0 else [0, 0, int(local.stop), 0, 0, int(local.busy)]
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return Decision.decode(t.tolist())

    def any_rank(self, flag: bool) -> bool:
        """``True`` on every rank when ``flag`` is set on any rank (one small collective)."""
        if self.group is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def shared_error(self, error: str | None, what: str) -> str | None:
        """Every rank: ``None`` when no rank has an error; else this rank's ``error``, or, on a rank that
        had none, that another rank could not ``what`` (one small collective)."""
        if self.any_rank(error is not None):
            return error or f"another rank could not {what} (see its log)"
        return None

    def gather(self, obj: object) -> list[object] | None:
        """Collect one small picklable object per rank on rank 0 (only when saving)."""
        if self.group is None:
            return [obj]
        out: list[object] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return out

    def broadcast(self, obj: object) -> object:
        """Rank 0's small picklable ``obj`` on every rank (every rank calls it)."""
        if self.group is None:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def all_gather(self, obj: object) -> list[object]:
        """Every rank's small picklable ``obj``, in rank order, on every rank."""
        if self.group is None:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        """Release the side group (a local operation for gloo; safe after a peer died)."""
        group, self.group = self.group, None
        if group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except Exception:  # already torn down with the default group
                logger.debug("dyncheck: side group already destroyed", exc_info=True)


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


def resume_agreed(resume: Callable[[Backend, Agreement], Any], backend: Backend | None, timeout_s: float) -> Any:
    """A framework's resume path, on every rank: ``resume(backend, agreement)`` over a gloo group made for this
    call and destroyed after it (the backend defaults to this Ray Train worker's run), after removing a download
    an earlier resume in this thread left (its training raised before reading it)."""
    if backend is None:
        from .._backends.ray import RayBackend

        backend = RayBackend()
    release_downloads()
    agreement = Agreement(timeout_s=timeout_s)  # collective: every rank is here
    try:
        return resume(backend, agreement)
    finally:
        agreement.close()
