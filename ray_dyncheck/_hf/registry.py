"""Every HF callback's open worker core, so what a ``train()`` that raised left open (HF then calls no
callback) is released: at the next ``on_train_begin`` of the same thread, once the thread that trained
has ended, or at interpreter exit."""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .._core import WorkerCore

__all__ = ["close_core", "forget", "release_leftovers", "track"]

Release = Callable[[WorkerCore], bool]
"""``release(core)``: the callback releases what it holds if ``core`` is still its own (``True``)."""


@dataclass
class _Open:
    """A callback's core from ``on_train_begin`` until it is closed, and the thread that trains with it."""

    core: WorkerCore
    thread: threading.Thread
    release: weakref.WeakMethod[Release]


_open_lock = threading.Lock()
_open: dict[int, _Open] = {}
"""Every callback's open core, by ``id(core)``. Guarded by ``_open_lock`` (training threads; the
interpreter's exit)."""
_at_exit = False


def track(core: WorkerCore, release: Release) -> None:
    """``core`` is open, in this thread; ``release`` (a bound method of its callback, held weakly)."""
    global _at_exit
    with _open_lock:
        _open[id(core)] = _Open(core, threading.current_thread(), weakref.WeakMethod(release))
        if not _at_exit:  # registered on first use: importing this module changes nothing
            _at_exit = True
            atexit.register(release_leftovers, everyone=True)


def forget(core: WorkerCore) -> None:
    with _open_lock:
        _open.pop(id(core), None)


def release_leftovers(*, everyone: bool = False) -> None:
    """Close the cores that ``train()`` calls which raised left open: those of this thread (it is
    not in one of them: a thread trains once at a time), of threads that have ended, or (``everyone``,
    at interpreter exit) all."""
    me = threading.current_thread()
    with _open_lock:  # taken out under the lock: two threads (or atexit) never close the same core
        keys = [k for k, rec in _open.items() if everyone or rec.thread is me or not rec.thread.is_alive()]
        stale = [_open.pop(k) for k in keys]
    for rec in stale:
        release = rec.release()
        if release is not None and release(rec.core):
            continue
        close_core(rec.core, clean=False)


def close_core(core: WorkerCore, clean: bool) -> None:
    """Close ``core``, then end its backend's threads (the core waited for its stores)."""
    try:
        core.close(clean=clean)
    finally:
        core.backend.close(timeout=0.0)
