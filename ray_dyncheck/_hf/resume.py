"""Resuming a Hugging Face ``Trainer`` from the run's checkpoints: :func:`hf_resume_path` (rank 0
chooses, every rank gets that one) and what the callback needs to finish a weights-only resume.

Runs in every Ray Train worker (or any ``torch.distributed`` rank with a backend), before
``trainer.train``. Imports no transformers.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow.fs as pafs
import torch

from .._backends.base import Backend
from .._core.agree import Agreement, chosen_by_rank0, fail_together, resume_agreed
from .._requests.files import read_capped
from .._state import MANIFEST_FILE, read_manifest, read_stored_manifest
from .._state.dcp_safe import check_dcp_folder
from .._state.fetch import download, keep_download, newest, release_downloads

__all__ = ["hf_resume_path", "release_downloads"]

logger = logging.getLogger(__name__)


TRAINER_STATE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
RAY_LAYOUT_DIR = "checkpoint"  # Ray's RayTrainReportCallback puts HF's files in this subfolder
MAX_SCHEDULER_BYTES = 64 * 1024 * 1024


def _choose(fs: pafs.FileSystem, paths: Iterable[str],
            log: Callable[..., None] = logger.error) -> dict[str, Any] | None:
    """Rank 0: the newest complete ``Trainer`` checkpoint of ``paths`` (newest first), checked over
    ``fs`` without downloading it; ``None`` when there is none."""

    def judge(path: str, is_newest: bool) -> dict[str, Any]:
        manifest = read_stored_manifest(fs, path)
        if manifest is not None:
            if TRAINER_STATE not in manifest["files"]:
                raise ValueError(f"not a Hugging Face Trainer checkpoint (no {TRAINER_STATE})")
            subdir = None
        elif fs.get_file_info(posixpath.join(path, TRAINER_STATE)).type == pafs.FileType.File:
            subdir = None
        elif fs.get_file_info(posixpath.join(path, RAY_LAYOUT_DIR, TRAINER_STATE)).type == pafs.FileType.File:
            subdir = RAY_LAYOUT_DIR  # written by Ray's RayTrainReportCallback
        else:
            raise ValueError(f"not a Hugging Face Trainer checkpoint (no {TRAINER_STATE})")
        return {"path": path, "subdir": subdir, "manifest": manifest is not None,
                "kind": manifest["kind"] if manifest else "full", "step": manifest["step"] if manifest else None}

    return newest(paths, judge, log)


def weights_resume(backend: Backend, step: int) -> dict[str, Any] | None:
    """Rank 0: ``{"path", "scheduler"}`` when the checkpoint :func:`hf_resume_path` chooses is a
    weights-only one at ``step``, else ``None``."""
    storage = backend.storage()
    if storage is None:
        return None
    fs = storage[0]
    choice = _choose(fs, backend.checkpoints(), log=logger.debug)  # logged once, by hf_resume_path
    if choice is None or choice["kind"] != "weights" or choice["step"] != step:
        return None
    file = posixpath.join(choice["path"], SCHEDULER_FILE)
    scheduler = None
    if fs.get_file_info(file).type == pafs.FileType.File:
        raw = read_capped(fs, file, MAX_SCHEDULER_BYTES)
        scheduler = torch.load(io.BytesIO(raw), weights_only=True)
    return {"path": choice["path"], "scheduler": scheduler}


def hf_resume_path(download_dir: str | None = None, *, backend: Backend | None = None,
                   timeout_s: float = 1800.0) -> str | None:
    """The run's newest complete checkpoint as a local directory for
    ``Trainer.train(resume_from_checkpoint=...)``; ``None`` when the run has none (a fresh start).

    Runs in a Ray Train worker, on **every** rank, before ``trainer.train``. Rank 0 chooses the
    checkpoint: the newest whose manifest's files (every rank's) are all there; every rank then uses
    that one, downloaded into a new temporary directory (in ``download_dir``, default the system's)
    when the storage is remote, and checks it. The download is removed once ``Trainer`` has read it:
    by :class:`~ray_dyncheck.DynamicCheckpointCallback` at the first step of that training (HF has
    loaded the weights, optimizer, scheduler and RNG states by then), at its end, or when the
    callback closes; else by the next call of this function in the same thread, and at interpreter
    exit at the latest. Also accepts checkpoints written by Ray's ``RayTrainReportCallback``
    (HF's files in a ``checkpoint/`` subfolder). A weights-only checkpoint resumes at its step with a
    fresh optimizer; the callback restores its LR schedule and logs it.

    Args:
        download_dir: Where remote checkpoints are downloaded to.
        backend: Where the run's checkpoints are; default: the Ray Train run of this worker.
        timeout_s: How long a rank waits for the others (their download included). The ranks talk over
            a gloo group made for this call and destroyed after it; none at world size 1.

    Raises:
        CheckpointRestoreError: on every rank, with the same message, when any rank could not list,
            download or check the checkpoint (no rank trains on from it).
    """
    return resume_agreed(lambda b, a: _resume_path(b, a, download_dir), backend, timeout_s)


def _resume_path(backend: Backend, agreement: Agreement, download_dir: str | None) -> str | None:
    rank = agreement.rank
    storage = backend.storage()
    choice = chosen_by_rank0(agreement, lambda: _choose(storage[0], backend.checkpoints()) if storage else None)
    if choice is None:
        return None
    local, downloaded, error = None, None, None
    try:
        try:
            if storage is None:
                raise ValueError("this rank sees no run storage")
            fs = storage[0]
            root = choice["path"]
            if fs.type_name != "local":
                root = downloaded = download(fs, choice["path"], prefix="dyncheck-resume-", dir=download_dir)
            if read_manifest(root) is None and choice["manifest"]:  # raises ValueError when incomplete
                raise ValueError(f"{root} has no {MANIFEST_FILE}")
            local = root if choice["subdir"] is None else os.path.join(root, choice["subdir"])
            if not os.path.isfile(os.path.join(local, TRAINER_STATE)):
                raise ValueError(f"{local} has no {TRAINER_STATE}")
            # Accelerate loads an FSDP checkpoint's DCP folders with DCP's own reader, which unpickles
            # freely: they are checked here first, so nothing from storage runs code.
            for name in sorted(os.listdir(local)):
                if os.path.isfile(os.path.join(local, name, ".metadata")):
                    check_dcp_folder(os.path.join(local, name))
        except Exception as exc:
            logger.exception("dyncheck: rank %d could not get checkpoint %s", rank, choice["path"])
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
        fail_together(agreement, error, choice["path"])
    except BaseException:
        if downloaded is not None:
            shutil.rmtree(downloaded, ignore_errors=True)
        raise
    if downloaded is not None:
        keep_download(downloaded)
    if rank == 0:
        logger.info("dyncheck: resuming Trainer from %s checkpoint %s (step %s)", choice["kind"], choice["path"],
                    choice["step"])
    return local
