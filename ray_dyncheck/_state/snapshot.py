"""A copy of a rank's training state in host memory: the only part of an asynchronous save that
blocks training.

On a GPU the tensors are copied into pinned host buffers that are kept and reused from one save to
the next (pinning is slow; the copies are non-blocking, with one wait at the end). On a CPU each
save takes a fresh copy, released once its files are written, so nothing is held between saves.
The kept buffers belong to one save at a time: :meth:`KeptBuffers.lease` hands them to a save only
when no other save holds them (else that save copies into fresh buffers), and only that save's
:meth:`HostCopier.release` gives them back — never another save's write finishing. ``DTensor``
shards stay ``DTensor`` (their local shard copied), so ``torch.distributed.checkpoint`` writes them
as shards. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["HostCopier", "KeptBuffers", "on_cuda"]

Keep = Callable[[torch.Tensor], bool]


def on_cuda(t: torch.Tensor) -> bool:
    """The default: CUDA tensors go into kept (pinned) buffers; CPU tensors are cloned fresh."""
    return t.device.type == "cuda"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return None
    return DTensor


class KeptBuffers:
    """Host buffers kept from one save to the next, owned by one save at a time.

    ``keep(tensor)`` says which tensors are copied into a kept buffer (default: CUDA tensors, into
    pinned memory). Threads: the training thread takes the buffers (:meth:`lease`) and fills them; the
    writer thread of the save that holds them gives them back once its files are written (or the
    training thread, when that save is never handed to a writer). ``_owner`` is guarded by ``_lock``;
    the buffers themselves are touched only by the copier that owns them.
    """

    def __init__(self, keep: Keep = on_cuda) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._owner: HostCopier | None = None
        """The copier (one save) that holds the buffers; guarded by ``_lock``."""
        self._buffers: dict[str, torch.Tensor] = {}
        self.bytes_held = 0
        """Bytes of buffers kept between saves (pinned, on a GPU)."""

    def lease(self) -> HostCopier:
        """Training thread, once per save: a copier that holds the kept buffers when no other save
        does, else one that copies into fresh buffers. The save ends with its :meth:`HostCopier.release`."""
        copier = HostCopier(keep=self.keep)
        with self._lock:
            if self._owner is None:
                self._owner = copier
                copier._kept = self
        return copier

    def clear(self) -> None:
        """Training thread, at close: drop the kept buffers (a save still holding them keeps its own
        references until its write ends)."""
        with self._lock:
            self._buffers = {}
            self.bytes_held = 0

    def _give_back(self, copier: HostCopier) -> None:
        with self._lock:
            if self._owner is copier:
                self._owner = None

    def _buffer(self, path: str, t: torch.Tensor) -> torch.Tensor:
        """Only the owner calls this (its copy runs in the training thread)."""
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            if buf is not None:
                self.bytes_held -= buf.numel() * buf.element_size()
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self._buffers[path] = buf
            self.bytes_held += buf.numel() * buf.element_size()
        return buf


class HostCopier:
    """Copies one save's state trees (dicts, lists, tensors, ``DTensor`` s, plain values) into host memory.

    Made by :meth:`KeptBuffers.lease` for a save of the pipeline; made directly (``HostCopier()``) it
    keeps nothing: every copy is fresh. Threads: :meth:`copy` runs in the training thread;
    :meth:`release` in whichever thread ends the save (its writer, or the training thread).
    """

    def __init__(self, keep: Keep = on_cuda) -> None:
        self._keep = keep
        self._kept: KeptBuffers | None = None
        """The kept buffers, while this copier holds them (set by :meth:`KeptBuffers.lease`)."""
        self._dtensor = _dtensor_type()

    def copy(self, tree: Any) -> Any:
        """A host copy of ``tree``; returns once every tensor is copied (one wait for the GPU)."""
        used_cuda = [False]
        out = self._walk(tree, "", used_cuda)
        if used_cuda[0]:
            torch.cuda.synchronize()
        return out

    def release(self) -> None:
        """The save is over: its files are written, or it will never be. Gives the kept buffers back if
        this copier holds them; a no-op otherwise and on a second call."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept._give_back(self)

    def _walk(self, value: Any, path: str, used_cuda: list[bool]) -> Any:
        if self._dtensor is not None and isinstance(value, self._dtensor):
            dtensor: Any = value
            local = self._tensor(dtensor._local_tensor, path, used_cuda)
            return self._dtensor(local, dtensor._spec, requires_grad=False)
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, used_cuda)
        if isinstance(value, Mapping):
            return {k: self._walk(v, f"{path}/{k}", used_cuda) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._walk(v, f"{path}/{i}", used_cuda) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return copy.deepcopy(value)

    def _tensor(self, t: torch.Tensor, path: str, used_cuda: list[bool]) -> torch.Tensor:
        t = t.detach()
        cuda = t.device.type == "cuda"
        keep = self._keep(t)
        if not cuda and not keep:
            return t.clone()
        used_cuda[0] = used_cuda[0] or cuda
        kept = self._kept if keep else None
        # Not kept, or the kept buffers belong to another save (its write still reads them): a fresh one.
        buf = kept._buffer(path, t) if kept is not None else torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        buf.copy_(t, non_blocking=cuda)
        return buf
