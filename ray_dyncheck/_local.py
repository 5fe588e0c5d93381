"""Checkpoints in a run directory on any ``pyarrow.fs`` filesystem, without Ray."""

from __future__ import annotations

import contextlib
import logging
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import torch

from ._core import OnDone
from ._files import RUN_MARKER, read_json, resolve_run_dir, write_json

__all__ = ["COMMIT_MARKER", "LocalBackend"]

logger = logging.getLogger(__name__)

# Written last into a stored checkpoint directory: without it the directory is not a checkpoint.
COMMIT_MARKER = ".dyncheck-committed"


class LocalBackend:
    """Checkpoints in a run directory on any ``pyarrow.fs`` filesystem, without Ray.

    For plain ``torch.distributed`` scripts (and the GPU check). Rank 0 stores ``<run>/<name>/``
    synchronously and leaves the run-start marker that makes older requests stale. A checkpoint is
    committed by its last file, ``.dyncheck-committed`` (on a local disk it is also written beside its
    final name and renamed into place): a directory without it (a writer killed halfway) is never
    listed, and checkpoints are listed newest commit first.

    Args:
        run_dir: Local path or URI of the run directory.
        filesystem: The filesystem ``run_dir`` is on (default: from the path or URI).
    """

    merges_rank_dirs = False

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

    def prepare(self, directory: str, metadata: dict[str, Any]) -> None:
        """Rank 0, before :meth:`report`: the metadata Ray would keep in ``.metadata.json``."""
        write_json(pafs.LocalFileSystem(), posixpath.join(directory, ".metadata.json"), metadata)

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone) -> None:
        """Never raises: a failed store is handed to ``on_done`` (an error receipt), and training goes on."""
        if directory is None:
            return
        if self.rank != 0:  # only rank 0's directory is stored here
            shutil.rmtree(directory, ignore_errors=True)
            on_done(None, None)
            return
        dest = posixpath.join(self.run_dir, name)
        try:
            local = self.fs.type_name == "local"
            staging = posixpath.join(self.run_dir, f".tmp-{name}") if local else dest
            self.fs.create_dir(staging, recursive=True)
            pafs.copy_files(directory, staging, destination_filesystem=self.fs)
            if local:
                self.fs.move(staging, dest)
            write_json(self.fs, posixpath.join(dest, COMMIT_MARKER), {"name": name, "time": time.time()})
        except Exception as exc:
            logger.error("dyncheck: storing checkpoint %s in %s failed: %s: %s", name, self.run_dir,
                         type(exc).__name__, exc)
            on_done(None, exc)
            return
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        on_done(dest, None)

    def committed(self, path: str, timeout: float) -> bool:
        """Stored is committed here: ``on_done`` runs only after the commit marker is written."""
        return True

    def checkpoints(self) -> Iterator[str]:
        """Committed checkpoints, newest commit first."""
        sel = pafs.FileSelector(self.run_dir, allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            marker = read_json(self.fs, posixpath.join(info.path, COMMIT_MARKER))
            if marker is None or not isinstance(marker.get("time"), (int, float)):
                continue  # never committed: a writer died halfway
            found.append((float(marker["time"]), info.path))
        for _, path in sorted(found, reverse=True):
            yield path

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[str]:
        """A checkpoint as a local directory (downloaded first from a remote filesystem)."""
        if self.fs.type_name == "local":
            yield path
            return
        tmp = tempfile.mkdtemp(prefix="dyncheck-restore-")
        try:
            pafs.copy_files(path, tmp, source_filesystem=self.fs)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
