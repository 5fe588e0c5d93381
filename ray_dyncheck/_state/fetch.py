"""Finding and fetching a stored checkpoint: the newest one a resume may use (judged in storage, without
downloading it), and one checkpoint as a local directory."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow.fs as pafs

__all__ = ["STOP", "download", "local_directory", "newest"]

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
