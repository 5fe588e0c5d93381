"""The one contract between the worker core and where checkpoints go: :class:`Backend`.

:class:`~ray_dyncheck._backends.ray.RayBackend` implements it for Ray Train workers,
:class:`~ray_dyncheck.LocalBackend` for plain ``torch.distributed``. Subclass :class:`Backend` to get the
defaults of its optional members (no metrics, no preemption notices, no node-local paths, nothing to
close). Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager

import pyarrow.fs as pafs

from .._state.memory import MemoryStore
from .metrics import Metrics

__all__ = ["Backend", "Notice", "OnDone", "require"]

OnDone = Callable[[str | None, BaseException | None], None]
"""``on_done(path, error)``: one rank's files of one checkpoint are stored at ``path``, or finally failed."""


@dataclass(frozen=True)
class Notice:
    """What the backend says about a drain that affects this run."""

    deadline: float | None
    """When the node goes away (UNIX seconds), or ``None`` when the drain reported none."""
    ranks: tuple[int, ...] = ()
    nodes: tuple[str, ...] = ()


class Backend:
    """Where checkpoints go and come from. Every member below is part of the contract; the ones with a
    body here are optional (a subclass inherits that default)."""

    rank: int
    world_size: int
    merges_rank_dirs: ClassVar[bool] = True
    """``True`` when the directories every rank reports are merged into one checkpoint; ``False``:
    only rank 0's directory is stored (other ranks report ``None``)."""
    metrics: Metrics | None = None
    """Rank 0: where events go (the dashboard); ``None``: recorded nowhere."""

    def storage(self) -> tuple[pafs.FileSystem, str] | None:
        """The run directory's filesystem and path, or ``None`` when there is none."""
        raise NotImplementedError

    def prepare(self, directory: str, metadata: dict[str, Any]) -> None:
        """Rank 0, before :meth:`report`: attach ``metadata`` to the checkpoint in ``directory``.
        May raise: the caller then reports without a checkpoint."""
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone, written: Future[Any] | None = None) -> None:
        """Called on every rank, the same number of times; ``directory`` is ``None`` on ranks with
        nothing to write. ``written``, when given, completes once the files in ``directory`` are
        written (a background save; it raises if they could not be): store them only then, never
        by waiting in the training thread. ``on_done(path, error)`` runs once, when that rank's files
        are stored or finally failed to be."""
        raise NotImplementedError

    def committed(self, path: str, timeout: float) -> bool:
        """Rank 0, in a background thread, after ``on_done(path, None)``: whether the checkpoint is
        registered (a new run would resume from it)."""
        raise NotImplementedError

    def checkpoints(self) -> Iterator[str]:
        """The run's committed checkpoints, newest first (paths on the run's storage)."""
        raise NotImplementedError

    def open(self, path: str) -> ContextManager[str]:
        """One checkpoint as a local directory (downloaded first when remote)."""
        raise NotImplementedError

    # -- optional -----------------------------------------------------------------------------------

    def preemption(self) -> Notice | None:
        """Rank 0, at each check: the drain notice for this run, or ``None``. Cheap: no I/O, no
        collective. Default: never preempted."""
        return None

    def node_local(self, path: str) -> bool:
        """Whether a local path is on this node's disk only (others cannot see it). Default: no."""
        return False

    def memory(self) -> MemoryStore | None:
        """Where this run's memory snapshots are held (``memory_snapshots``), or ``None``: no holders
        serve this run. Called once, at the hook's construction. Default: none."""
        return None

    def close(self, timeout: float | None = None) -> None:
        """Release what the backend holds (threads); it may be used again afterwards. Default: nothing."""
        return None


REQUIRED = ("storage", "prepare", "report", "committed", "checkpoints", "open")
"""The members a backend must implement (the rest have defaults)."""


def require(backend: object) -> Backend:
    """``backend``, if it is a :class:`Backend`; else a ``TypeError`` that says how to make it one."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must subclass ray_dyncheck.Backend (it supplies the defaults of metrics, "
                        f"preemption(), node_local() and close()), got {type(backend).__name__}: declare it as "
                        f"`class {type(backend).__name__}(ray_dyncheck.Backend)`")
    return backend
