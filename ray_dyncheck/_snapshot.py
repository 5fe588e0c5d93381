"""A copy of a rank's training state in host memory: the only part of an asynchronous save that
blocks training.

On a GPU the tensors are copied into pinned host buffers that are kept and reused from one save to
the next (pinning is slow; the copies are non-blocking, with one wait at the end). On a CPU each
save takes a fresh copy, released once its files are written, so nothing is held between saves.
Either way at most one copy of the rank's state is held. ``DTensor`` shards stay ``DTensor`` (their
local shard copied), so ``torch.distributed.checkpoint`` writes them as shards. Nothing here imports
Ray.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["HostCopier"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return None
    return DTensor


class HostCopier:
    """Copies state trees (dicts, lists, tensors, ``DTensor`` s, plain values) into host memory."""

    def __init__(self) -> None:
        self._pinned: dict[str, torch.Tensor] = {}
        self._dtensor = _dtensor_type()
        self.in_use = False
        """The kept buffers still hold a copy being written: a new copy must not overwrite them."""
        self.bytes_held = 0
        """Bytes of pinned buffers kept between saves (GPU only)."""

    def copy(self, tree: Any) -> Any:
        """A host copy of ``tree``; returns once every tensor is copied (one wait for the GPU)."""
        used_cuda = [False]
        out = self._walk(tree, "", used_cuda)
        if used_cuda[0]:
            torch.cuda.synchronize()
        return out

    def release(self) -> None:
        """Free the kept pinned buffers."""
        self._pinned.clear()
        self.bytes_held = 0

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
        if t.device.type != "cuda":
            return t.clone()
        used_cuda[0] = True
        if self.in_use:  # only after a wait for the previous write timed out: a fresh buffer
            fresh = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            fresh.copy_(t, non_blocking=True)
            return fresh
        buf = self._pinned.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            if buf is not None:
                self.bytes_held -= buf.numel() * buf.element_size()
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._pinned[path] = buf
            self.bytes_held += buf.numel() * buf.element_size()
        buf.copy_(t, non_blocking=True)
        return buf
