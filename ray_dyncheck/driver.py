"""The driver side: ``rdc.fit(trainer)`` turns Ctrl+C / SIGTERM into a save, then a clean stop.

Runs in the driver process (your script, or the entrypoint of ``ray job submit``). While it runs it
owns the interrupt signals: ``trainer.fit()`` runs in a thread, the main thread waits for it and for
signals. A handler only records the signal; the main thread then writes one request
(``{"kind": on_interrupt, "stop": true}``) into the run's request folder, the same channel rank 0
already reads, and waits for the workers to save and leave their loops under a deadline.

Example::

    import ray_dyncheck as rdc
    result = rdc.fit(trainer)        # instead of trainer.fit()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import signal
import threading
import time
from typing import Any, Sequence

import pyarrow.fs as pafs

from .client import read_json
from .config import DynamicCheckpointConfig, load_config
from .requests import RECEIPTS, REQUESTS, new_id, write_json

__all__ = ["fit"]

logger = logging.getLogger(__name__)

# A terminal sends SIGINT to the whole process group; duplicates arrive within milliseconds.
DEBOUNCE_S = 0.5


class _Signals:
    """Records signals from the handler; the main thread reads them. No I/O in the handler."""

    def __init__(self) -> None:
        self.received: list[tuple[int, float]] = []
        self.event = threading.Event()

    def handler(self, signum: int, _frame: Any) -> None:
        self.received.append((signum, time.monotonic()))
        self.event.set()


def fit(
    trainer: Any,
    *,
    on_interrupt: str | None = None,
    interrupt_grace_s: float | None = None,
    signals: Sequence[str] | None = None,
    raise_on_interrupt: bool = True,
) -> Any:
    """Run ``trainer.fit()``; on an interrupt, save (weights by default) and stop cleanly.

    Runs on the driver, from the main thread. Options default to the ``dynamic_checkpoint`` block
    in ``trainer.train_loop_config`` (``on_interrupt``, ``interrupt_grace_s``, ``signals``).

    - First signal: logs it, asks the workers for an ``on_interrupt`` save and a stop, waits up to
      ``interrupt_grace_s`` for ``fit()`` to end, then shuts Ray down and raises ``KeyboardInterrupt``
      (SIGINT) or ``SystemExit(128 + signum)``, so the script ends with the signal's exit status;
      with ``raise_on_interrupt=False`` it returns the ``Result`` instead (Ray stays up).
    - A second signal (after a short debounce), or the deadline passing: forced exit.

    Called from another thread it cannot own signals: it says so and runs ``trainer.fit()``.
    """
    # Arguments override the block; replace() validates them exactly as the config does.
    overrides: dict[str, Any] = {"on_interrupt": on_interrupt, "interrupt_grace_s": interrupt_grace_s,
                                 "signals": signals}
    cfg = dataclasses.replace(_config_of(trainer), **{k: v for k, v in overrides.items() if v is not None})
    kind, grace = cfg.on_interrupt, cfg.interrupt_grace_s
    nums = [int(getattr(signal, name)) for name in cfg.signals]
    if threading.current_thread() is not threading.main_thread():
        logger.warning("dyncheck: rdc.fit() called outside the main thread: it cannot own signals, so "
                       "Ctrl+C keeps Ray's default (no save). Call it from the main thread.")
        return trainer.fit()

    storage = trainer.run_config.storage_context  # Ray writes the run-start marker here, once
    fs, run_dir = storage.storage_filesystem, storage.experiment_fs_path
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    recorder = _Signals()
    previous = {n: signal.signal(n, recorder.handler) for n in nums}
    thread = threading.Thread(target=run, name="dyncheck-fit", daemon=True)
    try:
        thread.start()
        first = _wait(thread, recorder, None)
        if first is None:
            return _outcome(box)
        signum, t_sig = first
        name = signal.Signals(signum).name
        if kind == "none":
            logger.warning("dyncheck: %s received: asking workers to stop without saving (%s again to "
                           "force)", name, name)
        else:
            logger.warning("dyncheck: interrupt received (%s): asking workers for a %s save "
                           "(%s again to force)", name, "weights-only" if kind == "weights" else "full", name)
        rid = new_id("interrupt")
        write_json(fs, posixpath.join(run_dir, REQUESTS, f"{rid}.json"),
                   {"id": rid, "kind": kind, "stop": True, "source": "interrupt"})
        deadline = time.monotonic() + grace
        second = _wait(thread, recorder, deadline, after=t_sig + DEBOUNCE_S)
        receipt = _read_receipt(fs, run_dir, rid)
        if thread.is_alive():
            why = (f"second {signal.Signals(second[0]).name}" if second is not None
                   else f"no answer within interrupt_grace_s={grace:g} s")
            logger.error("dyncheck: forced exit (%s); waited for request %s in %s; last seen: %s",
                         why, rid, run_dir, receipt or "no receipt yet (the workers have not saved)")
            _force_exit(signum)
        logger.warning("dyncheck: stopped after the interrupt in %.1f s; %s", time.monotonic() - t_sig,
                       _where(receipt, box))
        if raise_on_interrupt:
            if "error" in box:
                raise box["error"]
            _raise(signum)
        return _outcome(box)
    finally:
        for n, h in previous.items():
            signal.signal(n, h if h is not None else signal.SIG_DFL)


def _wait(thread: threading.Thread, recorder: _Signals, deadline: float | None,
          after: float = 0.0) -> tuple[int, float] | None:
    """Until the fit thread ends (``None``), a signal arrives after ``after``, or the deadline."""
    while thread.is_alive():
        for sig in recorder.received:
            if sig[1] >= after:
                recorder.received.remove(sig)
                return sig
        recorder.received.clear()
        recorder.event.clear()
        timeout = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
        if deadline is not None and timeout == 0.0:
            return None
        recorder.event.wait(timeout)
    return None


def _force_exit(signum: int) -> None:
    """Raise in the main thread; if shutting Ray down then hangs, end the process anyway."""
    timer = threading.Timer(15.0, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    _raise(signum)


def _raise(signum: int) -> None:
    # The script is stopping as asked. Shut Ray down now: left to Ray's atexit hook, the shutdown
    # turns an uncaught KeyboardInterrupt's exit status into 1 instead of "killed by SIGINT" (130).
    import ray

    ray.shutdown()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _outcome(box: dict[str, Any]) -> Any:
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _read_receipt(fs: pafs.FileSystem, run_dir: str, rid: str) -> dict[str, Any] | None:
    return read_json(fs, posixpath.join(run_dir, RECEIPTS, f"{rid}.json"))


def _where(receipt: dict[str, Any] | None, box: dict[str, Any]) -> str:
    if receipt and receipt.get("status") == "ok":
        return f"{receipt.get('kind')} checkpoint at step {receipt.get('step')}: {receipt.get('checkpoint')}"
    if receipt:
        return f"the save failed: {receipt.get('error')}"
    result = box.get("result")
    ckpt = getattr(result, "checkpoint", None)
    return f"no receipt; latest checkpoint: {ckpt.path if ckpt else 'none'}"


def _config_of(trainer: Any) -> DynamicCheckpointConfig:
    loop_config = getattr(trainer, "train_loop_config", None) or {}
    block = loop_config.get("dynamic_checkpoint") if isinstance(loop_config, dict) else None
    return load_config(block)
