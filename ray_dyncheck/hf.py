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
import shutil
import threading
from collections.abc import Mapping
from typing import Any

from ._backends.base import Backend, require
from ._core import Plan, WorkerCore
from ._hf.files import CHECKPOINT_PREFIX, share, stage
from ._hf.registry import close_core, forget, release_leftovers, track
from ._hf.resume import hf_resume_path, release_downloads, weights_resume
from ._hf.sharding import sharded_layout
from .config import DynamicCheckpointConfig, load_config
from .vocab import Kind, Reason

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "DynamicCheckpointCallback needs the Hugging Face extra: pip install 'ray_dyncheck[transformers]' "
        f"(transformers and accelerate). The import failed with: {exc}"
    ) from exc

__all__ = ["DynamicCheckpointCallback", "hf_resume_path"]

logger = logging.getLogger(__name__)



class DynamicCheckpointCallback(TrainerCallback):
    """On-demand checkpoints for ``transformers.Trainer`` in a Ray ``TorchTrainer`` worker.

    Add it on **every** rank. At each check (``check_interval`` optimizer steps, or ``auto``; and at the end
    of each evaluation inside ``train()``, whatever the interval) all ranks agree on one decision; on "save"
    it sets ``control.should_save`` and HF writes its usual ``checkpoint-N`` (model, optimizer, scheduler,
    RNG, trainer state). In ``on_save`` every rank reports its share of that directory with
    ``ray.train.report`` (rank 0 the checkpoint, each other rank its own ``rng_state_<rank>.pth``), with our
    metadata (``kind``, ``step``, ``reason``, ``request_id``), for HF's scheduled saves too. Rank 0's
    manifest (``dyncheck.json``) lists every rank's files, so a checkpoint missing one is skipped on resume.
    The callback therefore **replaces** Ray's ``RayTrainReportCallback`` (which cannot attach metadata): do
    not install both, or every save is reported twice. HF's ``save_steps`` / ``save_strategy`` stay the
    schedule; the ``save_steps`` key of the ``dynamic_checkpoint`` block is ignored here.

    A weights-only save (the interrupt's default) leaves the optimizer out. For that one save the
    callback turns your ``args.save_only_model`` on at the step's end, and puts your value back first
    thing in ``on_save`` (before anything that can raise), at the next step's start if HF did not
    save that step, and in ``on_train_begin`` / ``on_train_end``; an instance lock guards the change.
    Only if ``Trainer`` itself raises between that step's end and its save does ``args`` keep it until
    this callback's next ``on_train_begin``. The checkpoint still carries ``scheduler.pt`` and every
    rank's RNG state (each rank adds ``rng_state_<rank>.pth`` in HF's format, which
    ``save_only_model`` leaves out), so :func:`hf_resume_path` continues at its step with the LR
    schedule and RNG where they were and a fresh optimizer (logged).

    The trigger file and request folder are in the Ray run directory, not in ``output_dir``.

    What the callback holds while training (the poller and commit threads on rank 0, a gloo side
    group, a :class:`~ray_dyncheck.LocalBackend`'s store thread, a checkpoint :func:`hf_resume_path`
    downloaded) is released in ``on_train_end``. HF calls no callback when ``train()`` raises, so
    then, whichever comes first: the end of a ``with`` block around the callback (or
    :meth:`close`); the next ``on_train_begin`` of any callback in the same thread (or of any callback
    once the thread that trained has ended); interpreter exit (``atexit``). Requests it had claimed
    stay claimed, for the next training or a restarted worker group. A downloaded checkpoint goes
    at the first step (HF has read it all by then).

    Example (the ``with`` block releases everything, also when ``train()`` raises)::

        with rdc.DynamicCheckpointCallback(config["dynamic_checkpoint"]) as callback:
            trainer = transformers.Trainer(..., callbacks=[callback])
            trainer.train(resume_from_checkpoint=rdc.hf_resume_path())

    Args:
        config: The ``dynamic_checkpoint`` block (dict, YAML path or config), ``None`` for defaults.
        backend: Where to report; default: Ray Train (this must run inside a Ray Train worker).
    """

    def __init__(self, config: DynamicCheckpointConfig | Mapping[str, Any] | str | None = None, *,
                 backend: Backend | None = None) -> None:
        self.config = load_config(config)
        self._backend = backend if backend is None else require(backend)
        self._core: WorkerCore | None = None
        self._pending: Plan | None = None
        """A save the agreed plan asked HF for, until ``on_save`` reports it."""
        self._only_model_lock = threading.Lock()
        self._only_model_before: bool | None = None
        self._saved_step: int | None = None
        self._first_step = False
        """Set by ``on_train_begin``: the first step has not begun yet."""
        self._widened = False
        """A weights-only save was made a full one (a sharded layout): logged once."""
        self._stop_after_save = False
        """The pending save's plan also stops: training stops once HF has saved it (``on_save``)."""
        self._eval_step: int | None = None
        """The step whose evaluation inside ``train()`` HF runs next (its schedule said so at the step's or
        epoch's end, or ``eval_on_start``): ``on_evaluate`` checks only then."""
        self._scheduled_at: int | None = None
        """The step at whose end HF's own schedule asked for a (full) save."""
        self._args: TrainingArguments | None = None
        """The arguments whose ``save_only_model`` this callback may have changed."""
        self.saves: list[dict[str, Any]] = []
        """Rank 0: one entry per reported save (step, kind, reason, requests, name, path once stored)."""

    def __getstate__(self) -> dict[str, Any]:
        # Picklable before training (e.g. built on the driver, sent to the workers); a lock is not.
        state = self.__dict__.copy()
        del state["_only_model_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._only_model_lock = threading.Lock()

    def __enter__(self) -> DynamicCheckpointCallback:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(clean=exc_type is None)

    def close(self, *, clean: bool = True) -> None:
        """Release what this callback holds (see the class docstring); nothing when ``on_train_end``
        did already. Call it from the thread that trained, after ``train()``. ``clean=False`` (after an
        exception; what the ``with`` block passes then): requests claimed and not served stay
        claimed, for the next training or a restarted worker group, and stores are waited for 10 s
        at most. A later ``train()`` with this callback starts afresh."""
        try:
            self._release(clean)
        finally:
            release_downloads()

    def _release(self, clean: bool) -> None:
        """Close the core and end a LocalBackend's store thread; downloads are left alone (in
        ``on_train_begin`` HF has not read the RNG states of the checkpoint it resumes from yet)."""
        core, self._core, self._pending = self._core, None, None
        self._stop_after_save, self._eval_step = False, None
        if self._args is not None:  # your save_only_model as you set it, also after a train() that raised
            self._restore_only_model(self._args)
        if core is not None:
            forget(core)
            close_core(core, clean)
        elif self._backend is not None:
            self._backend.close(timeout=0.0)

    def _release_if_own(self, core: WorkerCore) -> bool:
        """What :mod:`~ray_dyncheck._hf.registry` calls for a ``train()`` that raised: release all (no
        collective) if ``core`` is still this callback's."""
        if self._core is not core:
            return False
        self._release(clean=False)
        return True

    # -- HF events (every rank) ----------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._restore_only_model(args)  # left on by an earlier train() that raised before its save
        if self.config.save_steps is not None and state.is_world_process_zero:
            logger.warning("dyncheck: dynamic_checkpoint.save_steps=%d is ignored with the HF callback: HF's "
                           "save_steps/save_strategy are the schedule", self.config.save_steps)
        # An earlier train() that raised (HF then calls no callback): its threads and side group go
        # now, on this rank alone (no collective); its claims stay for the new core's poller.
        if self._core is not None:
            self._release(clean=False)
        release_leftovers()
        backend = self._backend
        if backend is None:
            from ._backends.ray import RayBackend

            backend = RayBackend()
        self._core = WorkerCore(self.config, backend, self.saves)  # collective: every rank is here
        track(self._core, self._release_if_own)
        self._first_step = True
        self._eval_step = state.global_step if args.eval_on_start else None
        self._core.start_at(state.global_step)
        self._finish_weights_resume(state, kwargs.get("lr_scheduler"))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        # HF did not save at the step that asked (save_strategy="best" re-decides should_save): your
        # value while this step trains; the step's end asks again.
        self._restore_only_model(args)
        self._eval_step = None
        if self._first_step:  # HF has read the checkpoint it resumed from, RNG states included
            self._first_step = False
            release_downloads()

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
            if scheduled:
                self._pending = self._pending.at_least(Kind.FULL)  # HF's own save at this step is a full one
            control.should_save = True
            self._set_only_model(args, self._pending.kind == Kind.WEIGHTS)
        self._take(core.check(step, full_due=scheduled), args, control)
        self._scheduled_at = step if scheduled else None
        self._eval_step = step if control.should_evaluate else None
        core.end_step()

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        # An evaluation inside train() (a core exists only then) may run for longer than a check interval:
        # check once more at its end, whatever the interval; HF saves right after (the same step). With
        # save_strategy="best" HF decides its own (full) save only after this: an agreed save is a full one.
        # Only for the evaluation HF's schedule ran inside train() (not a trainer.evaluate() of yours, also
        # not after a train() that raised), once (an eval_dataset dict evaluates each of its datasets), and
        # not at a step already saved (HF would rewrite checkpoint-N in place while its upload reads it).
        core, step = self._core, state.global_step
        if core is None or self._eval_step != step:
            return
        self._eval_step = None
        if self._saved_step == step and self._pending is None:
            return  # the next regular check serves what waits
        full_due = self._scheduled_at == step or (bool(control.should_save) and self._pending is None) or \
            args.save_strategy == "best"
        self._take(core.check(step, full_due=full_due, now=True), args, control)
        core.end_step()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if control.should_save and self._saved_step == state.global_step and self._pending is None:
            # save_strategy="epoch" asks for the step we just saved: one save per step. A second one
            # would also rewrite checkpoint-N in place while its upload may still read it.
            control.should_save = False
        if control.should_evaluate and self._core is not None:
            self._eval_step = state.global_step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        only_model = self._restore_only_model(args)  # first: nothing below leaves your args changed
        core = self._core
        if core is None:
            return
        step = state.global_step
        pending, self._pending = self._pending, None
        plan = pending.at_step(step) if pending is not None else \
            core.plan(step, Kind.WEIGHTS if only_model else Kind.FULL, Reason.SCHEDULE)
        kind = plan.kind
        assert kind is not None
        output_dir = str(args.output_dir)
        source = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}-{step}")
        mine: dict[str, int] = {}
        error: str | None = None
        try:
            mine = share(core.rank, args, source, rng_left_out=only_model)
        except Exception as exc:
            logger.exception("dyncheck: rank %d could not list its files of %s", core.rank, source)
            error = f"rank {core.rank}: {type(exc).__name__}: {exc}"
        # Every rank's files (rank 0's manifest lists them all) and errors. Also a barrier: every
        # rank's RNG file is written before rank 0 lists a shared checkpoint-N.
        gathered: list[Any] = core.agreement.all_gather((mine, error))
        errors = [e for _, e in gathered if e is not None]
        directory = None
        if errors:
            error = "; ".join(errors)  # the same on every rank: nobody passes files
        else:
            try:
                directory = stage(source, output_dir, step=step, kind=kind, lr_scheduler=kwargs.get("lr_scheduler"),
                                  shares=[s for s, _ in gathered], rank=core.rank, world_size=core.world_size,
                                  merged=core.backend.merges_rank_dirs, backend_name=type(core.backend).__name__)
            except Exception as exc:
                logger.exception("dyncheck: rank %d could not stage %s for Ray", core.rank, source)
                error = f"rank {core.rank}: {type(exc).__name__}: {exc}"
            # One rank's error means no rank passes its files: half a checkpoint is never reported.
            try:
                error = core.agreement.shared_error(error, "stage its files")
            except BaseException:
                if directory is not None:  # a peer is gone: the error goes on up, the staged files go now
                    shutil.rmtree(directory, ignore_errors=True)
                raise
            if error is not None and directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
                directory = None
        metrics: dict[str, Any] = {}
        for log in state.log_history:  # the latest value of each logged metric, as Ray's callback does
            metrics.update({k: v for k, v in log.items() if isinstance(v, (int, float))})
        core.report(plan, directory, metrics, error=error)
        self._saved_step = step
        if pending is not None and self._stop_after_save:  # the stop that came with this save
            self._stop_after_save = False
            control.should_training_stop = True
        core.end_step()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._restore_only_model(args)
        try:
            if self._core is not None and self._pending is not None:
                pending, self._pending = self._pending, None
                self._core.abandon(pending.at_step(state.global_step),
                                   "training ended before Trainer saved the checkpoint it was asked for")
        finally:
            self.close(clean=True)  # a normal end: requests no check served get "unserved"

    # -- helpers -------------------------------------------------------------------------------

    def _take(self, plan: Plan | None, args: TrainingArguments, control: TrainerControl) -> None:
        """An agreed plan: ask HF for its save (joined with one HF still owes us), or to stop."""
        if plan is not None and plan.save:
            if self._pending is not None:  # one save for it and the one HF still owes us
                plan = self._pending.joined(plan)
            if plan.kind == Kind.WEIGHTS and (layout := sharded_layout()) is not None:
                if not self._widened and self._core is not None and self._core.rank == 0:
                    logger.warning("dyncheck: under %s every rank writes its shard and HF's save_only_model "
                                   "cannot be used: weights-only saves are full ones", layout)
                self._widened = True
                plan = plan.at_least(Kind.FULL)
            self._pending = plan
            control.should_save = True
            self._set_only_model(args, plan.kind == Kind.WEIGHTS)
        if plan is not None and plan.stop:
            if plan.save:
                # Once HF has saved it (save_strategy="best" may still turn should_save off after an
                # evaluation; the next step's end asks again): a stop never goes without its save.
                self._stop_after_save = True
            else:
                control.should_training_stop = True

    def _set_only_model(self, args: TrainingArguments, only_model: bool) -> None:
        with self._only_model_lock:
            if self._only_model_before is None:
                self._only_model_before = bool(args.save_only_model)
            args.save_only_model = only_model
            self._args = args

    def _restore_only_model(self, args: TrainingArguments) -> bool:
        """Put your ``save_only_model`` back; returns the value in effect until now (HF saved with it)."""
        with self._only_model_lock:
            current = bool(args.save_only_model)
            if self._only_model_before is not None:
                args.save_only_model = self._only_model_before
                self._only_model_before = None
            return current

    def _finish_weights_resume(self, state: TrainerState, lr_scheduler: Any) -> None:
        """After HF resumed from a weights-only checkpoint: HF restored the step, weights and RNG;
        restore the LR schedule (HF loads it only together with an optimizer) and say the optimizer
        is fresh. Rank 0 finds the checkpoint as :func:`hf_resume_path` chose it; one broadcast."""
        core = self._core
        assert core is not None
        resumed: Any = None
        if core.rank == 0 and state.global_step > 0:
            try:
                resumed = weights_resume(core.backend, state.global_step)
            except Exception:
                logger.exception("dyncheck: could not tell whether Trainer resumed from a weights-only "
                                 "checkpoint; if it did, the LR schedule starts over")
        resumed = core.agreement.broadcast(resumed)  # every rank, every time: the same collectives
        if not isinstance(resumed, dict):
            return
        if resumed["scheduler"] is not None and lr_scheduler is not None:
            lr_scheduler.load_state_dict(resumed["scheduler"])
        if core.rank == 0:
            logger.warning("dyncheck: resumed from a weights-only checkpoint at step %d (%s): optimizer state "
                           "starts fresh%s; use on_interrupt: full for an exact resume", state.global_step,
                           resumed["path"], "" if resumed["scheduler"] is not None
                           else ", and so does the LR schedule (no scheduler.pt)")


