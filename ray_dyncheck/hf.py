"""Hugging Face ``transformers.Trainer`` inside a Ray ``TorchTrainer``: the same on-demand checkpoints
with one callback.

Runs in every Ray Train worker, in the training thread. The callback drives the same core as
:class:`~ray_dyncheck.DynamicCheckpoint` (config, request channel, the one agreed decision); HF writes
its own ``checkpoint-N``; the callback reports it to Ray with our metadata.

Example (inside ``train_loop_per_worker``)::

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[rdc.DynamicCheckpointCallback(config["dynamic_checkpoint"])])
    trainer.train(resume_from_checkpoint=rdc.hf_resume_path())
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

from ._core import Backend, WorkerCore
from .config import DynamicCheckpointConfig, load_config
from .requests import Request
from .state import read_manifest, write_manifest

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "DynamicCheckpointCallback needs the Hugging Face extra: pip install 'ray_dyncheck[transformers]' "
        f"(transformers and accelerate). The import failed with: {exc}"
    ) from exc

__all__ = ["DynamicCheckpointCallback", "hf_resume_path"]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
TRAINER_STATE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
STAGING_DIR = ".dyncheck-staging"
_RANK_FILE = re.compile(r"^rng_state_(\d+)\.pth$")

# What hf_resume_path() handed out in this process; on_train_begin finishes a weights-only resume.
_resumed: dict[str, Any] = {}


@dataclass
class _Pending:
    """A save the agreed decision asked HF for, until ``on_save`` reports it."""

    kind: str
    reason: str
    requests: list[Request] = field(default_factory=list)
    t0: float = 0.0


class DynamicCheckpointCallback(TrainerCallback):
    """On-demand checkpoints for ``transformers.Trainer`` in a Ray ``TorchTrainer`` worker.

    Add it on **every** rank. At each check (``check_interval`` optimizer steps, or ``auto``) all ranks
    agree on one decision; on "save" it sets ``control.should_save`` and HF writes its usual
    ``checkpoint-N`` (model, optimizer, scheduler, RNG, trainer state). In ``on_save`` every rank
    reports its share of that directory with ``ray.train.report`` (rank 0 the checkpoint, each other
    rank its own ``rng_state_<rank>.pth``), with our metadata (``kind``, ``step``, ``reason``,
    ``request_id``), for HF's scheduled saves too. It therefore **replaces** Ray's
    ``RayTrainReportCallback`` (which cannot attach metadata): do not install both, or every save is
    reported twice (it warns when it sees both). HF's ``save_steps`` / ``save_strategy`` stay the
    schedule; the ``save_steps`` key of the ``dynamic_checkpoint`` block is ignored here.

    A weights-only save (the interrupt's default) switches ``args.save_only_model`` on for that one
    save and restores it right after; the checkpoint also carries ``scheduler.pt``, so
    :func:`hf_resume_path` continues at its step with the LR schedule where it was and a fresh
    optimizer (logged).

    The trigger file and request folder are in the Ray run directory, not in ``output_dir``.

    Args:
        config: The ``dynamic_checkpoint`` block (dict, YAML path or config), ``None`` for defaults.
        backend: Where to report; default: Ray Train (this must run inside a Ray Train worker).
    """

    def __init__(self, config: DynamicCheckpointConfig | Mapping[str, Any] | str | None = None, *,
                 backend: Backend | None = None) -> None:
        self.config = load_config(config)
        self._backend = backend
        self._core: WorkerCore | None = None
        self._pending: _Pending | None = None
        self._only_model_before: bool | None = None
        self._saved_step: int | None = None
        self.saves: list[dict[str, Any]] = []
        """Rank 0: one entry per reported save (step, kind, reason, requests, name, path once stored)."""

    # -- HF events (every rank) ----------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        _warn_about_ray_report_callback(self)
        if self.config.save_steps is not None and state.is_world_process_zero:
            logger.warning("dyncheck: dynamic_checkpoint.save_steps=%d is ignored with the HF callback: HF's "
                           "save_steps/save_strategy are the schedule", self.config.save_steps)
        if self._core is None:
            backend = self._backend
            if backend is None:
                from ._ray import RayBackend

                backend = RayBackend()
            self._core = WorkerCore(self.config, backend, self.saves)  # collective: every rank is here
        self._core.start_at(state.global_step)
        _finish_weights_resume(state, kwargs.get("lr_scheduler"))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        core = self._core
        if core is None:
            return
        step = state.global_step
        scheduled = bool(control.should_save)  # set by HF's own schedule (DefaultFlowCallback runs first)
        if self._pending is not None:
            # HF did not save when asked (save_strategy="best" re-decides should_save after an
            # evaluation): ask again rather than lose the request.
            control.should_save = True
        decision, requests = core.check(step)
        saving = decision is not None and decision.save
        if saving:
            assert decision is not None
            kind = "full" if scheduled else decision.kind or "full"
            if self._pending is not None:  # merge with the save HF still owes us
                requests = self._pending.requests + requests
                kind = "full" if "full" in (kind, self._pending.kind) else kind
            self._pending = _Pending(kind, decision.reason, requests, time.perf_counter())
            control.should_save = True
            self._set_only_model(args, kind == "weights")
        if core.finish(decision, requests, step, saved=saving):
            control.should_training_stop = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if control.should_save and self._saved_step == state.global_step and self._pending is None:
            # save_strategy="epoch" asks for the step we just saved: one save per step. A second one
            # would also rewrite checkpoint-N in place while its upload may still read it.
            control.should_save = False

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        core = self._core
        if core is None:
            return
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None:
            kind, reason, requests, t0 = pending.kind, pending.reason, pending.requests, pending.t0
        else:
            kind = "weights" if args.save_only_model else "full"
            reason, requests = "schedule", []
        self._restore_only_model(args)
        step = state.global_step
        output_dir = str(args.output_dir)
        source = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}-{step}")
        directory, error = None, None
        try:
            directory = self._stage(source, output_dir, step, kind, kwargs.get("lr_scheduler"))
        except Exception as exc:
            logger.exception("dyncheck: rank %d could not stage %s for Ray", core.rank, source)
            error = f"rank {core.rank}: {type(exc).__name__}: {exc}"
        # One rank's error means no rank passes its files: half a checkpoint is never reported.
        failed = core.agreement.any_rank(error is not None)
        if failed and directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
            directory = None
        if failed and error is None:
            error = "another rank could not stage its files (see its log)"
        metrics: dict[str, Any] = {}
        for log in state.log_history:  # the latest value of each logged metric, as Ray's callback does
            metrics.update({k: v for k, v in log.items() if isinstance(v, (int, float))})
        core.report(step=step, kind=kind, reason=reason, requests=requests, directory=directory,
                    error=error, metrics=metrics, t0=t0)
        self._saved_step = step
        core.end_step()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._core is None:
            return
        if self._pending is not None:
            self._restore_only_model(args)
            pending, self._pending = self._pending, None
            self._core.abandon(pending.requests, state.global_step, pending.kind, pending.reason,
                               "training ended before Trainer saved the checkpoint it was asked for")
        self._core.close()
        self._core = None

    # -- helpers -------------------------------------------------------------------------------

    def _set_only_model(self, args: TrainingArguments, only_model: bool) -> None:
        if self._only_model_before is None:
            self._only_model_before = bool(args.save_only_model)
        args.save_only_model = only_model

    def _restore_only_model(self, args: TrainingArguments) -> None:
        if self._only_model_before is not None:
            args.save_only_model = self._only_model_before
            self._only_model_before = None

    def _stage(self, source: str, output_dir: str, step: int, kind: str, lr_scheduler: Any) -> str | None:
        """This rank's share of HF's ``checkpoint-N``, hard-linked (or copied) into a directory of its own
        that the backend deletes once it is stored. ``None`` when this rank has nothing to add."""
        core = self._core
        assert core is not None
        rank, merged = core.rank, core.backend.merges_rank_dirs
        if not os.path.isdir(source):
            if rank == 0:
                raise FileNotFoundError(f"Trainer saved no {source} (is output_dir the same on every rank?)")
            return None
        names = []
        for name in sorted(os.listdir(source)):
            m = _RANK_FILE.match(name)
            owner = int(m.group(1)) if m else 0
            if owner == rank or (rank == 0 and not merged):
                names.append(name)
        if not names:
            return None
        root = os.path.join(output_dir, STAGING_DIR)
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f"step{step}-rank{rank}-", dir=root)
        try:
            for name in names:
                _link_or_copy(os.path.join(source, name), os.path.join(staging, name))
            if rank == 0:
                if kind == "weights" and lr_scheduler is not None and not os.path.exists(
                        os.path.join(staging, SCHEDULER_FILE)):
                    # HF's save_only_model leaves the scheduler out; it is small, and without it a
                    # resume would restart the LR schedule at its first step.
                    torch.save(lr_scheduler.state_dict(), os.path.join(staging, SCHEDULER_FILE))
                _write_manifest(staging, kind, step, core.world_size)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst)
        for name in os.listdir(src):
            _link_or_copy(os.path.join(src, name), os.path.join(dst, name))
        return
    try:
        os.link(src, dst)  # same filesystem: no copy of a multi-GB model
    except OSError:
        shutil.copy2(src, dst)


def _write_manifest(directory: str, kind: str, step: int, world_size: int) -> None:
    files = [os.path.relpath(os.path.join(base, name), directory)
             for base, _dirs, names in os.walk(directory) for name in names]
    write_manifest(directory, files, kind=kind, step=step, world_size=world_size, layout="transformers")


def _warn_about_ray_report_callback(me: TrainerCallback) -> None:
    # Callbacks are not told about each other; the CallbackHandler calling us holds the list.
    frame: FrameType | None = sys._getframe(1)
    for _ in range(4):
        if frame is None:
            return
        handler = frame.f_locals.get("self")
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and any(cb is me for cb in callbacks):
            if any(c.__name__ == "RayTrainReportCallback" for cb in callbacks for c in type(cb).__mro__):
                logger.warning("dyncheck: both DynamicCheckpointCallback and Ray's RayTrainReportCallback "
                               "are installed: every save is reported twice. DynamicCheckpointCallback "
                               "replaces it; remove RayTrainReportCallback")
            return
        frame = frame.f_back


def _finish_weights_resume(state: TrainerState, lr_scheduler: Any) -> None:
    """After HF resumed from a weights-only checkpoint: HF restored the step and weights; restore the
    LR schedule (HF loads it only together with an optimizer) and say the optimizer is fresh."""
    if _resumed.get("kind") != "weights" or _resumed.get("step") != state.global_step:
        return
    path = os.path.join(_resumed["path"], SCHEDULER_FILE)
    if lr_scheduler is not None and os.path.isfile(path):
        lr_scheduler.load_state_dict(torch.load(path, weights_only=True))
    if state.is_world_process_zero:
        logger.warning("dyncheck: resumed from a weights-only checkpoint at step %d: optimizer state "
                       "starts fresh%s; use on_interrupt: full for an exact resume", state.global_step,
                       "" if os.path.isfile(path) else ", and so does the LR schedule (no scheduler.pt)")


def hf_resume_path(download_dir: str | None = None) -> str | None:
    """The run's newest complete checkpoint as a local directory for
    ``Trainer.train(resume_from_checkpoint=...)``; ``None`` when the run has none (a fresh start).

    Runs in a Ray Train worker, on every rank. Checkpoints on remote storage are downloaded into
    ``download_dir`` (default: a new temporary directory). Also accepts checkpoints written by Ray's
    ``RayTrainReportCallback`` (HF's files in a ``checkpoint/`` subfolder). A weights-only checkpoint
    resumes at its step with a fresh optimizer; the callback restores its LR schedule and logs it.
    """
    import ray.train

    from ._ray import newest_first

    for ckpt in newest_first():
        if ckpt.filesystem is None or ckpt.filesystem.type_name == "local":
            local = ckpt.path
        else:
            local = ckpt.to_directory(tempfile.mkdtemp(prefix="dyncheck-resume-", dir=download_dir))
        try:
            manifest = read_manifest(local)
        except ValueError as exc:
            logger.error("dyncheck: skipping checkpoint: %s", exc)
            continue
        if manifest is None and os.path.isfile(os.path.join(local, CHECKPOINT_PREFIX, TRAINER_STATE)):
            local = os.path.join(local, CHECKPOINT_PREFIX)  # Ray's RayTrainReportCallback layout
        if not os.path.isfile(os.path.join(local, TRAINER_STATE)):
            logger.warning("dyncheck: checkpoint %s is not a Hugging Face Trainer checkpoint (no %s); "
                           "skipping it", ckpt.path, TRAINER_STATE)
            continue
        kind = manifest["kind"] if manifest else "full"
        step = manifest["step"] if manifest else None
        _resumed.clear()
        _resumed.update(path=local, kind=kind, step=step)
        if ray.train.get_context().get_world_rank() == 0:
            logger.info("dyncheck: resuming Trainer from %s checkpoint %s (step %s)", kind, ckpt.path, step)
        return local
    return None
