"""Helpers for the save pipeline's tests: a real write held at its start, and a 2-rank gloo worker.

Spawned workers import this module by name; each rank writes what it saw to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import torch

import ray_dyncheck as rdc
from ray_dyncheck._pipeline import SavePipeline
from ray_dyncheck._state import write_files


def _local_tensors(tree: Any) -> list[torch.Tensor]:
    """Every host tensor of a captured tree (a ``DTensor``'s local shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return [tree._local_tensor]
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _local_tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _local_tensors(v)]
    return []


class HeldWrites:
    """The pipeline's real write (:func:`~ray_dyncheck.state.write_files`), each held at its start until
    the test lets its step go (``go[step].set()``); ``started[step]`` is set once it waits there.
    ``buffers[step]`` records where the host copy that write reads lives (``data_ptr`` of each tensor).
    With ``hold=False`` nothing waits."""

    def __init__(self, steps: int = 20, hold: bool = True, limit_s: float = 60.0) -> None:
        self.started = {s: threading.Event() for s in range(steps + 1)}
        self.go = {s: threading.Event() for s in range(steps + 1)}
        if not hold:
            for event in self.go.values():
                event.set()
        self.limit_s = limit_s
        self.buffers: dict[int, list[int]] = {}
        self.finished: list[int] = []

    def release_all(self) -> None:
        for event in self.go.values():
            event.set()

    def __call__(self, directory: str, captured: Any, **kw: Any) -> dict[str, int]:
        step = captured.step
        self.started[step].set()
        # Bounded, so a broken pipeline fails the test instead of leaving a thread behind.
        if not self.go[step].wait(self.limit_s):
            raise TimeoutError(f"the write of step {step} was never let go")
        self.buffers[step] = [t.data_ptr() for t in _local_tensors(captured.tensors)]
        files = write_files(directory, captured, **kw)
        self.finished.append(step)
        return files


def use_pipeline(dc: rdc.DynamicCheckpoint, write: Any, keep_all: bool = True) -> SavePipeline:
    """Give the hook a pipeline with ``write``; ``keep_all``: every tensor is copied into a kept host
    buffer, as CUDA tensors are (so the buffers' ownership runs on CPU tensors). Every rank calls it at
    the same point (the pipeline's writers' group is created collectively)."""
    dc._pipeline.close()
    kw: dict[str, Any] = {"keep": lambda t: True} if keep_all else {}
    dc._pipeline = SavePipeline(dc._core, model=dc.model, optimizer=dc.optimizer, lr_scheduler=dc.lr_scheduler,
                                extra_state=dc.extra_state, write=write, **kw)
    return dc._pipeline


def agreed_error_worker(rank: int, world_size: int, port: int, run_dir: str, out: str) -> None:
    """FSDP2 over gloo, a weights save at steps 1, 2 and 3. At step 2 rank 1 cannot make its temporary
    folder (after rank 0 copied its shard): every rank agrees on the error and nothing is written.
    Then the hook is closed as after an exception (``clean=False``)."""
    import logging
    import tempfile

    import torch.distributed as dist

    from gloo_workers import _fsdp_model, _init

    logging.basicConfig(level=logging.INFO)
    _init(rank, world_size, port)
    model = _fsdp_model(world_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dc = rdc.DynamicCheckpoint({"enabled": False, "collective_timeout_s": 60}, model=model, optimizer=opt,
                               backend=rdc.LocalBackend(run_dir))
    writes = HeldWrites(hold=False)
    pipeline = use_pipeline(dc, writes)
    for step in (1, 2, 3):
        loss = model(torch.ones(2, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        dc.step()
        if step == 2 and rank == 1:
            tempfile.tempdir = os.path.join(out, "no-such-dir")
        try:
            dc.save("weights")
        finally:
            tempfile.tempdir = None
    dc.wait_stored()
    t0 = time.monotonic()
    dc.close(clean=False)
    record = {"buffers": writes.buffers, "saves": dc.saves, "close_s": time.monotonic() - t0,
              "writers_group_closed": pipeline.writers.group is None}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
