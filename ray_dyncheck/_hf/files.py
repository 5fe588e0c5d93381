"""HF's ``checkpoint-N`` folder: each rank's RNG file in HF's format, and a rank's share of the folder staged
for the backend (the file-by-file rules are :mod:`ray_dyncheck._state.staging`'s)."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from .._state.staging import mine, owner, stage_share
from ..vocab import Kind
from .resume import SCHEDULER_FILE

__all__ = ["CHECKPOINT_PREFIX", "STAGING_DIR", "owner", "share", "stage"]

CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
STAGING_DIR = ".dyncheck-staging"


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
    return mine(source, rank)


def stage(source: str, output_dir: str, *, step: int, kind: Kind, lr_scheduler: Any, shares: list[dict[str, int]],
          rank: int, world_size: int, merged: bool, backend_name: str) -> str | None:
    """This rank's share of HF's ``checkpoint-N`` (see :func:`~ray_dyncheck._state.staging.stage_share`), in
    ``output_dir/.dyncheck-staging``. Rank 0 adds ``scheduler.pt`` to a weights-only save: HF's
    ``save_only_model`` leaves it out, it is small, and without it a resume would restart the LR schedule."""

    def add(staging: str) -> None:
        if kind == Kind.WEIGHTS and lr_scheduler is not None and not os.path.exists(
                os.path.join(staging, SCHEDULER_FILE)):
            torch.save(lr_scheduler.state_dict(), os.path.join(staging, SCHEDULER_FILE))

    return stage_share(source, os.path.join(output_dir, STAGING_DIR), step=step, kind=kind, shares=shares, rank=rank,
                       world_size=world_size, merged=merged, backend_name=backend_name, layout="transformers", add=add)


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
