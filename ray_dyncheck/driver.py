"""The driver side: ``rdc.fit(trainer)`` turns Ctrl+C / SIGTERM into a save, then a clean stop.

Runs in the driver process (your script, or the entrypoint of ``ray job submit``). While it runs it
owns the interrupt signals: ``trainer.fit()`` runs in a thread, the main thread waits for it and for
signals. A handler only records the signal; a helper thread writes one request (``{"kind":
on_interrupt, "stop": true}``) into the run's request folder, the same channel rank 0 already reads,
and the main thread waits for the workers to save and stop under a deadline. The main thread never
touches storage: a hung filesystem cannot keep Ctrl+C from working.

Example::

    import ray_dyncheck as rdc
    result = rdc.fit(trainer)        # instead of trainer.fit()
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import posixpath
import signal
import threading
import time
from typing import Any, Callable, Sequence

import pyarrow.fs as pafs

from ._channel import answer_leftovers
from ._files import RECEIPTS, REQUESTS, new_id, read_json, write_json
from ._logs import console
from .config import DynamicCheckpointConfig, load_config

__all__ = ["fit"]

logger = logging.getLogger(__name__)

# A terminal sends SIGINT to the whole process group; duplicates arrive within milliseconds.
DEBOUNCE_S = 0.5
# Storage that has not written one small file in this long is treated as down: stop without a save.
REQUEST_TIMEOUT_S = 5.0
# After a forced exit starts, the process ends this soon even if shutting Ray down hangs (on a busy
# machine that can cut a healthy ~3 s shutdown short: Ray's own processes die with the driver).
FORCE_EXIT_S = 3.0
# How long the end of fit() waits for leftover requests to be answered (storage may hang).
TIDY_TIMEOUT_S = 10.0


class _Signals:
    """Records signals from the handler; the main thread pops them. No I/O in the handler."""

    def __init__(self) -> None:
        self.received: collections.deque[tuple[int, float]] = collections.deque()
        self.event = threading.Event()

    def handler(self, signum: int, _frame: Any) -> None:
        self.received.append((signum, time.monotonic()))
        self.event.set()

    def pop(self, after: float) -> tuple[int, float] | None:
        """The oldest signal received at or after ``after``; earlier ones (duplicates) are dropped."""
        while self.received:
            sig = self.received.popleft()
            if sig[1] >= after:
                return sig
        return None


class _Job:
    """A storage call on a daemon thread (driver): a hung filesystem never blocks the main thread."""

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: Exception | None = None
        threading.Thread(target=self._run, args=(fn, *args), name=f"dyncheck-{name}", daemon=True).start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.result = fn(*args)
        except Exception as exc:  # handed to the main thread, which logs it in one line
            self.error = exc
        finally:
            self.done.set()


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
      with ``raise_on_interrupt=False`` it returns the ``Result`` instead (Ray stays up). A request
      that cannot be written within seconds: one error line, and the same stop without a save.
    - A second signal (after a short debounce), or the deadline passing: forced exit, within seconds.
    - Once ``fit()`` has ended, requests nobody served get an ``unserved`` receipt.

    Called from another thread it cannot own signals: it says so and runs ``trainer.fit()``.
    """
    # Arguments override the block; replace() validates them exactly as the config does.
    overrides: dict[str, Any] = {"on_interrupt": on_interrupt, "interrupt_grace_s": interrupt_grace_s,
                                 "signals": signals}
    cfg = dataclasses.replace(_config_of(trainer), **{k: v for k, v in overrides.items() if v is not None})
    console()  # the driver: our lines on its console (job logs) unless the application set up logging
    kind, grace = cfg.on_interrupt, cfg.interrupt_grace_s
    nums = [int(getattr(signal, name)) for name in cfg.signals]
    if threading.current_thread() is not threading.main_thread():
        logger.warning("dyncheck: rdc.fit() called outside the main thread: it cannot own signals, so "
                       "Ctrl+C keeps Ray's default (no save). Call it from the main thread.")
        return trainer.fit()

    run_dir = _RunDir(trainer.run_config)  # resolved on a helper thread: even that may touch storage
    box: dict[str, Any] = {}
    ended = threading.Event()

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc
        finally:
            ended.set()

    recorder = _Signals()
    previous = {n: signal.signal(n, recorder.handler) for n in nums}
    try:
        threading.Thread(target=run, name="dyncheck-fit", daemon=True).start()
        first = _wait(ended.is_set, recorder, None)
        if first is None:
            _, late = _tidy(run_dir, box, None, recorder, 0.0)
            late = late or recorder.pop(0.0)  # one that came as fit() ended is not dropped either
            if late is not None and raise_on_interrupt and "error" not in box:
                _shut_down(late[0])  # Ctrl+C while we tidied up: the script stops, as it asked
            return _outcome(box)
        signum, t_sig = first
        name = signal.Signals(signum).name
        ask = "to stop without saving" if kind == "none" else f"for a {kind.replace('weights', 'weights-only')} save"
        logger.warning("dyncheck: interrupt received (%s): asking workers %s (%s again to force)", name, ask, name)
        rid = new_id("interrupt")
        body = {"id": rid, "kind": kind, "stop": True, "source": "interrupt"}
        write = _Job("request", lambda: write_json(*run_dir.join(REQUESTS, f"{rid}.json"), body))
        after = t_sig + DEBOUNCE_S
        second = _wait(write.done.is_set, recorder, time.monotonic() + REQUEST_TIMEOUT_S, after)
        written = write.done.is_set() and write.error is None
        if second is None and not written and not ended.is_set():
            cause = (f"{type(write.error).__name__}: {write.error}" if write.error is not None
                     else f"storage did not answer within {REQUEST_TIMEOUT_S:g} s")
            logger.error("dyncheck: cannot ask the workers to save: writing the interrupt request into %s "
                         "failed (%s); stopping without a save", run_dir, cause)
            _shut_down(signum, then_raise=raise_on_interrupt)  # the workers were not told: stopping Ray stops them
            return box.get("result")
        if second is None:
            second = _wait(ended.is_set, recorder, time.monotonic() + grace, after)
        if not ended.is_set():
            _exit_after(FORCE_EXIT_S, signum)  # from here on nothing can keep the process alive
            why = (f"second {signal.Signals(second[0]).name}" if second is not None
                   else f"no answer within interrupt_grace_s={grace:g} s")
            job = _Job("receipt", lambda: read_json(*run_dir.join(RECEIPTS, f"{rid}.json"))) if written else None
            seen = ("the request is not written yet (storage has not answered)" if job is None
                    else "the receipt could not be read in time" if not job.done.wait(1.0)
                    else job.result or "no receipt yet (the workers have not saved)")
            logger.error("dyncheck: forced exit (%s); waited for request %s in %s; last seen: %s",
                         why, rid, run_dir, seen)
            _shut_down(signum)
        receipt, _ = _tidy(run_dir, box, rid, recorder, after)
        logger.warning("dyncheck: stopped after the interrupt in %.1f s; %s", time.monotonic() - t_sig,
                       _where(receipt, box))
        if raise_on_interrupt:
            if "error" in box:
                raise box["error"]
            _shut_down(signum)
        return _outcome(box)
    finally:
        for n, h in previous.items():
            signal.signal(n, h if h is not None else signal.SIG_DFL)


def _wait(done: Callable[[], bool], recorder: _Signals, deadline: float | None,
          after: float = 0.0) -> tuple[int, float] | None:
    """Until ``done()`` (``None``), a signal arrives after ``after``, or the deadline (``None``)."""
    while not done():
        recorder.event.clear()  # before the scan: a signal landing after it sets the event again
        sig = recorder.pop(after)
        if sig is not None:
            return sig
        timeout = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if timeout <= 0:
            return None
        recorder.event.wait(timeout)
    return None


class _RunDir:
    """The run directory of a ``RunConfig``, resolved on first use by whichever helper thread needs it
    (resolving an ``s3://`` URI talks to the store). ``str()`` is a label for logs, with no I/O.

    Not ``RunConfig.storage_context``: building it writes Ray's run-start marker, which must be left
    to ``fit()`` (the controller builds its own when this one was not cached)."""

    def __init__(self, run_config: Any) -> None:
        self.config = run_config
        self._lock = threading.Lock()
        self._resolved: tuple[pafs.FileSystem, str] | None = None

    def __str__(self) -> str:
        return posixpath.join(str(self.config.storage_path), str(self.config.name))

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        with self._lock:
            if self._resolved is None:
                path = str(self.config.storage_path)
                fs = self.config.storage_filesystem
                if fs is None:  # as Ray resolves it (get_fs_and_path)
                    fs, path = pafs.FileSystem.from_uri(path)
                self._resolved = fs, posixpath.join(path, str(self.config.name))
            return self._resolved

    def join(self, *parts: str) -> tuple[pafs.FileSystem, str]:
        fs, root = self.resolve()
        return fs, posixpath.join(root, *parts)


def _tidy(run_dir: _RunDir, box: dict[str, Any], rid: str | None, recorder: _Signals,
          after: float) -> tuple[dict[str, Any] | None, tuple[int, float] | None]:
    """``fit()`` has ended: requests nobody served get ``unserved`` receipts, then the interrupt's
    receipt (request ``rid``) is read, on a helper thread for at most ``TIDY_TIMEOUT_S`` or until a
    signal. Runs on the driver's main thread; returns ``(receipt, signal)``."""
    err = box.get("error")
    why = f"the run ended (fit() {f'raised {type(err).__name__}' if err else 'returned'}) before a check served it"
    job = _Job("leftovers", lambda: (answer_leftovers(*run_dir.resolve(), why),
                                     rid and read_json(*run_dir.join(RECEIPTS, f"{rid}.json"))))
    sig = _wait(job.done.is_set, recorder, time.monotonic() + TIDY_TIMEOUT_S, after)
    if not job.done.is_set():
        logger.error("dyncheck: requests left in %s not answered: %s", run_dir,
                     f"{signal.Signals(sig[0]).name} received" if sig is not None
                     else f"storage did not answer within {TIDY_TIMEOUT_S:g} s")
    elif job.error is not None:
        logger.error("dyncheck: cannot answer the requests left in %s: %s: %s", run_dir,
                     type(job.error).__name__, job.error)
    else:
        answered, found = job.result
        if answered:
            logger.info("dyncheck: %d request(s) left in %s answered 'unserved': %s", len(answered), run_dir,
                        ", ".join(answered))
        return found, sig
    return None, sig


def _exit_after(seconds: float, signum: int) -> threading.Timer:
    """Ends the process with the signal's status ``seconds`` from now, unless cancelled. Driver."""
    timer = threading.Timer(seconds, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    return timer


def _shut_down(signum: int, *, then_raise: bool = True) -> None:
    # The script is stopping as asked. Shut Ray down now: left to Ray's atexit hook, the shutdown
    # turns an uncaught KeyboardInterrupt's exit status into 1 instead of "killed by SIGINT" (130).
    # A shutdown that hangs (a dead node, a stuck raylet) must not keep a stopping script alive.
    import ray

    timer = _exit_after(15.0, signum)
    ray.shutdown()
    timer.cancel()
    if then_raise:
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def _outcome(box: dict[str, Any]) -> Any:
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _where(receipt: dict[str, Any] | None, box: dict[str, Any]) -> str:
    if receipt and receipt.get("status") == "ok":
        return f"{receipt.get('kind')} checkpoint at step {receipt.get('step')}: {receipt.get('checkpoint')}"
    if receipt:
        return f"no save ({receipt.get('status')}): {receipt.get('error')}"
    result = box.get("result")
    ckpt = getattr(result, "checkpoint", None)
    return f"no receipt; latest checkpoint: {ckpt.path if ckpt else 'none'}"


def _config_of(trainer: Any) -> DynamicCheckpointConfig:
    loop_config = getattr(trainer, "train_loop_config", None) or {}
    block = loop_config.get("dynamic_checkpoint") if isinstance(loop_config, dict) else None
    return load_config(block)
