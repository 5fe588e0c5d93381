"""The Ray Train adapter: report, storage and checkpoints of the current Ray Train worker."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any, ContextManager

import pyarrow.fs as pafs
import ray.train
from ray.train import Checkpoint, CheckpointUploadMode

from ._core import OnDone
from .errors import CheckpointUploadError

logger = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 1.0


class RayBackend:
    """Runs in a Ray Train worker (inside ``train_loop_per_worker``).

    Checkpoints are reported with ``checkpoint_upload_mode=ASYNC`` as soon as the state is copied;
    the upload goes through our ``checkpoint_upload_fn``, which first waits for the background write
    of this rank's files (no collective in there: the writers' own run in their thread), retries the
    upload itself
    and tells the hook once, when the files are finally stored or finally failed (Ray's own retry
    would call it again after a failure, and a receipt must never say ``error`` then ``ok``). A final
    failure raises :class:`~ray_dyncheck.errors.CheckpointUploadError`: Ray fails the worker group
    and ``FailureConfig`` decides. Ray waits for pending uploads when the training function
    returns. Every rank's directory is copied into the same checkpoint directory (Ray syncs rank 0's
    name to all ranks); only rank 0's carries the metadata.
    """

    merges_rank_dirs = True

    def __init__(self) -> None:
        self.context = ray.train.get_context()
        self.rank = self.context.get_world_rank()
        self.world_size = self.context.get_world_size()

    def storage(self) -> tuple[pafs.FileSystem, str] | None:
        try:
            storage = self.context.get_storage()
        except NotImplementedError:  # Ray Train local mode (num_workers=0)
            return None
        return storage.storage_filesystem, storage.experiment_fs_path

    def prepare(self, directory: str, metadata: dict[str, Any]) -> None:
        # One writer of .metadata.json (rank 0); the other ranks' copies would differ in time.
        Checkpoint.from_directory(directory).set_metadata(metadata)

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone, written: Future[Any] | None = None) -> None:
        if directory is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        storage = self.context.get_storage()

        def upload(ckpt: Checkpoint, dir_name: str) -> Checkpoint:
            if written is not None:  # a background save: its files first (no collective in here)
                try:
                    written.result()
                except Exception as exc:
                    on_done(None, exc)
                    shutil.rmtree(directory, ignore_errors=True)
                    raise CheckpointUploadError(f"checkpoint {dir_name} could not be written (the cause "
                                                "follows)") from exc
            for attempt in range(1, UPLOAD_ATTEMPTS + 1):
                try:
                    persisted = storage.persist_current_checkpoint(ckpt, dir_name)
                    break
                except Exception as exc:
                    if attempt < UPLOAD_ATTEMPTS:
                        logger.warning("dyncheck: upload of %s failed (attempt %d of %d): %s: %s; retrying",
                                       dir_name, attempt, UPLOAD_ATTEMPTS, type(exc).__name__, exc)
                        time.sleep(UPLOAD_BACKOFF_S * attempt)
                        continue
                    on_done(None, exc)
                    shutil.rmtree(directory, ignore_errors=True)
                    raise CheckpointUploadError(
                        f"checkpoint {dir_name} could not be stored after {UPLOAD_ATTEMPTS} attempts "
                        "(the cause follows)") from exc
            # Deleted here, not by Ray after we return: once on_done has run, close() may return and
            # the user may remove the folder the staged files sit in (a temporary output_dir).
            shutil.rmtree(directory, ignore_errors=True)
            on_done(persisted.path, None)
            return persisted

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory), checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=False, checkpoint_upload_fn=upload)

    def committed(self, path: str, timeout: float) -> bool:
        # Each call waits until the controller has processed every report this worker made so far;
        # a report made meanwhile moves that target, so ask in short rounds until ours is listed.
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            items = ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=max(0.1, min(10.0, left)))
            if any(item.checkpoint.path == path for item in items):
                return True
            if time.monotonic() >= deadline:
                return False

    def checkpoints(self) -> Iterator[str]:
        for checkpoint in newest_first():
            yield checkpoint.path

    def open(self, path: str) -> ContextManager[str]:
        storage = self.context.get_storage()
        return Checkpoint(path, filesystem=storage.storage_filesystem).as_directory()


def newest_first() -> Iterator[Checkpoint]:
    """The run's registered checkpoints, newest first (in a Ray Train worker)."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return
    yield latest
    # Only reached when the newest was unusable: walk back through the others.
    for item in reversed(ray.train.get_all_reported_checkpoints()):
        if item.checkpoint.path != latest.path:
            yield item.checkpoint
