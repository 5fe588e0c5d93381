"""Finding and fetching a stored checkpoint: the newest one a resume may use (judged in storage, without
downloading it), one checkpoint as a local directory, and the downloads a framework resumes from, kept until
it has read them."""

from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow.fs as pafs

__all__ = ["STOP", "download", "keep_download", "local_directory", "newest", "release_downloads"]

logger = logging.getLogger(__name__)

STOP: Any = object()
"""What a judge returns to end the search with no checkpoint (the newest is not one to resume from)."""

Judge = Callable[[str, bool], "dict[str, Any] | None"]
"""``judge(path, newest) -> choice``: ``None`` to look at the next older one, :data:`STOP` to choose none;
``OSError``/``ValueError`` (torn, unreadable) skip it with a log line."""


def newest(paths: Iterable[str], judge: Judge, log: Callable[..., None] = logger.error) -> dict[str, Any] | None:
    """The first of ``paths`` (newest first) that ``judge`` accepts, or ``None``."""
    for i, path in enumerate(paths):
        try:
            choice = judge(path, i == 0)
        except (OSError, ValueError) as exc:  # a torn or unreadable checkpoint: try the one before it
            log("dyncheck: skipping checkpoint %s: %s", path, exc)
            continue
        if choice is STOP:
            return None
        if choice is not None:
            return choice
    return None


def download(fs: pafs.FileSystem, path: str, *, prefix: str, dir: str | None = None) -> str:
    """A copy of the checkpoint at ``path`` on ``fs`` in a new local folder (the caller removes it)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=dir)
    try:
        pafs.copy_files(path, tmp, source_filesystem=fs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


@contextlib.contextmanager
def local_directory(fs: pafs.FileSystem, path: str, prefix: str = "dyncheck-restore-") -> Iterator[str]:
    """The checkpoint at ``path`` as a local directory: itself on a local filesystem, else a download
    removed on exit."""
    if fs.type_name == "local":
        yield path
        return
    tmp = download(fs, path, prefix=prefix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_downloads_lock = threading.Lock()
_downloads: dict[str, int] = {}
"""Checkpoints downloaded for a framework's resume that nobody removed yet: path -> the thread that resumes
from it. Guarded by ``_downloads_lock`` (any thread may release them, at exit too)."""
_at_exit = False


def keep_download(path: str) -> None:
    """Remember a download until the training that resumes from it (in this thread) has read it."""
    global _at_exit
    with _downloads_lock:
        _downloads[path] = threading.get_ident()
        if not _at_exit:  # registered on first use: importing this module changes nothing
            _at_exit = True
            atexit.register(release_downloads, everyone=True)


def release_downloads(*, everyone: bool = False) -> None:
    """Remove the downloads kept in this thread (``everyone``: in every thread, as at interpreter exit)."""
    me = threading.get_ident()
    with _downloads_lock:
        mine = [path for path, thread in _downloads.items() if everyone or thread == me]
        for path in mine:
            del _downloads[path]
    for path in mine:
        shutil.rmtree(path, ignore_errors=True)
