"""Resuming a Lightning ``Trainer`` from the run's checkpoints: :func:`lightning_resume_path` (rank 0 chooses,
every rank gets that one, downloaded and checked).

Runs in every Ray Train worker (or any ``torch.distributed`` rank with a backend), before ``trainer.fit``.
Imports no Lightning: the checkpoint is a file (``torch.save`` of Lightning's dict) or, under
``ModelParallelStrategy``, a DCP folder, both named ``checkpoint.ckpt`` as Ray's ``RayTrainReportCallback``
names them.
"""

from __future__ import annotations

import logging
import os
import pickle
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow.fs as pafs
import torch

from .._backends.base import Backend
from .._core.agree import Agreement, chosen_by_rank0, fail_together, resume_agreed
from .._state import MANIFEST_FILE, read_manifest, read_stored_manifest
from .._state.dcp_safe import check_dcp_folder
from .._state.fetch import download, keep_download, newest, release_downloads
from ..vocab import Kind

__all__ = ["CHECKPOINT_NAME", "RESUME_STATE_FILE", "lightning_resume_path", "release_downloads"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.ckpt"  # ray.train.lightning.RayTrainReportCallback.CHECKPOINT_NAME
RESUME_STATE_FILE = "resume_state.pt"
"""Beside a weights-only save: ``{"lr_schedulers": [...], "param_groups": [...]}``, what Lightning's
``weights_only=True`` file leaves out and a resume needs (the LR schedule; each optimizer's hyperparameters,
its learning rate among them, without its moments)."""
META_FILE = "meta.pt"  # Lightning's non-tensor state beside a DCP folder's shards (ModelParallelStrategy)


def _choose(fs: pafs.FileSystem, paths: Iterable[str],
            log: Callable[..., None] = logger.error) -> dict[str, Any] | None:
    """Rank 0: the newest complete Lightning checkpoint of ``paths`` (newest first), judged in storage."""

    def judge(path: str, is_newest: bool) -> dict[str, Any]:
        manifest = read_stored_manifest(fs, path)
        if manifest is not None:
            if not any(n == CHECKPOINT_NAME or n.startswith(CHECKPOINT_NAME + "/") for n in manifest["files"]):
                raise ValueError(f"not a Lightning checkpoint (no {CHECKPOINT_NAME})")
        elif fs.get_file_info(posixpath.join(path, CHECKPOINT_NAME)).type == pafs.FileType.NotFound:
            raise ValueError(f"not a Lightning checkpoint (no {CHECKPOINT_NAME})")
        return {"path": path, "manifest": manifest is not None,
                "kind": str(manifest["kind"]) if manifest else Kind.FULL.value,
                "step": manifest["step"] if manifest else None}

    return newest(paths, judge, log)


def lightning_resume_path(download_dir: str | None = None, *, backend: Backend | None = None,
                          timeout_s: float = 1800.0) -> str | None:
    """The run's newest complete checkpoint for ``trainer.fit(model, ckpt_path=...)``; ``None`` when the run
    has none (a fresh start). See :func:`ray_dyncheck.lightning.resume_path`."""
    return resume_agreed(lambda b, a: _resume_path(b, a, download_dir), backend, timeout_s)


def _resume_path(backend: Backend, agreement: Agreement, download_dir: str | None) -> str | None:
    rank = agreement.rank
    storage = backend.storage()
    choice = chosen_by_rank0(agreement, lambda: _choose(storage[0], backend.checkpoints()) if storage else None)
    if choice is None:
        return None
    ckpt, made, error, schedulers = None, [], None, True
    try:
        try:
            if storage is None:
                raise ValueError("this rank sees no run storage")
            fs = storage[0]
            root = choice["path"]
            if fs.type_name != "local":
                root = download(fs, choice["path"], prefix="dyncheck-resume-", dir=download_dir)
                made.append(root)
            if read_manifest(root) is None and choice["manifest"]:  # raises ValueError when incomplete
                raise ValueError(f"{root} has no {MANIFEST_FILE}")
            ckpt = os.path.join(root, CHECKPOINT_NAME)
            if os.path.isdir(ckpt) and not os.path.isfile(os.path.join(ckpt, ".metadata")):
                # Not DCP: DeepSpeedStrategy's folder, which Lightning hands to DeepSpeed's own loader as it
                # is (it unpickles its .pt files: see docs/lightning.md, Security).
                if rank == 0:
                    logger.warning("dyncheck: %s is not a DCP folder (DeepSpeed's?): handed over unchecked; "
                                   "DeepSpeed's loader trusts the storage", ckpt)
            elif os.path.isdir(ckpt):
                # ModelParallelStrategy's DCP folder: Lightning loads it with DCP's own reader, which
                # unpickles freely, and its meta.pt with torch.load, weights_only as fit() got it, or (a
                # Lightning that restores after setup passes none) torch's default: both checked here
                # first, so nothing from storage runs code.
                check_dcp_folder(ckpt)
                _check_meta(os.path.join(ckpt, META_FILE))
            elif not os.path.isfile(ckpt):
                raise ValueError(f"{root} has no {CHECKPOINT_NAME}")
            elif choice["kind"] == Kind.WEIGHTS:
                completed = tempfile.mkdtemp(prefix="dyncheck-resume-weights-", dir=download_dir)
                made.append(completed)
                ckpt, schedulers = _complete_weights(root, completed)
        except Exception as exc:
            logger.exception("dyncheck: rank %d could not get checkpoint %s", rank, choice["path"])
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
        fail_together(agreement, error, choice["path"])
    except BaseException:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        raise
    for path in made:
        keep_download(path)
    if rank == 0:
        if choice["kind"] == Kind.WEIGHTS:
            logger.warning("dyncheck: resuming Trainer from weights-only checkpoint %s at step %s: the optimizer "
                           "starts fresh%s; use on_interrupt: full for an exact resume", choice["path"],
                           choice["step"], "" if schedulers else ", and so does the LR schedule (none was kept)")
        else:
            logger.info("dyncheck: resuming Trainer from %s checkpoint %s (step %s)", choice["kind"], choice["path"],
                        choice["step"])
    return ckpt


def _complete_weights(root: str, into: str) -> tuple[str, bool]:
    """A weights-only checkpoint Lightning can resume from: Lightning's own ``weights_only=True`` file has no
    optimizer or scheduler states, and ``fit(ckpt_path=...)`` raises ``KeyError`` on it. The copy in ``into``
    has optimizer states without moments (a fresh optimizer, with the hyperparameters the save kept beside
    it) and the LR schedulers kept there; returns its path and whether they were kept. Read with
    ``weights_only=True``: nothing from storage runs code."""
    checkpoint = torch.load(os.path.join(root, CHECKPOINT_NAME), map_location="cpu", weights_only=True)
    file = os.path.join(root, RESUME_STATE_FILE)
    kept = torch.load(file, map_location="cpu", weights_only=True) if os.path.isfile(file) else {}
    # Each optimizer without moments but with its hyperparameters (a scheduler's state holds no learning
    # rate: without them the optimizer would go on from its initial one).
    checkpoint["optimizer_states"] = [{"state": {}, "param_groups": groups}
                                      for groups in kept.get("param_groups", [])]
    checkpoint["lr_schedulers"] = kept.get("lr_schedulers", [])
    path = os.path.join(into, CHECKPOINT_NAME)
    torch.save(checkpoint, path)
    return path, bool(kept)


def _check_meta(path: str) -> None:
    """Lightning's ``meta.pt`` beside a DCP folder, read as Lightning may read it, but refusing anything that
    would run code."""
    if not os.path.isfile(path):
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} holds more than tensors and plain containers, which would run code when "
                         f"loaded: refused ({exc})") from None
