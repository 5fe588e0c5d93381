"""The per-worker hook: count steps, check for requests, save and report on every rank, resume.

Runs inside each Ray Train worker (one object per rank, in the training thread). Ray itself is one
adapter (:mod:`ray_dyncheck._ray`) behind the small :class:`Backend` protocol, so the same hook runs
in a plain ``torch.distributed`` world without Ray (:class:`LocalBackend`).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, ContextManager, Protocol

import pyarrow.fs as pafs
import torch

from .agree import Agreement, AutoInterval, Decision
from .config import DynamicCheckpointConfig, load_config
from .requests import RUN_MARKER, Request, RequestChannel, RequestPoller, resolve_run_dir, write_json
from .state import (
    FORMAT_VERSION,
    CheckpointInfo,
    Stateful,
    capture_rank_state,
    load_checkpoint,
    read_manifest,
    write_checkpoint,
)

__all__ = ["Backend", "DynamicCheckpoint", "LocalBackend"]

logger = logging.getLogger(__name__)

OnDone = Callable[[str | None, BaseException | None], None]


class Backend(Protocol):
    """Where checkpoints go and come from. :mod:`ray_dyncheck._ray` implements it for Ray Train."""

    rank: int
    world_size: int

    def storage(self) -> tuple[pafs.FileSystem, str] | None:
        """The run directory's filesystem and path, or ``None`` when there is none."""

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone) -> None:
        """Called on every rank, the same number of times; ``directory`` is ``None`` on ranks with
        nothing to write. Rank 0's ``on_done(path, error)`` runs once the checkpoint is stored."""

    def checkpoints(self) -> Iterator[ContextManager[str]]:
        """The run's checkpoints, newest first, each opened as a local directory."""


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc).isoformat()


def _plain(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    # Only called when saving: .item() on a CUDA tensor synchronises, so never on a plain step.
    return {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
            for k, v in (metrics or {}).items()}


class DynamicCheckpoint:
    """On-demand checkpoints for one worker of a Ray Train ``TorchTrainer``.

    Create one on **every** rank, at the same point of the training function (after the process
    group exists and the model is prepared), then call :meth:`restore` once and :meth:`step` once per
    optimizer step, on every rank. When someone touches ``<run dir>/dyncheck.save`` or writes a
    request, every rank saves one checkpoint at the next check and calls ``ray.train.report`` the
    same number of times (ranks other than 0 pass ``checkpoint=None``); training goes on.

    Example (inside ``train_loop_per_worker``)::

        with rdc.DynamicCheckpoint(config["dynamic_checkpoint"], model=model, optimizer=opt,
                                   lr_scheduler=sched) as dc:
            dc.restore()
            while dc.global_step < config["steps"]:
                loss = train_step(dc.global_step)
                dc.step(metrics={"loss": loss})
                if dc.should_stop:
                    break

    Args:
        config: The ``dynamic_checkpoint`` block (dict, YAML path or config), ``None`` for defaults.
        model: The model, possibly wrapped in DDP; its unwrapped weights are saved.
        optimizer: Saved in ``full`` checkpoints.
        lr_scheduler: Saved in every checkpoint.
        extra_state: Named objects with ``state_dict()``/``load_state_dict()`` saved per rank
            (e.g. a data loader position). Their state must load with ``torch.load(weights_only=True)``.
        backend: Where to report; default: Ray Train (this must run inside a Ray Train worker).
    """

    def __init__(
        self,
        config: DynamicCheckpointConfig | Mapping[str, Any] | str | None = None,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        extra_state: Mapping[str, Stateful] | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config = load_config(config)
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.extra_state = dict(extra_state or {})
        for name, obj in self.extra_state.items():
            if not isinstance(obj, Stateful):
                raise ValueError(f"extra_state[{name!r}] must have state_dict() and load_state_dict(), "
                                 f"got {type(obj).__name__}")
        if backend is None:
            from ._ray import RayBackend

            backend = RayBackend()
        self.backend = backend
        self.rank, self.world_size = backend.rank, backend.world_size
        self.global_step = 0
        self.should_stop = False
        self.saves: list[dict[str, Any]] = []
        """Rank 0: one entry per save (step, kind, reason, requests, name, path once stored)."""
        self._agreement = Agreement()  # collective: every rank constructs it here
        self._auto = AutoInterval(self.config.max_check_overhead) if self.config.auto_interval else None
        self._interval = 1
        self._logged_interval = 0
        self._next_check = 1
        self._train_s = 0.0
        self._steps_since_check = 0
        self._last_check_s = 0.0
        self._t_exit: float | None = None
        self._announced = False
        self._uploads = 0
        self._uploads_cv = threading.Condition()
        self._poller: RequestPoller | None = None
        self._channel: RequestChannel | None = None
        if self.config.enabled and self.rank == 0:
            self._start_poller()

    # -- set-up ------------------------------------------------------------------------------------

    def _start_poller(self) -> None:
        storage = self.backend.storage()
        if storage is None:
            logger.warning("dyncheck: no run directory (Ray Train local mode?): triggers and requests "
                           "are off; save_steps and restore still work")
            return
        fs, run_dir = storage
        self._channel = RequestChannel(fs, run_dir, self.config.trigger_file_path)
        self._poller = RequestPoller(self._channel, self.config.poll_interval_s).start()
        logger.info("dyncheck: watching %s and %s/.dyncheck/requests/ (check_interval=%s)",
                    self._channel.trigger, run_dir, self.config.check_interval)

    def __enter__(self) -> DynamicCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 60.0) -> None:
        """Wait for this rank's checkpoint uploads and receipts, then stop the poller."""
        deadline = time.monotonic() + timeout
        with self._uploads_cv:
            while self._uploads and time.monotonic() < deadline:
                self._uploads_cv.wait(deadline - time.monotonic())
            if self._uploads:
                logger.error("dyncheck: %d checkpoint upload(s) still running after %.0f s",
                             self._uploads, timeout)
        if self._poller is not None:
            self._poller.close(max(1.0, deadline - time.monotonic()))
            self._poller = None

    # -- resume ------------------------------------------------------------------------------------

    def restore(self) -> CheckpointInfo | None:
        """Load the run's newest checkpoint into the model, optimizer, scheduler, RNG and
        ``extra_state``, and set :attr:`global_step`. Call on every rank, before training.

        Returns ``None`` (state untouched) when the run has no checkpoint, or when the newest one was
        not written by ray_dyncheck. An incomplete one is skipped for the newest complete one.
        """
        for i, opened in enumerate(self.backend.checkpoints()):
            with opened as directory:
                try:
                    manifest = read_manifest(directory)
                except ValueError as exc:
                    logger.error("dyncheck: skipping checkpoint: %s", exc)
                    continue
                if manifest is None:
                    if i == 0:
                        logger.warning("dyncheck: the newest checkpoint (%s) was not written by "
                                       "ray_dyncheck; training state left as it is", directory)
                        return None
                    continue
                info = load_checkpoint(directory, model=self.model, optimizer=self.optimizer,
                                       lr_scheduler=self.lr_scheduler, extra_state=self.extra_state,
                                       rank=self.rank)
            self.global_step = info.step
            self._next_check = info.step + 1
            if self.rank == 0:
                logger.info("dyncheck: resumed from %s checkpoint at step %d", info.kind, info.step)
                if info.kind == "weights" and self.optimizer is not None:
                    logger.warning("dyncheck: optimizer state starts fresh: the interrupt saved weights "
                                   "only; use on_interrupt: full for an exact resume")
            return info
        return None

    # -- the per-step call -------------------------------------------------------------------------

    def step(self, metrics: Mapping[str, Any] | None = None) -> Decision | None:
        """Count one step; at check steps agree on a decision; save and report when asked.

        Call on every rank after each optimizer step. ``metrics`` (numbers or 1-element tensors) are
        attached to a checkpoint only when one is saved, so CUDA tensors cost no sync otherwise.
        Returns the agreed decision at a check step, else ``None``.
        """
        t_enter = time.perf_counter()
        if self._t_exit is not None:
            self._train_s += t_enter - self._t_exit
        self._steps_since_check += 1
        self.global_step += 1
        step = self.global_step
        decision = None
        requests: list[Request] = []
        if self.config.enabled and self._is_check_step(step):
            decision, requests = self._check(step, t_enter)
            self._announced = False
        elif self._auto is None and self._poller is not None and self._poller.has_pending() and not self._announced:
            self._announced = True  # a fixed interval can be long: say when the request will be seen
            left = (-step) % int(self.config.check_interval)
            logger.warning("dyncheck: a request is waiting; the next check is in %d step(s) (check_interval=%s)",
                           left, self.config.check_interval)
        scheduled = self.config.save_steps is not None and step % self.config.save_steps == 0
        if (decision is not None and decision.save) or scheduled:
            if decision is not None and decision.save:
                kind = "full" if scheduled else decision.kind or "full"
                reason = decision.reason
            else:
                kind, reason = "full", "schedule"
            self._save(kind, reason, requests, metrics)
        if decision is not None and decision.stop and not decision.save and requests and self._poller:
            # A stop without a save (on_interrupt: none) still answers its requests.
            self._poller.complete(requests, {"status": "ok", "kind": None, "step": step,
                                             "reason": decision.reason, "checkpoint": None})
        if decision is not None and decision.stop:
            self.should_stop = True
            if self.rank == 0:
                logger.warning("dyncheck: stop requested: leaving the training loop at step %d", step)
        self._t_exit = time.perf_counter()
        return decision

    def save(self, kind: str = "full", metrics: Mapping[str, Any] | None = None) -> None:
        """Save and report a checkpoint now. Every rank must call it at the same step."""
        if kind not in ("full", "weights"):
            raise ValueError(f"kind must be 'full' or 'weights', got {kind!r}")
        self._save(kind, "manual", [], metrics)

    def _is_check_step(self, step: int) -> bool:
        if self._auto is None:
            return step % int(self.config.check_interval) == 0
        return step >= self._next_check

    def _check(self, step: int, t_enter: float) -> tuple[Decision, list[Request]]:
        requests: list[Request] = []
        local = Decision(next_interval=self._interval)
        if self.rank == 0:
            try:
                if self._auto is not None and self._train_s > 0:
                    self._interval = self._auto.observe(self._train_s / self._steps_since_check,
                                                        self._last_check_s)
                requests = self._poller.take() if self._poller is not None else []
                local = _decide(requests, self._interval)
            except Exception:  # never skip the collective below: log, and decide "no request"
                logger.exception("dyncheck: rank 0 could not make a decision at step %d", step)
                local = Decision(next_interval=self._interval)
                if requests and self._poller is not None:
                    self._poller.requeue(requests)  # not lost: decided on at the next check
                requests = []
        agreed = self._agreement.agree(local)
        if self._auto is not None:
            if self.rank == 0 and self._logged_interval != agreed.next_interval and self._auto.step_s:
                self._logged_interval = agreed.next_interval
                logger.info("dyncheck: check interval now %d steps (step %.2f ms, check %.3f ms, "
                            "limit %.2f%% of step time)", agreed.next_interval,
                            (self._auto.step_s or 0) * 1e3, (self._auto.check_s or 0) * 1e3,
                            self.config.max_check_overhead * 100)
            self._interval = agreed.next_interval
            self._next_check = step + agreed.next_interval
        self._last_check_s = time.perf_counter() - t_enter
        self._train_s, self._steps_since_check = 0.0, 0
        return agreed, requests

    # -- saving ------------------------------------------------------------------------------------

    def _save(self, kind: str, reason: str, requests: Sequence[Request],
              metrics: Mapping[str, Any] | None) -> None:
        t0 = time.perf_counter()
        step = self.global_step
        try:
            mine: dict[str, Any] = capture_rank_state(self.extra_state)
        except Exception as exc:
            logger.exception("dyncheck: rank %d could not capture its state at step %d", self.rank, step)
            mine = {"error": f"rank {self.rank}: {type(exc).__name__}: {exc}"}
        states = self._agreement.gather(mine)  # every rank, even after an error
        directory: str | None = None
        error: str | None = None
        # Unique per report (a resumed run can save the same step again); Ray keeps rank 0's name.
        name = f"checkpoint_{step:08d}_{kind}_{secrets.token_hex(3)}"
        ids = [r.id for r in requests]
        metadata = {"format_version": FORMAT_VERSION, "kind": kind, "step": step, "reason": reason,
                    "request_id": ids[0] if ids else None, "request_ids": ids, "time": _iso(),
                    "world_size": self.world_size}
        if self.rank == 0:
            assert states is not None
            errors = [s["error"] for s in states if isinstance(s, dict) and "error" in s]
            if errors:
                error = "; ".join(errors)
            else:
                directory = tempfile.mkdtemp(prefix=f"dyncheck-{step}-")
                try:
                    write_checkpoint(directory, model=self.model, optimizer=self.optimizer,
                                     lr_scheduler=self.lr_scheduler, step=step, kind=kind,
                                     rank_states=states)  # type: ignore[arg-type]
                except Exception as exc:
                    logger.exception("dyncheck: writing the %s checkpoint at step %d failed", kind, step)
                    error = f"rank 0: {type(exc).__name__}: {exc}"
                    shutil.rmtree(directory, ignore_errors=True)
                    directory = None
        t_written = time.perf_counter()
        record = {"step": step, "kind": kind, "reason": reason, "requests": ids, "name": name,
                  "path": None, "error": error}
        if self.rank == 0:
            self.saves.append(record)
        report_metrics = {**_plain(metrics), "step": step, "dyncheck_kind": kind, "dyncheck_reason": reason}
        if directory is not None:
            with self._uploads_cv:
                self._uploads += 1
        on_done = self._make_on_done(record, list(requests), metadata, t0)
        # Every rank reports, also when the write failed (then nobody passes a checkpoint).
        self.backend.report(report_metrics, directory, name=name, metadata=metadata, on_done=on_done)
        if self.rank == 0:
            if error is not None:
                logger.error("dyncheck: no checkpoint at step %d (%s): %s", step, reason, error)
                if self._poller is not None:
                    self._poller.complete(requests, {"status": "error", "step": step, "kind": kind,
                                                     "reason": reason, "error": error})
            else:
                logger.info("dyncheck: %s checkpoint at step %d (%s%s): written in %.2f s, training "
                            "blocked %.2f s; uploading", kind, step, reason,
                            f", requests {', '.join(ids)}" if ids else "", t_written - t0,
                            time.perf_counter() - t0)

    def _make_on_done(self, record: dict[str, Any], requests: list[Request], metadata: dict[str, Any],
                      t0: float) -> OnDone:
        counted = [False]

        def on_done(path: str | None, exc: BaseException | None) -> None:
            # Runs on rank 0 in the upload thread, once the checkpoint is stored (or failed). Ray may
            # retry a failed upload: a later success rewrites the receipt.
            try:
                record["path"] = path
                receipt: dict[str, Any] = {"step": metadata["step"], "kind": metadata["kind"],
                                           "reason": metadata["reason"]}
                if exc is None:
                    receipt.update(status="ok", checkpoint=path, checkpoint_uri=self._uri(path))
                    logger.info("dyncheck: checkpoint for step %d stored at %s (%.2f s after the "
                                "decision)", metadata["step"], path, time.perf_counter() - t0)
                else:
                    record["error"] = f"upload failed: {exc}"
                    receipt.update(status="error", error=record["error"])
                if requests and self._channel is not None:
                    try:
                        self._channel.retire(requests, receipt)
                    except Exception:
                        logger.exception("dyncheck: could not write receipts for %s; retrying from the "
                                         "poller", ", ".join(r.id for r in requests))
                        if self._poller is not None:
                            self._poller.complete(requests, receipt)
            finally:
                with self._uploads_cv:
                    if not counted[0]:
                        counted[0] = True
                        self._uploads -= 1
                    self._uploads_cv.notify_all()

        return on_done

    def _uri(self, path: str | None) -> str | None:
        if path is None or self._channel is None:
            return path
        scheme = self._channel.fs.type_name
        return path if scheme == "local" else f"{scheme}://{path}"


def _decide(requests: Sequence[Request], interval: int) -> Decision:
    if not requests:
        return Decision(next_interval=interval)
    kinds = {r.kind for r in requests}
    kind = "full" if "full" in kinds else "weights" if "weights" in kinds else None
    sources = {r.source for r in requests}
    reason = "interrupt" if "interrupt" in sources else "trigger" if "trigger" in sources else "request"
    return Decision(save=kind is not None, kind=kind, stop=any(r.stop for r in requests),
                    next_interval=interval, reason=reason)


class LocalBackend:
    """Checkpoints in a run directory on any ``pyarrow.fs`` filesystem, without Ray.

    For plain ``torch.distributed`` scripts (and the GPU check). Rank 0 writes ``<run>/<name>/``
    synchronously and leaves the run-start marker that makes older requests stale.

    Args:
        run_dir: Local path or URI of the run directory.
    """

    def __init__(self, run_dir: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        self.fs, self.run_dir = resolve_run_dir(run_dir, filesystem)
        self.rank, self.world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.rank == 0:
            self.fs.create_dir(self.run_dir, recursive=True)
            with self.fs.open_output_stream(posixpath.join(self.run_dir, RUN_MARKER)):
                pass

    def storage(self) -> tuple[pafs.FileSystem, str]:
        return self.fs, self.run_dir

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone) -> None:
        if directory is None:
            return
        dest = posixpath.join(self.run_dir, name)
        try:
            write_json(pafs.LocalFileSystem(), posixpath.join(directory, ".metadata.json"), metadata)
            # Locally: copy beside it, then rename, so the final name is never half-written.
            staging = posixpath.join(self.run_dir, f".tmp-{name}") if self.fs.type_name == "local" else dest
            self.fs.create_dir(staging, recursive=True)
            pafs.copy_files(directory, staging, destination_filesystem=self.fs)
            if staging != dest:
                self.fs.move(staging, dest)
        except Exception as exc:
            on_done(None, exc)
            raise
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        on_done(dest, None)

    def checkpoints(self) -> Iterator[ContextManager[str]]:
        sel = pafs.FileSelector(self.run_dir, allow_not_found=True)
        dirs = [i for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
        for info in sorted(dirs, key=lambda i: i.base_name, reverse=True):
            yield self._open(info.path)

    @contextlib.contextmanager
    def _open(self, path: str) -> Iterator[str]:
        if self.fs.type_name == "local":
            yield path
            return
        tmp = tempfile.mkdtemp(prefix="dyncheck-restore-")
        try:
            pafs.copy_files(path, tmp, source_filesystem=self.fs)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

