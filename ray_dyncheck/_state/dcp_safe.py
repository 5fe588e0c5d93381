"""Reading a DCP checkpoint without running code from storage.

DCP's own reader unpickles ``.metadata`` and loads its non-tensor items with
``torch.load(weights_only=False)``: here ``.metadata`` is unpickled through an allow-list of the classes
DCP writes into it, non-tensor items (an optimizer's ``lr``, ``betas``) load with ``weights_only=True``,
and every file name must stay inside the checkpoint. Anyone who can write to the bucket could otherwise
run code on every rank at resume, and on the machine that exports.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import posixpath
import re
from typing import IO, Any, cast

import torch

from ..errors import CheckpointRestoreError

__all__ = ["METADATA_GLOBALS", "MetadataUnpickler", "check_dcp_folder", "refusal", "safe_dcp", "stays_inside"]


METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "BytesStorageMetadata", "TensorStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how a torch.layout pickles: a string back to the layout
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # StorageMeta.checkpoint_id (3.13 has both names)
})
"""Every global a DCP ``.metadata`` refers to (torch 2.13, from pickletools on real saves: FSDP2 and
unsharded, full and weights-only), besides torch's dtype, layout and memory format constants."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: a global outside :data:`METADATA_GLOBALS` is
    refused before its module is even imported, so no code from the file runs."""

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        constant = module == "torch" and isinstance(torch.__dict__.get(name),
                                                    (torch.dtype, torch.layout, torch.memory_format))
        if constant or (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointRestoreError(
            f"{self.where}: refused to unpickle {module}.{name}: not a DCP metadata class. The file was "
            "not written by torch.distributed.checkpoint, or was altered; nothing of it was run")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointRestoreError(f"{self.where}: refused a persistent id: not DCP metadata")


def stays_inside(name: Any) -> bool:
    """A relative name that stays inside its folder (checked on the text: no symlinks followed)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or posixpath.isabs(name):
        return False
    norm = posixpath.normpath(name)
    return norm not in (".", "..") and not norm.startswith("../")


def refuse_item(fqn: str, where: str, exc: Exception) -> CheckpointRestoreError:
    # torch's message ends in advice to allow-list the global: not what a reader of a hostile file needs.
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    why = (f"it refers to {found.group(1)}, which torch.load(weights_only=True) refuses" if found
           else f"torch.load(weights_only=True) refuses it: {first}")
    return CheckpointRestoreError(
        f"refused to load {fqn} from {where}: {why}. A non-tensor DCP item may hold numbers, strings, lists, "
        "dicts and tensors only: the checkpoint was not written by ray_dyncheck, or was altered")


@functools.cache
def safe_dcp() -> tuple[type, type, type]:
    """DCP's reader and load planners, made safe: ``(reader, planner, empty-state-dict planner)``.
    Built on first use: DCP is imported only when a sharded checkpoint is loaded."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        """``read_metadata`` through :class:`MetadataUnpickler`, read once: DCP's own call then gets
        the metadata already checked, not a second read of a file that may have changed."""

        def __init__(self, path: str) -> None:
            super().__init__(path)
            self._metadata: Metadata | None = None

        def reset(self, checkpoint_id: Any = None) -> None:
            super().reset(checkpoint_id)
            self._metadata = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            where = str(self._get_metadata_path())
            if kwargs.get("rank") is not None:  # DCP's fallback after a failed read: we never write these
                raise CheckpointRestoreError(f"{where} is unreadable, and ray_dyncheck writes no per-rank metadata")
            if self._metadata is None:
                with self.fs.create_stream(where, "rb") as file:
                    try:
                        metadata = MetadataUnpickler(cast(IO[bytes], file), where).load()
                    except CheckpointRestoreError:
                        raise
                    except Exception as exc:
                        raise CheckpointRestoreError(f"{where} is not DCP metadata: {type(exc).__name__}: "
                                                     f"{exc}") from None
                if not isinstance(metadata, Metadata):
                    raise CheckpointRestoreError(f"{where} holds a {type(metadata).__name__}, not DCP metadata")
                for info in (metadata.storage_data or {}).values():
                    relative = getattr(info, "relative_path", None)
                    if not stays_inside(relative):
                        raise CheckpointRestoreError(f"{where} names {relative!r}, a file outside its folder: refused")
                storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
                storage_meta.load_id = self.load_id  # as DCP's own read_metadata
                metadata.storage_meta = storage_meta
                self._metadata = metadata
            return self._metadata

    def safe_load_bytes(planner: Any, read_item: Any, value: Any) -> None:
        """DCP's ``load_bytes`` with ``weights_only=True`` (where DCP itself passes ``False``)."""
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise refuse_item(fqn, planner.where, exc) from None
        if planner.flatten_state_dict:
            set_element(planner.original_state_dict, planner.mappings[fqn], obj)
        else:
            planner.state_dict[fqn] = obj

    class SafePlanner(DefaultLoadPlanner):
        def __init__(self, where: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.where = where

        load_bytes = safe_load_bytes

    class SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
        def __init__(self, where: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.where = where

        load_bytes = safe_load_bytes

    return SafeReader, SafePlanner, SafeEmptyPlanner


def check_dcp_folder(path: str) -> None:
    """A DCP folder that another library will load with DCP's own reader (Accelerate's FSDP layout in
    a Hugging Face checkpoint: ``pytorch_model_fsdp_0/``, ``optimizer_0/``): its ``.metadata`` through
    the allow-list, every non-tensor item through ``torch.load(weights_only=True)``, before anything
    unpickles them freely. Raises :class:`CheckpointRestoreError` naming the file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    reader_type, _, _ = safe_dcp()
    metadata = reader_type(path).read_metadata()
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        file = os.path.join(path, info.relative_path)
        with open(file, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            torch.load(io.BytesIO(raw), weights_only=True)
        except pickle.UnpicklingError as exc:
            raise refuse_item(index.fqn, file, exc) from None


def refusal(exc: BaseException) -> BaseException:
    """Our refusal inside DCP's ``CheckpointException`` (which wraps every rank's error), else ``exc``."""
    for failure in getattr(exc, "failures", {}).values():
        if isinstance(failure[0], CheckpointRestoreError):
            return failure[0]
    return exc
