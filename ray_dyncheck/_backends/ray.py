"""The Ray Train adapter: report, storage and checkpoints of the current Ray Train worker."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from typing import Any, ContextManager

import pyarrow.fs as pafs
import ray.train
from ray.train import Checkpoint, CheckpointUploadMode

from .._requests.files import on_network_filesystem
from .._state.memory import MemoryStore
from ..errors import CheckpointUploadError
from .base import Backend, Notice, OnDone
from .metrics import Metrics

logger = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 1.0


class RayBackend(Backend):
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
        self._internal = _internal_context()
        self._info: Any = None
        self._notice: Notice | None = None
        self.metrics: Metrics | None = None
        if self.rank == 0:
            run_id = getattr(getattr(self._internal, "train_run_context", None), "run_id", "") or ""
            self.metrics = RayMetrics(self.context.get_experiment_name(), run_id)

    def preemption(self) -> Notice | None:
        """This worker's copy of Ray's preemption notice: the watcher marks every worker of the group
        (an attribute read here; ``ray.train.get_preemption_info()`` is a collective round trip)."""
        if self._internal is None:
            return None
        info = self._internal.preemption_context.preemption_info
        if info is not self._info:
            self._info = info
            self._notice = None if info is None else Notice(
                deadline=info.deadline_ms / 1000 if info.deadline_ms else None,
                ranks=tuple(info.preempted_ranks), nodes=tuple(info.preempted_node_ids))
        return self._notice

    def node_local(self, path: str) -> bool:
        """A local path on a disk of this node only, in a cluster of more than one node."""
        try:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        except Exception:
            return False
        return nodes > 1 and not on_network_filesystem(path)

    def memory(self) -> MemoryStore | None:
        """The memory holders ``rdc.fit`` started for this job, or ``None`` (a plain ``trainer.fit()``)."""
        from .holders import RayMemoryStore

        storage = self.storage()
        return RayMemoryStore.find(storage[1] if storage is not None else self.context.get_experiment_name())

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


def _internal_context() -> Any:
    """Ray Train's internal context of this worker (it holds the preemption notice), or ``None``."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        context = get_train_context()
        return context if hasattr(context, "preemption_context") else None
    except Exception:  # another Ray version, or Ray Train's local mode
        logger.info("dyncheck: Ray's preemption notices are not readable here; saving on preemption is off",
                    exc_info=True)
        return None


BLOCKED_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
COMMIT_BUCKETS = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]


class RayMetrics(Metrics):
    """Rank 0's events as Ray metrics (``ray.util.metrics``): the node's Prometheus endpoint, the
    dashboard's Metrics view, Grafana. Tagged with Ray Train's own run tags. See ``_metrics.py``."""

    def __init__(self, run_name: str, run_id: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self._tags = {"ray_train_run_name": run_name, "ray_train_run_id": run_id}
        base = tuple(self._tags)
        self._requests = Counter("dyncheck_requests", "Requests claimed and preemption notices seen, by source.",
                                 tag_keys=(*base, "source"))
        self._checkpoints = Counter("dyncheck_checkpoints", "Checkpoints committed, by kind and reason.",
                                    tag_keys=(*base, "kind", "reason"))
        self._failures = Counter("dyncheck_save_failures", "Saves that committed no checkpoint.",
                                 tag_keys=(*base, "kind", "reason"))
        self._blocked = Histogram("dyncheck_save_blocked_seconds", "Training time blocked by one save.",
                                  boundaries=BLOCKED_BUCKETS, tag_keys=(*base, "kind"))
        self._to_commit = Histogram("dyncheck_request_to_commit_seconds",
                                    "Seconds from a request (or the decision to save) to the commit.",
                                    boundaries=COMMIT_BUCKETS, tag_keys=(*base, "kind", "reason"))
        self._pending = Gauge("dyncheck_pending_requests", "Requests waiting for the next check.", tag_keys=base)
        self._interval = Gauge("dyncheck_check_interval_steps", "Steps between two checks.", tag_keys=base)
        self._at_risk = Gauge("dyncheck_steps_since_commit",
                              "Steps since the step of the newest committed checkpoint (work at risk).",
                              tag_keys=base)
        self._snapshot_age = Gauge("dyncheck_snapshot_age_steps",
                                   "At each memory snapshot: steps since the newest complete one.", tag_keys=base)
        self._snapshot_bytes = Gauge("dyncheck_snapshot_bytes", "Bytes of memory snapshots held, per node.",
                                     tag_keys=(*base, "node"))
        self._restores = Counter("dyncheck_restores", "Resumes, by source (memory or storage).",
                                 tag_keys=(*base, "source"))
        self._failed_once = False

    def _record(self, fn: Any, value: float, **tags: str) -> None:
        try:
            fn(value, tags={**self._tags, **tags})
        except Exception:  # a metric never costs a step
            if not self._failed_once:
                self._failed_once = True
                logger.warning("dyncheck: could not record a metric", exc_info=True)

    def request(self, source: str) -> None:
        self._record(self._requests.inc, 1.0, source=source)

    def blocked(self, kind: str, seconds: float) -> None:
        self._record(self._blocked.observe, seconds, kind=kind)

    def committed(self, kind: str, reason: str, seconds: float) -> None:
        self._record(self._checkpoints.inc, 1.0, kind=kind, reason=reason)
        self._record(self._to_commit.observe, seconds, kind=kind, reason=reason)

    def failed(self, kind: str, reason: str) -> None:
        self._record(self._failures.inc, 1.0, kind=kind, reason=reason)

    def check(self, pending: int, interval: int, steps_at_risk: int) -> None:
        self._record(self._pending.set, pending)
        self._record(self._interval.set, interval)
        self._record(self._at_risk.set, steps_at_risk)

    def snapshot_age(self, steps: int) -> None:
        self._record(self._snapshot_age.set, steps)

    def snapshot_held(self, held: Mapping[str, int]) -> None:
        for node, size in held.items():
            self._record(self._snapshot_bytes.set, size, node=node)

    def restored(self, source: str) -> None:
        self._record(self._restores.inc, 1.0, source=source)
