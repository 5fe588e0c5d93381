"""The driver side: ``rdc.fit(trainer)`` turns Ctrl+C / SIGTERM into a save, then a clean stop.

Runs in the driver process (your script, or the entrypoint of ``ray job submit``). While it runs it
owns the interrupt signals: ``trainer.fit()`` runs in a thread, the main thread waits for it and for
signals. A handler only records the signal; a helper thread writes one request (``{"kind":
on_interrupt, "stop": true}``) into the run's request folder, the same channel rank 0 already reads,
and the main thread waits for the workers to save and stop under a deadline. The main thread never
touches storage: a hung filesystem cannot keep Ctrl+C from working. Every wait has a deadline, the
driver's storage calls give up in bounded time (``_requests.files.bounded``), and when the script must stop
while a storage call is still stuck, the main thread ends the process itself rather than leave it to
the interpreter's exit (which waits for that call).

Example::

    import ray_dyncheck as rdc
    result = rdc.fit(trainer)        # instead of trainer.fit()
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any, NoReturn, Sequence

from ._logs import console
from ._requests.channel import answer_leftovers
from ._requests.files import RECEIPTS, REQUESTS, new_id, read_json, write_json
from ._requests.rundir import RunDir
from ._shutdown import Job, Signals, Watchdog, exit_now, leave, stop_ray, wait_for
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
        return _fit(trainer, cfg)

    run_dir = RunDir(trainer.run_config)
    # Resolved now, on a helper thread (even that may touch storage), while storage is likely healthy:
    # creating an S3 client waits until every S3 call in flight in the process has ended.
    Job("resolve", run_dir.resolve)
    box: dict[str, Any] = {}
    ended = threading.Event()

    def run() -> None:
        try:
            box["result"] = _fit(trainer, cfg)
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc
        finally:
            ended.set()

    recorder = Signals()
    previous = {n: signal.signal(n, recorder.handler) for n in nums}
    try:
        threading.Thread(target=run, name="dyncheck-fit", daemon=True).start()
        first = wait_for(ended.is_set, recorder, None)  # the training itself: as long as it takes
        if first is None:
            _, late = _tidy(run_dir, box, None, recorder, 0.0)
            late = late or recorder.pop(0.0)  # one that came as fit() ended is not dropped either
            if late is not None and raise_on_interrupt and "error" not in box:
                stop_ray(late[0], nums)  # Ctrl+C while we tidied up: the script stops, as it asked
                leave(late[0], ended)
            return _outcome(box)
        signum, t_sig = first
        name = signal.Signals(signum).name
        ask = "to stop without saving" if kind == "none" else f"for a {kind.replace('weights', 'weights-only')} save"
        logger.warning("dyncheck: interrupt received (%s): asking workers %s (%s again to force)", name, ask, name)
        rid = new_id("interrupt")
        body = {"id": rid, "kind": kind, "stop": True, "source": "interrupt"}
        write = Job("request", lambda: write_json(*run_dir.join(REQUESTS, f"{rid}.json"), body))
        after = t_sig + DEBOUNCE_S
        second = wait_for(write.done.is_set, recorder, time.monotonic() + REQUEST_TIMEOUT_S, after)
        written = write.done.is_set() and write.error is None
        if second is None and not written and not ended.is_set():
            cause = (f"{type(write.error).__name__}: {write.error}" if write.error is not None
                     else f"storage did not answer within {REQUEST_TIMEOUT_S:g} s")
            logger.error("dyncheck: cannot ask the workers to save: writing the interrupt request into %s "
                         "failed (%s); stopping without a save", run_dir, cause)
            stop_ray(signum, nums)  # the workers were not told: stopping Ray stops them
            # A timed-out write is not cancelled and may still land: once it has ended (bounded), what
            # is in the request folder is answered, so nobody waits on a request to a stopped run.
            # If storage stays silent past the tidy deadline, the next fit() discards it as stale.
            _, late = _tidy(run_dir, box, None, recorder, after, write,
                            why="the driver stopped the run without a save (its interrupt request could "
                                "not be written in time)")
            if late is not None:  # Ctrl+C again while we tidied up: no more waiting
                exit_now(signum)
            if raise_on_interrupt:
                leave(signum, ended)
            return box.get("result")
        if second is None:
            second = wait_for(ended.is_set, recorder, time.monotonic() + grace, after)
        if not ended.is_set():
            _force_exit(signum, second, grace, rid, run_dir, written, nums)
        receipt, late = _tidy(run_dir, box, rid, recorder, after, write)
        logger.warning("dyncheck: stopped after the interrupt in %.1f s; %s", time.monotonic() - t_sig,
                       _where(receipt, box))
        if late is not None:  # Ctrl+C again while we tidied up: no more waiting
            exit_now(signum)
        if raise_on_interrupt:
            if "error" in box:
                if Job.busy():  # raised into the interpreter's exit, a stuck storage call would hold it
                    logger.error("dyncheck: fit() raised after the interrupt: %s: %s", type(box["error"]).__name__,
                                 box["error"])
                    exit_now(signum)
                raise box["error"]
            stop_ray(signum, nums)
            leave(signum, ended)
        return _outcome(box)
    finally:
        for n, h in previous.items():
            signal.signal(n, h if h is not None else signal.SIG_DFL)


def _fit(trainer: Any, cfg: DynamicCheckpointConfig) -> Any:
    """``trainer.fit()``, with this driver's memory holders around it when ``memory_snapshots`` is on."""
    holders = _start_holders() if cfg.snapshots_on else []
    try:
        return trainer.fit()
    finally:
        if holders:
            from ._backends.holders import stop_holders

            stop_holders(holders)  # the run is over: what they held goes (they would die with us anyway)


def _start_holders() -> list[Any]:
    """The fit thread: one memory holder per node, owned by this driver (see ``_backends/holders.py``). A
    failure leaves the run on storage-only recovery, said in one line."""
    import ray

    from ._backends.holders import start_holders

    if not ray.is_initialized():
        ray.init()  # what trainer.fit() would do on its first Ray call
    try:
        return start_holders()
    except Exception as exc:
        logger.error("dyncheck: could not start the memory holders (%s: %s): memory snapshots are off for this "
                     "run; a crash resumes from storage", type(exc).__name__, exc)
        return []


def _force_exit(signum: int, second: tuple[int, float] | None, grace: float, rid: str, run_dir: RunDir,
                written: bool, nums: list[int]) -> NoReturn:
    """Ends the process within ``FORCE_EXIT_S`` with the first signal's status. Main thread (driver)."""
    Watchdog(FORCE_EXIT_S, signum)  # from here on nothing can keep the process alive
    for n in nums:  # and a further Ctrl+C ends it at once, by the kernel's default action
        signal.signal(n, signal.SIG_DFL)
    why = (f"second {signal.Signals(second[0]).name}" if second is not None
           else f"no answer within interrupt_grace_s={grace:g} s")
    job = Job("receipt", lambda: read_json(*run_dir.join(RECEIPTS, f"{rid}.json"))) if written else None
    seen = ("the request is not written yet (storage has not answered)" if job is None
            else "the receipt could not be read in time" if not job.done.wait(1.0)
            else job.result or "no receipt yet (the workers have not saved)")
    logger.error("dyncheck: forced exit (%s); waited for request %s in %s; last seen: %s",
                 why, rid, run_dir, seen)
    import ray

    ray.shutdown()
    exit_now(signum)


def _tidy(run_dir: RunDir, box: dict[str, Any], rid: str | None, recorder: Signals, after: float,
          write: Job | None = None, why: str | None = None
          ) -> tuple[dict[str, Any] | None, tuple[int, float] | None]:
    """``fit()`` has ended (or Ray was stopped): once the interrupt's ``write`` has ended, requests
    nobody served get ``unserved`` receipts (saying ``why``), then the interrupt's receipt (request
    ``rid``) is read, on a helper thread, for at most ``TIDY_TIMEOUT_S`` in all or until a signal.
    Runs on the driver's main thread; returns ``(receipt, signal)``."""
    err = box.get("error")
    why = why or (f"the run ended (fit() {f'raised {type(err).__name__}' if err else 'returned'}) "
                  "before a check served it")
    deadline = time.monotonic() + TIDY_TIMEOUT_S

    def answer() -> tuple[list[str], dict[str, Any] | None]:
        if write is not None:
            write.done.wait(max(0.0, deadline - time.monotonic()))  # a late write lands before the listing
        answered = answer_leftovers(*run_dir.resolve(), why)
        return answered, read_json(*run_dir.join(RECEIPTS, f"{rid}.json")) if rid else None

    job = Job("leftovers", answer)
    sig = wait_for(job.done.is_set, recorder, deadline, after)
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
