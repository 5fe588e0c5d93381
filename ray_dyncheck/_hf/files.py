"""HF's ``checkpoint-N`` folder, file by file: which rank owns which file, each rank's RNG file in
HF's format, and staging a rank's share (hard links) for the backend, with rank 0's manifest."""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .._state import write_manifest
from ..vocab import Kind
from .resume import SCHEDULER_FILE

__all__ = ["CHECKPOINT_PREFIX", "STAGING_DIR", "owner", "share", "stage"]

CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
STAGING_DIR = ".dyncheck-staging"
# A rank's own files of checkpoint-N: its RNG state, and its shard of a DCP folder (FSDP's sharded
# state dict: pytorch_model_fsdp_0/__<rank>_0.distcp, optimizer_0/...).
_RANK_FILE = re.compile(r"^(?:rng_state_(\d+)\.pth|__(\d+)_\d+\.distcp)$")


def share(rank: int, args: Any, source: str, rng_left_out: bool) -> dict[str, int]:
    """This rank's files of HF's ``checkpoint-N`` (``{path: bytes}``), after adding its RNG file,
    in HF's format and name, when HF did not write it (``save_only_model``)."""
    if rank == 0 and not os.path.isdir(source):
        raise FileNotFoundError(f"Trainer saved no {source}")
    rng_file = os.path.join(source, "rng_state.pth" if args.world_size <= 1
                            else f"rng_state_{args.process_index}.pth")
    if rng_left_out or not os.path.isfile(rng_file):
        os.makedirs(source, exist_ok=True)  # on other ranks HF may not have made it
        torch.save(hf_rng_state(args), rng_file)
    return {path: size for path, size in sizes(source, os.listdir(source)).items() if owner(path) == rank}


def stage(source: str, output_dir: str, *, step: int, kind: Kind, lr_scheduler: Any, shares: list[dict[str, int]],
          rank: int, world_size: int, merged: bool, backend_name: str) -> str | None:
    """This rank's share of HF's ``checkpoint-N``, hard-linked (or copied) into a directory of its
    own that the backend deletes once it is stored. Rank 0 adds ``scheduler.pt`` (weights only)
    and the manifest of every rank's files (``shares``, in rank order). ``merged``: the backend merges
    every rank's directory (else it stores rank 0's only, and this returns ``None`` on other ranks)."""
    if rank != 0 and not merged:
        return None
    names = [path for path in sorted(sizes(source, os.listdir(source)))
             if owner(path) == rank or (rank == 0 and not merged)]
    root = os.path.join(output_dir, STAGING_DIR)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"step{step}-rank{rank}-", dir=root)
    try:
        for name in names:  # file by file: a folder may hold other ranks' shards
            os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
            link_or_copy(os.path.join(source, name), os.path.join(staging, name))
        if rank == 0:
            if kind == Kind.WEIGHTS and lr_scheduler is not None and not os.path.exists(
                    os.path.join(staging, SCHEDULER_FILE)):
                # HF's save_only_model leaves the scheduler out; it is small, and without it a
                # resume would restart the LR schedule at its first step.
                torch.save(lr_scheduler.state_dict(), os.path.join(staging, SCHEDULER_FILE))
            files = sizes(staging, os.listdir(staging))
            for other, theirs in enumerate(shares[1:], start=1):
                for name, size in theirs.items():
                    if merged:
                        files[name] = size  # stored into the same checkpoint by rank `other`
                    elif files.get(name) != size:
                        raise FileNotFoundError(
                            f"rank {other}'s {name} is not in {source} on rank 0: {backend_name} stores "
                            "rank 0's files only, so every rank needs the same output_dir")
            write_manifest(staging, files, kind=kind, step=step, world_size=world_size, layout="transformers")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def owner(path: str) -> int:
    """The rank whose file of ``checkpoint-N`` this is (a path relative to it): ``rng_state_<k>.pth`` and
    DCP shards ``__<k>_<n>.distcp`` are rank k's, the rest rank 0's."""
    m = _RANK_FILE.match(os.path.basename(path))
    return int(m.group(1) or m.group(2)) if m else 0


def hf_rng_state(args: Any) -> dict[str, Any]:
    """This rank's RNG states as ``transformers.Trainer._save_rng_state`` writes them (CPU, CUDA),
    so HF's ``_load_rng_state`` restores them on resume."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        from transformers.training_args import ParallelMode

        states["cuda"] = (torch.cuda.random.get_rng_state_all() if args.parallel_mode == ParallelMode.DISTRIBUTED
                          else torch.cuda.random.get_rng_state())
    return states


def sizes(root: str, names: Iterable[str]) -> dict[str, int]:
    """``{path relative to root: bytes}`` of ``names`` in ``root``, folders walked."""
    found = {}
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            found[name] = os.path.getsize(path)
            continue
        for base, _dirs, files in os.walk(path):
            for file in files:
                found[os.path.relpath(os.path.join(base, file), root)] = os.path.getsize(os.path.join(base, file))
    return found


def link_or_copy(src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst)
        for name in os.listdir(src):
            link_or_copy(os.path.join(src, name), os.path.join(dst, name))
        return
    try:
        os.link(src, dst)  # same filesystem: no copy of a multi-GB model
    except OSError:
        shutil.copy2(src, dst)
