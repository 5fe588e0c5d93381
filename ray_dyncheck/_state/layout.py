"""The checkpoint layout: format versions, file names, and the manifest (``dyncheck.json``) that
lists every file of a checkpoint; read back with its names kept inside the checkpoint.
"""


from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow.fs as pafs

from .._requests.files import read_capped
from .dcp_safe import stays_inside

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "SHARDED_FORMAT_VERSION",
    "TRAINER_FILE",
    "read_manifest",
    "read_stored_manifest",
    "write_manifest",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The plain layout (rank 0 writes everything)."""
SHARDED_FORMAT_VERSION = 2
"""Every rank writes its shard with DCP."""
KNOWN_VERSIONS = (FORMAT_VERSION, SHARDED_FORMAT_VERSION)
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer_state.pt"
MANIFEST_FILE = "dyncheck.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a sharded model's manifest lists many files


def write_manifest(directory: str, files: Sequence[str] | Mapping[str, int], *, kind: str, step: int,
                   world_size: int, format_version: int = FORMAT_VERSION, **extra: Any) -> dict[str, int]:
    """Write the manifest of ``files`` (paths relative to ``directory``): the last file of a
    checkpoint, so :func:`read_manifest` can tell a complete one. Returns ``{file: bytes}``.

    ``files`` may be ``{file: bytes}``: sizes as given, for files that other ranks store into the
    same checkpoint and that are therefore not in ``directory``.
    """
    sizes = (dict(files) if isinstance(files, Mapping)
             else {name: os.path.getsize(os.path.join(directory, name)) for name in files})
    manifest = {"format_version": format_version, "kind": kind, "step": step, "world_size": world_size,
                **extra, "files": sizes}
    with open(os.path.join(directory, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return sizes


def _check_version(manifest: Mapping[str, Any], where: str) -> None:
    if manifest.get("format_version") not in KNOWN_VERSIONS:
        raise ValueError(f"checkpoint {where} has format_version {manifest.get('format_version')!r}; this "
                         f"ray_dyncheck reads {', '.join(map(str, KNOWN_VERSIONS))}: upgrade ray_dyncheck to "
                         "load it")


def _check_names(files: Mapping[str, Any], where: str) -> None:
    """A manifest names files inside its checkpoint only: it comes from storage, and a ``../`` or an
    absolute name would have a resume or an export read (and check) a file elsewhere."""
    if not isinstance(files, Mapping) or not all(isinstance(v, int) for v in files.values()):
        raise ValueError(f"checkpoint {where} has a {MANIFEST_FILE} whose 'files' is not a map of file names "
                         "to sizes: it is damaged; resume from another checkpoint")
    for name in files:
        if not stays_inside(name):
            raise ValueError(f"checkpoint {where} lists {name!r}, a file outside its directory: refused (a "
                             f"{MANIFEST_FILE} names files by their paths inside the checkpoint)")


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The manifest if ``directory`` is a complete ray_dyncheck checkpoint, else ``None``.

    Raises:
        ValueError: the manifest exists but files are missing or truncated (an incomplete write), or
            it names a file outside ``directory``.
    """
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    _check_version(manifest, directory)
    _check_names(manifest.get("files"), directory)
    for name, size in manifest["files"].items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file) or os.path.getsize(file) != size:
            raise ValueError(f"checkpoint {directory} is incomplete: {name} is missing or truncated")
    return manifest


def read_stored_manifest(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """:func:`read_manifest` of a checkpoint in storage, over its filesystem: file sizes are compared,
    nothing is downloaded. ``None`` when it has no manifest.

    Raises:
        ValueError: the manifest is malformed, a file it lists is missing or truncated, or outside
            ``path``.
    """
    file = posixpath.join(path, MANIFEST_FILE)
    if fs.get_file_info(file).type == pafs.FileType.NotFound:
        return None
    try:
        manifest = json.loads(read_capped(fs, file, MAX_MANIFEST_BYTES))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
        kind, step = manifest["kind"], int(manifest["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint {path} has a malformed {MANIFEST_FILE}: {exc}") from None
    _check_version(manifest, path)
    _check_names(files, path)
    names = list(files)
    for name, info in zip(names, fs.get_file_info([posixpath.join(path, n) for n in names])):
        if info.type != pafs.FileType.File or info.size != files[name]:
            raise ValueError(f"checkpoint {path} is incomplete: {name} is missing or truncated")
    return {**manifest, "kind": kind, "step": step}
