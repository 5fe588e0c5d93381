"""The Ray Train adapter: report, storage and checkpoints of the current Ray Train worker."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from typing import Any, ContextManager

import pyarrow.fs as pafs
import ray.train
from ray.train import Checkpoint, CheckpointUploadMode

from ._core import OnDone

logger = logging.getLogger(__name__)


class RayBackend:
    """Runs in a Ray Train worker (inside ``train_loop_per_worker``).

    Checkpoints are reported with ``checkpoint_upload_mode=ASYNC`` so training is blocked only for
    the local write; the upload goes through our ``checkpoint_upload_fn``, which tells the hook when
    the files are in the run's storage (so receipts are written only then). Ray waits for pending
    uploads when the training function returns. Every rank's directory is copied into the same
    checkpoint directory (Ray syncs rank 0's name to all ranks); only rank 0's carries the metadata.
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

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone) -> None:
        if directory is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        checkpoint = Checkpoint.from_directory(directory)
        if self.rank == 0:  # one writer of .metadata.json; the other ranks' copies would differ in time
            checkpoint.set_metadata(metadata)
        storage = self.context.get_storage()

        def upload(ckpt: Checkpoint, dir_name: str) -> Checkpoint:
            try:
                persisted = storage.persist_current_checkpoint(ckpt, dir_name)
            except BaseException as exc:
                on_done(None, exc)
                raise
            # Deleted here, not by Ray after we return: once on_done has run, close() may return and
            # the user may remove the folder the staged files sit in (a temporary output_dir).
            shutil.rmtree(directory, ignore_errors=True)
            on_done(persisted.path, None)
            return persisted

        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=False, checkpoint_upload_fn=upload)

    def checkpoints(self) -> Iterator[ContextManager[str]]:
        for checkpoint in newest_first():
            yield checkpoint.as_directory()


def newest_first() -> Iterator[Checkpoint]:
    """The run's reported checkpoints, newest first (in a Ray Train worker)."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return
    yield latest
    # Only reached when the newest was incomplete: walk back through the others.
    for item in reversed(ray.train.get_all_reported_checkpoints()):
        if item.checkpoint.path != latest.path:
            yield item.checkpoint
