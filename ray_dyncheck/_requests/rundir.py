"""The run directory of a Ray ``RunConfig``, as the driver reaches it (no Ray import: the config is read
by its attributes)."""

from __future__ import annotations

import posixpath
import threading
from typing import Any

import pyarrow.fs as pafs

from .files import bounded, filesystem_from_uri

__all__ = ["RunDir"]


class RunDir:
    """The run directory of a ``RunConfig``, resolved on first use by whichever helper thread needs it
    (resolving an ``s3://`` URI talks to the store). ``str()`` is a label for logs, with no I/O.

    Not ``RunConfig.storage_context``: building it writes Ray's run-start marker, which must be left
    to ``fit()`` (the controller builds its own when this one was not cached)."""

    def __init__(self, run_config: Any) -> None:
        self.config = run_config
        self._lock = threading.Lock()
        self._resolved: tuple[pafs.FileSystem, str] | None = None

    def __str__(self) -> str:
        base, q, query = str(self.config.storage_path).partition("?")  # s3://b/p?endpoint_override=...
        return posixpath.join(base, str(self.config.name)) + q + query

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        """The filesystem Ray stores the run on (as ``get_fs_and_path`` resolves it), with bounded
        retries and timeouts: an S3/GCS one the user gave is rebuilt from its own options."""
        with self._lock:
            if self._resolved is None:
                path = str(self.config.storage_path)
                fs = self.config.storage_filesystem
                if fs is None:
                    fs, path = filesystem_from_uri(path)
                else:
                    fs = bounded(fs)
                self._resolved = fs, posixpath.join(path, str(self.config.name))
            return self._resolved

    def join(self, *parts: str) -> tuple[pafs.FileSystem, str]:
        fs, root = self.resolve()
        return fs, posixpath.join(root, *parts)
