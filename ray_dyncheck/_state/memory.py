"""Memory snapshots' state: where they are held (the :class:`MemoryStore` contract, and :class:`DictStore`, one
in this process: for tests and a single process, it dies with it) and a snapshot as the files of a plain
checkpoint, in memory: the same bytes a save writes (weights in safetensors, the optimizer and the small
state loadable with ``torch.load(weights_only=True)``), so a restore from memory goes through the very
loader a restore from storage does. Nothing here imports Ray (Ray's holders:
:mod:`ray_dyncheck._backends.holders`)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

from .capture import Captured, trainer_state_bytes
from .layout import MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE, write_manifest

__all__ = ["DictStore", "Held", "MemoryStore", "materialize", "snapshot_files", "write_snapshot"]


@dataclass(frozen=True)
class Held:
    """A complete snapshot set, as the store found it."""

    step: int
    meta: dict[str, Any]
    """What the snapshot says of itself: ``world_size``, ``kind``, ``run``, ``bytes``."""
    holders: tuple[str, ...] = field(default=())
    """Where a complete copy is (any one serves)."""


class MemoryStore:
    """Holds snapshot sets of one run. Rank 0's snapshot thread calls :meth:`put`; rank 0 calls
    :meth:`newest` at a restore, and every rank :meth:`get`. Each holder keeps at most two sets of the
    run: the newest complete one and the one being made."""

    copies: int = 1
    """How many copies a complete set has (holders on different nodes)."""

    def put(self, step: int, meta: Mapping[str, Any], files: Mapping[str, bytes]) -> tuple[str, ...]:
        """Hold ``files`` as the snapshot of ``step`` in :attr:`copies` holders, then mark it complete
        there. Returns the holders. Raises when it could not be made complete (then it is never used)."""
        raise NotImplementedError

    def newest(self) -> Held | None:
        """The newest complete set that some holder still has, or ``None``."""
        raise NotImplementedError

    def get(self, held: Held) -> Mapping[str, bytes | memoryview]:
        """The files of ``held`` from the first of its holders that answers. Raises when none does."""
        raise NotImplementedError

    def held_bytes(self) -> dict[str, int]:
        """Bytes held, per holder (node)."""
        raise NotImplementedError


class DictStore(MemoryStore):
    """A store in this process's memory (thread-safe): the contract without Ray."""

    def __init__(self, name: str = "local") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._sets: dict[int, tuple[dict[str, Any], dict[str, bytes], bool]] = {}
        """step -> (meta, files, complete), guarded by ``_lock``."""

    def put(self, step: int, meta: Mapping[str, Any], files: Mapping[str, bytes]) -> tuple[str, ...]:
        with self._lock:
            newest = max((s for s, (_, _, done) in self._sets.items() if done), default=None)
            self._sets = {s: v for s, v in self._sets.items() if s == newest}
            self._sets[step] = (dict(meta), dict(files), False)
        with self._lock:
            meta_, files_, _ = self._sets[step]
            self._sets = {step: (meta_, files_, True)}
        return (self.name,)

    def newest(self) -> Held | None:
        with self._lock:
            done = [(s, meta) for s, (meta, _, ok) in self._sets.items() if ok]
        if not done:
            return None
        step, meta = max(done, key=lambda t: t[0])
        return Held(step, meta, (self.name,))

    def get(self, held: Held) -> dict[str, bytes]:
        with self._lock:
            entry = self._sets.get(held.step)
        if entry is None or not entry[2]:
            raise KeyError(f"no complete snapshot of step {held.step} is held")
        return dict(entry[1])

    def held_bytes(self) -> dict[str, int]:
        with self._lock:
            total = sum(len(b) for _, files, _ in self._sets.values() for b in files.values())
        return {self.name: total}


def snapshot_files(captured: Captured, rank_states: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """Rank 0, off the training thread: ``{file name: bytes}`` of ``captured`` (a plain layout)."""
    if captured.sharded:
        raise ValueError("memory snapshots hold the plain layout; a sharded model resumes from storage")
    weights = {k: v.contiguous() for k, v in captured.tensors["model"].items()}
    files = {MODEL_FILE: safetensors.torch.save(weights, metadata={"format": "pt", "step": str(captured.step)})}
    if "optim" in captured.tensors:
        buf = io.BytesIO()
        torch.save(captured.tensors["optim"], buf)
        files[OPTIMIZER_FILE] = buf.getvalue()
    files[TRAINER_FILE] = trainer_state_bytes(captured, rank_states)
    return files


def write_snapshot(files: Mapping[str, bytes | memoryview], directory: str) -> dict[str, int]:
    """Write a snapshot's ``files`` into ``directory`` (names from memory stay inside it); ``{file: bytes}``.
    The manifest is not written here."""
    sizes = {}
    os.makedirs(directory, exist_ok=True)
    for name, data in files.items():
        if name not in (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE):
            raise ValueError(f"a memory snapshot holds an unexpected file {name!r}")
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
        sizes[name] = memoryview(data).nbytes
    return sizes


def materialize(files: Mapping[str, bytes | memoryview], directory: str, *, kind: str, step: int,
                world_size: int) -> None:
    """Write a snapshot's ``files`` and their manifest into ``directory``: a checkpoint
    :func:`~ray_dyncheck._state.load_checkpoint` reads."""
    write_manifest(directory, write_snapshot(files, directory), kind=kind, step=step, world_size=world_size)
