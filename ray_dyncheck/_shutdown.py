"""The driver process's signals, background storage calls and ways out: what :func:`ray_dyncheck.fit`
needs so that no signal handler does I/O, no storage call can block the main thread, and the process
always ends when it must (a timer thread, and the kernel's alarm behind it)."""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["Job", "Signals", "Watchdog", "exit_now", "leave", "stop_ray", "wait_for"]

logger = logging.getLogger(__name__)

# How long a script that stops on a signal gives ray.shutdown() (a dead node, a stuck raylet).
SHUTDOWN_TIMEOUT_S = 15.0
# The last resort behind each of those deadlines: the kernel's interval timer, with SIGALRM left to
# its default action (end the process), fires this much later. A timer thread calling os._exit is
# the first line, but it needs the GIL and a live interpreter: it never runs while the main thread
# holds the GIL in C code, nor once the interpreter is exiting (seen: pyarrow's atexit S3 finalizer
# waiting, GIL held, for an S3 call stuck on a frozen server). SIGALRM needs neither. Unlike a
# watchdog process it cannot signal a recycled pid, and it dies with us. Its status says SIGALRM
# (142), not the signal's: it only fires when the timer thread could not.
ALARM_MARGIN_S = 1.5
# How often the main thread looks for signals and for the end of fit().
POLL_S = 0.05


class Signals:
    """Records signals from the handler; the main thread pops them. The handler only appends to a
    deque: no I/O, and no lock (an ``Event.set()`` there could wait forever for the Event's own lock,
    held by the main thread the handler interrupted)."""

    def __init__(self) -> None:
        self.received: collections.deque[tuple[int, float]] = collections.deque()

    def handler(self, signum: int, _frame: Any) -> None:
        self.received.append((signum, time.monotonic()))

    def pop(self, after: float) -> tuple[int, float] | None:
        """The oldest signal received at or after ``after``; earlier ones (duplicates) are dropped."""
        while self.received:
            sig = self.received.popleft()
            if sig[1] >= after:
                return sig
        return None


class Job:
    """A storage call on a daemon thread (driver): a hung filesystem never blocks the main thread.
    The thread touches only its own job's fields, and ``Job.running`` under ``Job.lock``."""

    lock = threading.Lock()
    running: set[Job] = set()
    """Jobs not finished yet, of every ``fit()`` in this process: a stuck one holds up interpreter exit."""

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self.name = name
        self.done = threading.Event()
        self.result: Any = None
        self.error: Exception | None = None
        with Job.lock:
            Job.running.add(self)
        threading.Thread(target=self._run, args=(fn, *args), name=f"dyncheck-{name}", daemon=True).start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.result = fn(*args)
        except Exception as exc:  # handed to the main thread, which logs it in one line
            self.error = exc
        finally:
            with Job.lock:
                Job.running.discard(self)
            self.done.set()

    @staticmethod
    def busy() -> list[str]:
        with Job.lock:
            return sorted(job.name for job in Job.running)


def wait_for(done: Callable[[], bool], recorder: Signals, deadline: float | None,
          after: float = 0.0) -> tuple[int, float] | None:
    """Until ``done()`` (``None``), a signal arrives after ``after``, or the deadline (``None``)."""
    while not done():
        sig = recorder.pop(after)
        if sig is not None:
            return sig
        timeout = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
        if timeout <= 0:
            return None
        time.sleep(timeout)  # a signal's handler runs within it; seen at the next scan
    return None


class Watchdog:
    """Ends the process ``seconds`` from now with the signal's status unless cancelled: a timer thread
    calls ``os._exit``, and the kernel's SIGALRM ``ALARM_MARGIN_S`` later if that thread cannot run.
    Armed and cancelled from the main thread (driver); an application's own interval timer is put
    back on cancel, with the time that passed taken off."""

    def __init__(self, seconds: float, signum: int) -> None:
        self._timer = threading.Timer(seconds, os._exit, args=(128 + signum,))
        self._timer.daemon = True
        self._timer.start()
        self._armed = time.monotonic()
        self._handler = signal.signal(signal.SIGALRM, signal.SIG_DFL)
        self._previous = signal.setitimer(signal.ITIMER_REAL, seconds + ALARM_MARGIN_S)

    def cancel(self) -> None:
        self._timer.cancel()
        delay, interval = self._previous
        left = max(delay - (time.monotonic() - self._armed), 1e-3) if delay > 0 else 0.0
        signal.setitimer(signal.ITIMER_REAL, left, interval)
        signal.signal(signal.SIGALRM, self._handler if self._handler is not None else signal.SIG_DFL)


def stop_ray(signum: int, nums: Sequence[int] = ()) -> None:
    """Shut Ray down, within ``SHUTDOWN_TIMEOUT_S`` (else the process ends with the signal's status).
    The script is stopping as asked; left to Ray's atexit hook, the shutdown would turn an uncaught
    KeyboardInterrupt's exit status into 1 instead of "killed by SIGINT" (130). Meanwhile the signals
    ``nums`` take the kernel's default action: one more Ctrl+C ends the process at once, instead of
    waiting for the shutdown. Main thread (driver); ``fit`` restores the handlers afterwards."""
    import ray

    for n in nums:
        signal.signal(n, signal.SIG_DFL)
    watchdog = Watchdog(SHUTDOWN_TIMEOUT_S, signum)
    try:
        ray.shutdown()
    finally:
        watchdog.cancel()


def leave(signum: int, ended: threading.Event) -> NoReturn:
    """The script stops for ``signum`` (Ray already shut down): raise ``KeyboardInterrupt`` (SIGINT)
    or ``SystemExit(128 + signum)`` as Python would, so the script's own ``finally`` blocks run. But
    if a storage call of ours, or ``trainer.fit()``, is still running, the interpreter's exit would
    wait for it (pyarrow's atexit S3 finalizer waits for every S3 call in flight): end it here."""
    busy = Job.busy() + ([] if ended.is_set() else ["fit"])
    if busy:
        logger.warning("dyncheck: ending the process now (status %d): still running: %s", 128 + signum,
                       ", ".join(busy))
        exit_now(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def exit_now(signum: int) -> NoReturn:
    """Flush the logs and stdio, then end the process with the signal's status, from the main thread
    and without the interpreter's exit (no atexit hooks, no finalizers that wait for stuck threads).
    A flush that blocks (a stuck log handler or pipe) is cut short by the kernel's alarm."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if not 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= ALARM_MARGIN_S:  # keep a sooner one
        signal.setitimer(signal.ITIMER_REAL, ALARM_MARGIN_S)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, closed, or a broken pipe: nothing to keep
            pass
    os._exit(128 + signum)
