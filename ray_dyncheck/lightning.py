"""PyTorch Lightning inside a Ray ``TorchTrainer``: the same on-demand checkpoints with one callback.

Runs in every Ray Train worker, in the training thread. The callback drives the same core as
:class:`~ray_dyncheck.DynamicCheckpoint` (config, request channel, the one agreed decision); Lightning
writes its own checkpoint through ``trainer.save_checkpoint``; the callback reports every rank's files of
it to Ray with our metadata.

Example (inside ``train_loop_per_worker``)::

    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
    from ray_dyncheck.lightning import DynamicCheckpointCallback, resume_path

    trainer = pl.Trainer(strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()], devices="auto",
                         callbacks=[DynamicCheckpointCallback(config["dynamic_checkpoint"])])
    trainer = prepare_trainer(trainer)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=resume_path())

``lightning`` is imported as Ray's ``ray.train.lightning`` imports it: ``lightning.pytorch``, else the
``pytorch_lightning`` package.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from ._backends.base import Backend, require
from ._core import Plan, WorkerCore
from ._lightning.framework import RayModelParallelStrategy, Recording, pl
from ._lightning.resume import CHECKPOINT_NAME, RESUME_STATE_FILE, lightning_resume_path, release_downloads
from ._state.staging import mine, stage_share
from .config import DynamicCheckpointConfig, load_config
from .vocab import Kind

__all__ = ["DynamicCheckpointCallback", "RayModelParallelStrategy", "resume_path"]

logger = logging.getLogger(__name__)

STAGING_DIR = "dyncheck-lightning"
_SHARDED = tuple(getattr(pl.strategies, name) for name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
                 if hasattr(pl.strategies, name))


def resume_path(download_dir: str | None = None, *, backend: Backend | None = None,
                timeout_s: float = 1800.0) -> str | None:
    """The run's newest complete checkpoint for ``trainer.fit(model, ckpt_path=resume_path())``; ``None``
    when the run has none (a fresh start).

    Runs in a Ray Train worker, on **every** rank, before ``trainer.fit``. Rank 0 chooses the newest checkpoint
    whose manifest's files (every rank's) are all there; every rank then uses that one, downloaded into a new
    temporary directory (in ``download_dir``) when the storage is remote, and checked: a DCP folder
    (``ModelParallelStrategy``) is read with the safe reader first, so nothing from storage runs code when
    Lightning loads it. Also accepts checkpoints written by Ray's ``RayTrainReportCallback``. A weights-only
    checkpoint (the interrupt's default) is handed over as a copy Lightning can resume from: its step, loop and
    data loader state, weights, LR schedulers, optimizer hyperparameters and a fresh optimizer (logged).
    Downloads go once training starts (Lightning has read them by then).

    Lightning loads the ``.ckpt`` file itself with ``torch.load``; pass ``weights_only=True`` to
    ``trainer.fit`` so that it unpickles nothing but tensors and plain containers (see docs/lightning.md).

    Raises:
        CheckpointRestoreError: on every rank, with the same message, when any rank could not list,
            download or check the checkpoint (no rank trains on from it).
    """
    return lightning_resume_path(download_dir, backend=backend, timeout_s=timeout_s)


class DynamicCheckpointCallback(pl.Callback):  # type: ignore[misc,name-defined]
    """On-demand checkpoints for a Lightning ``Trainer`` in a Ray ``TorchTrainer`` worker.

    Add it on **every** rank, in place of Ray's ``RayTrainReportCallback`` (which reports at epoch ends only and
    cannot attach metadata; with both, checkpoints are reported twice). At optimizer-step boundaries (gradient
    accumulation respected: ``trainer.global_step`` moved), every ``check_interval`` steps or ``auto``, all
    ranks agree on one decision; on "save" every rank calls ``trainer.save_checkpoint(..., weights_only=kind ==
    "weights")`` mid-epoch, and reports the files it wrote (rank 0 the ``.ckpt`` and the manifest of every
    rank's files; under ``ModelParallelStrategy`` each rank its DCP shard) with ``ray.train.report`` and our
    metadata (``kind``, ``step``, ``reason``, ``request_id``). A weights-only save keeps the LR schedulers and
    optimizer hyperparameters beside the file; under a sharded strategy (FSDP, ``ModelParallelStrategy``,
    DeepSpeed) it saves the full state instead (every rank writes its shard either way, and a weights-only shard
    set cannot feed Lightning's resume). A stop (the driver's interrupt) sets ``trainer.should_stop``.

    ``save_steps`` in the block is a schedule, as for the hook: a full save every that many optimizer steps,
    reported like the others (``reason: schedule``), what Ray's callback's epoch-end saves were for.

    A request that arrives while validation runs is checked at the validation loop's end (the point where
    Lightning's own ``ModelCheckpoint`` saves: the loop state is whole there), whatever the interval.

    Resume with ``trainer.fit(model, ckpt_path=resume_path())``: Lightning continues at the same batch when
    the training data loader is stateful (``state_dict``/``load_state_dict``, e.g. torchdata's
    ``StatefulDataLoader``); else at the start of that epoch's remaining steps' count, with its own warning.

    Args:
        config: The ``dynamic_checkpoint`` block (dict, YAML path or config), ``None`` for defaults.
        backend: Where to report; default: Ray Train (this must run inside a Ray Train worker).
    """

    def __init__(self, config: DynamicCheckpointConfig | Mapping[str, Any] | str | None = None, *,
                 backend: Backend | None = None) -> None:
        super().__init__()
        self.config = load_config(config)
        self._backend = backend if backend is None else require(backend)
        self._core: WorkerCore | None = None
        self._last_step: int | None = None
        self._boundary = True
        """The last training batch ended an optimizer step (every rank alike)."""
        self._widened = False
        self.saves: list[dict[str, Any]] = []
        """Rank 0: one entry per reported save (step, kind, reason, requests, name, path once stored)."""

    @property
    def state_key(self) -> str:
        return "ray_dyncheck.DynamicCheckpointCallback"

    # -- Lightning events (every rank) -------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._core is not None:
            self._release(clean=False)  # an earlier fit() that raised before its teardown
        backend = self._backend
        if backend is None:
            from ._backends.ray import RayBackend

            backend = RayBackend()
        self._core = WorkerCore(self.config, backend, self.saves)  # collective: every rank is here

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        release_downloads()  # Lightning has read the checkpoint it resumed from
        if self._core is not None:
            self._last_step = trainer.global_step
            self._boundary = True
            self._core.start_at(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._boundary = step != self._last_step  # the same on every rank: the same batches, the same steps
        if self._core is None or not self._boundary:
            return  # accumulating gradients: not an optimizer step's end
        self._last_step = step
        scheduled = self.config.save_steps is not None and step % self.config.save_steps == 0
        if not scheduled and self._core.tick(step):
            return  # most steps: no check due, no schedule
        self._check(trainer, step, schedule=scheduled)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._core is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return  # a validation inside fit() only (a core exists only then)
        if getattr(trainer, "_val_check_time_interval", None) is not None:
            # val_check_interval as a time: each rank decides on its own clock when to validate, so the
            # ranks may not be here together; the regular checks only.
            return
        if not self._boundary:
            return  # mid-accumulation: the gradients so far would be in no checkpoint
        self._check(trainer, trainer.global_step, now=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._release(clean=True)  # a normal end: requests no check served get "unserved"

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release(clean=False)  # claims stay, for a restarted worker group
        release_downloads()  # Lightning calls no teardown hook when fit() raises

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._release(clean=False)
        release_downloads()

    def close(self) -> None:
        """Release what the callback holds (its core's threads and side group, a resume's download);
        Lightning's ``on_train_end``, ``on_exception`` and ``teardown`` do it, so only a caller who ends
        training another way needs this."""
        self._release(clean=False)
        release_downloads()

    # -- helpers -------------------------------------------------------------------------------

    def _release(self, clean: bool) -> None:
        core, self._core = self._core, None
        if core is not None:
            core.close(clean=clean)
        elif self._backend is not None:
            self._backend.close(timeout=0.0)

    def _check(self, trainer: Any, step: int, *, now: bool = False, schedule: bool = False) -> None:
        core = self._core
        assert core is not None
        plan = core.check(step, now=now, schedule=schedule)
        if plan is not None and plan.save:
            self._save(trainer, plan)
        if plan is not None and plan.stop:
            trainer.should_stop = True
        core.end_step()

    def _save(self, trainer: Any, plan: Plan) -> None:
        """Every rank: Lightning writes its checkpoint into one folder (rank 0's, the same name on every
        node), each rank stages the files it owns, and every rank reports; an error on any rank means no
        rank reports files (half a checkpoint is never reported)."""
        core = self._core
        assert core is not None
        if plan.kind == Kind.WEIGHTS and isinstance(trainer.strategy, _SHARDED):
            if not self._widened and core.rank == 0:
                logger.warning("dyncheck: %s writes every rank's shard: weights-only saves are full ones under "
                               "it (a weights-only shard set cannot feed Lightning's resume)",
                               type(trainer.strategy).__name__)
            self._widened = True
            plan = plan.at_least(Kind.FULL)
        kind = plan.kind
        assert kind is not None
        root = os.path.join(tempfile.gettempdir(), f"{STAGING_DIR}-{os.getuid()}")
        made: tuple[str | None, str | None] = (None, None)
        if core.rank == 0:
            try:
                os.makedirs(root, exist_ok=True)
                made = (tempfile.mkdtemp(prefix=f"step{plan.step}-", dir=root), None)
            except Exception as exc:
                logger.exception("dyncheck: rank 0 could not make a folder in %s for the save at step %d", root,
                                 plan.step)
                made = (None, f"rank 0: {type(exc).__name__}: {exc}")
        # One folder name on every rank (Lightning's sharded saves write into rank 0's), or rank 0's error.
        agreed: Any = core.agreement.broadcast(made)
        source: str | None = agreed[0]
        error: str | None = agreed[1]
        directory = None
        try:
            files, metrics = {}, {}
            if error is None:
                try:
                    files = self._write(trainer, str(source), kind, core.rank)
                    metrics = _metrics(trainer, plan.step)
                except Exception as exc:
                    logger.exception("dyncheck: rank %d could not save its checkpoint at step %d", core.rank,
                                     plan.step)
                    error = f"rank {core.rank}: {type(exc).__name__}: {exc}"
            gathered: list[Any] = core.agreement.all_gather((files, error))  # every rank's files and errors
            errors = sorted({e for _, e in gathered if e is not None})
            if errors:
                error = "; ".join(errors)  # the same on every rank: nobody passes files
            else:
                try:
                    directory = stage_share(str(source), root, step=plan.step, kind=kind,
                                            shares=[f for f, _ in gathered], rank=core.rank,
                                            world_size=core.world_size, merged=core.backend.merges_rank_dirs,
                                            backend_name=type(core.backend).__name__, layout="lightning")
                except Exception as exc:
                    logger.exception("dyncheck: rank %d could not stage its checkpoint files", core.rank)
                    error = f"rank {core.rank}: {type(exc).__name__}: {exc}"
                error = core.agreement.shared_error(error, "stage its files")  # also: every rank has staged
                if error is not None and directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
                    directory = None
        except BaseException:
            if directory is not None:  # a peer is gone: the error goes on up, the staged files go now
                shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            if source is not None:
                shutil.rmtree(str(source), ignore_errors=True)  # staged as links; this node's ranks are past it
        core.report(plan, directory, metrics, error=error)

    def _write(self, trainer: Any, source: str, kind: str, rank: int) -> dict[str, int]:
        """This rank's part of Lightning's save into ``source``; returns the files it owns there."""
        os.makedirs(source, exist_ok=True)
        strategy = trainer.strategy
        recording = Recording(strategy.checkpoint_io)
        before = strategy.checkpoint_io
        # A write that fails on one rank must not leave the others in Lightning's barrier at the end of
        # save_checkpoint: our all_gather right after it is the barrier (every rank's files are written
        # by then), and it carries the error to every rank.
        own_barrier = strategy.__dict__.get("barrier")  # None: the class's method
        strategy.checkpoint_io, strategy.barrier = recording, _no_barrier
        try:
            trainer.save_checkpoint(os.path.join(source, CHECKPOINT_NAME), weights_only=kind == Kind.WEIGHTS)
        finally:
            strategy.checkpoint_io = before
            if own_barrier is None:
                del strategy.barrier
            else:
                strategy.barrier = own_barrier
        if recording.error is not None:
            raise recording.error
        if kind == Kind.WEIGHTS and rank == 0:
            # Lightning's weights_only file has no optimizer or scheduler state: the LR schedule and each
            # optimizer's hyperparameters (its learning rate among them; not its moments) go beside it.
            torch.save({"lr_schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                        "param_groups": [o.state_dict()["param_groups"] for o in trainer.optimizers]},
                       os.path.join(source, RESUME_STATE_FILE))
        return mine(source, rank)


def _no_barrier(*args: Any, **kwargs: Any) -> None:
    return None


def _metrics(trainer: Any, step: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()
                               if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)}
    metrics.update(epoch=trainer.current_epoch, step=step)
    return metrics
