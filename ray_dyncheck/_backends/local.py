"""Checkpoints in a run directory on any ``pyarrow.fs`` filesystem, without Ray."""

from __future__ import annotations

import contextlib
import logging
import posixpath
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, ContextManager

import pyarrow.fs as pafs
import torch

from .._requests.files import RUN_MARKER, read_json, read_json_large, resolve_run_dir, write_json
from .._state import MANIFEST_FILE
from .._state.fetch import local_directory
from .._state.memory import MemoryStore
from .base import Backend, OnDone

__all__ = ["COMMIT_MARKER", "LocalBackend"]

logger = logging.getLogger(__name__)

# Written last into a stored checkpoint directory: without it the directory is not a checkpoint.
COMMIT_MARKER = ".dyncheck-committed"


class LocalBackend(Backend):
    """Checkpoints in a run directory on any ``pyarrow.fs`` filesystem, without Ray.

    For plain ``torch.distributed`` scripts (and the GPU check). Each rank that has files stores them
    into ``<run>/<name>/`` in a background thread (after its background write, if any); rank 0 then
    waits until every file the manifest lists is there (a sharded checkpoint: every rank's shard) and
    commits the checkpoint with its last file, ``.dyncheck-committed`` (on a local disk the files are
    staged beside the final name and renamed into place). A directory without it (a writer killed
    halfway) is never listed, and checkpoints are listed newest commit first. A failed store gives
    an error receipt; training goes on. The store thread runs until :meth:`close` (or the end of a
    ``with`` block; the hook and the HF callback close it too when they close).

    Example::

        with rdc.LocalBackend("/shared/runs/exp1") as backend:
            with rdc.DynamicCheckpoint(cfg, model=model, optimizer=opt, backend=backend) as dc:
                ...

    Args:
        run_dir: Local path or URI of the run directory (shared by every rank that stores files).
        filesystem: The filesystem ``run_dir`` is on (default: from the path or URI).
        store_timeout_s: How long rank 0 waits for the other ranks' files of a checkpoint.
        memory: Where memory snapshots are held (``memory_snapshots``); default: none (storage only).
    """

    merges_rank_dirs = True

    def __init__(self, run_dir: str, *, filesystem: pafs.FileSystem | None = None,
                 store_timeout_s: float = 300.0, memory: MemoryStore | None = None) -> None:
        self.fs, self.run_dir = resolve_run_dir(run_dir, filesystem)
        self._memory = memory
        self.store_timeout_s = store_timeout_s
        self.rank, self.world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.rank == 0:
            self.fs.create_dir(self.run_dir, recursive=True)
            with self.fs.open_output_stream(posixpath.join(self.run_dir, RUN_MARKER)):
                pass
        self._lock = threading.Lock()
        """Guards the store thread's executor and the stores handed to it."""
        self._executor: ThreadPoolExecutor | None = None
        self._stores: set[Future[None]] = set()

    def memory(self) -> MemoryStore | None:
        return self._memory

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float | None = None) -> None:
        """Wait until the checkpoints handed over so far are stored (at most ``timeout`` seconds,
        default ``store_timeout_s`` plus a minute), then end the store thread. A store still running
        then is not cut short: the thread ends after it. The backend stays usable: a later report
        starts a new thread. The hook and the HF callback call it with ``timeout=0`` when they close
        (they have waited for their stores already)."""
        with self._lock:
            executor, self._executor = self._executor, None
            stores = list(self._stores)
        if executor is None:
            return
        left = wait(stores, self.store_timeout_s + 60.0 if timeout is None else timeout).not_done
        if left:
            logger.warning("dyncheck: %d checkpoint store(s) still running in %s; the store thread ends after "
                           "them", len(left), self.run_dir)
        executor.shutdown(wait=not left)

    def storage(self) -> tuple[pafs.FileSystem, str]:
        return self.fs, self.run_dir

    def prepare(self, directory: str, metadata: dict[str, Any]) -> None:
        """Rank 0, before :meth:`report`: the metadata Ray would keep in ``.metadata.json``."""
        write_json(pafs.LocalFileSystem(), posixpath.join(directory, ".metadata.json"), metadata)

    def report(self, metrics: dict[str, Any], directory: str | None, *, name: str,
               metadata: dict[str, Any], on_done: OnDone, written: Future[Any] | None = None) -> None:
        """Never raises: the store runs in the background; a failure is handed to ``on_done`` (an error
        receipt), and training goes on."""
        if directory is None:
            return
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="dyncheck-store")
            store = self._executor.submit(self._store, directory, name, on_done, written)
            self._stores.add(store)
        store.add_done_callback(self._stored)

    def _stored(self, store: Future[None]) -> None:
        with self._lock:
            self._stores.discard(store)

    def _store(self, directory: str, name: str, on_done: OnDone, written: Future[Any] | None) -> None:
        dest = posixpath.join(self.run_dir, name)
        local = self.fs.type_name == "local"
        staging = posixpath.join(self.run_dir, f".tmp-{name}") if local else dest
        try:
            if written is not None:
                written.result()
            self.fs.create_dir(staging, recursive=True)
            pafs.copy_files(directory, staging, destination_filesystem=self.fs)
            if self.rank == 0:
                self._await_files(staging, name)
                if local:
                    self.fs.move(staging, dest)
                write_json(self.fs, posixpath.join(dest, COMMIT_MARKER), {"name": name, "time": time.time()})
        except BaseException as exc:  # DCP's CheckpointException too: on_done must run
            logger.error("dyncheck: rank %d: storing checkpoint %s in %s failed: %s: %s", self.rank, name,
                         self.run_dir, type(exc).__name__, exc)
            if self.rank == 0 and local:
                with contextlib.suppress(Exception):
                    self.fs.delete_dir(staging)  # never committed: leave no half-staged folder
            on_done(None, exc)
            return
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        on_done(dest if self.rank == 0 else None, None)

    def _await_files(self, staging: str, name: str) -> None:
        """Rank 0: until every file of the manifest (the other ranks' too) is stored in full."""
        manifest = read_json_large(self.fs, posixpath.join(staging, MANIFEST_FILE))
        files = manifest.get("files") if manifest else None
        if not isinstance(files, dict):
            raise ValueError(f"checkpoint {name} has no readable manifest")
        deadline = time.monotonic() + self.store_timeout_s
        while True:
            infos = self.fs.get_file_info([posixpath.join(staging, f) for f in files])
            missing = [f for f, info in zip(files, infos) if info.type != pafs.FileType.File or info.size != files[f]]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} file(s) of other ranks not stored within "
                                   f"{self.store_timeout_s:g} s (LocalBackend(store_timeout_s=...)), e.g. "
                                   f"{missing[0]}: every rank must see the same run_dir (shared storage)")
            time.sleep(0.05)

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

    def open(self, path: str) -> ContextManager[str]:
        """A checkpoint as a local directory (downloaded first from a remote filesystem)."""
        return local_directory(self.fs, path)
