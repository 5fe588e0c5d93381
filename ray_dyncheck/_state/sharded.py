"""Sharded models (FSDP2, ``DTensor`` parameters): every rank writes its own shard with
``torch.distributed.checkpoint`` (DCP); nothing is gathered to one rank.

A sharded checkpoint holds ``dcp/`` (DCP's ``.metadata``, written by rank 0, and one
``__<rank>_0.distcp`` per rank) beside the usual ``trainer_state.pt`` and manifest. Model and
optimizer go through ``torch.distributed.checkpoint.state_dict``, so the names are the model's own
(FQNs) and a load reshards to any world size, or into an unsharded model. Nothing here imports Ray.

Loads run no code from storage (DESIGN invariant 13), though DCP's own reader unpickles ``.metadata``
and loads its non-tensor items with ``torch.load(weights_only=False)``: here ``.metadata`` is
unpickled through an allow-list of the classes DCP writes into it, and non-tensor items (an
optimizer's ``lr``, ``betas``) load with ``weights_only=True``. Anyone who can write to the bucket
could otherwise run code on every rank at resume, and on the machine that exports.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import posixpath
import re
from collections.abc import Mapping
from typing import IO, Any, cast

import torch
import torch.distributed as dist

from ..errors import CheckpointRestoreError

__all__ = ["DCP_DIR", "DCP_ERRORS", "check_supported", "is_sharded", "live_state", "load_full_weights", "load_sharded",
           "read_consolidated", "stays_inside", "write_sharded"]

DCP_DIR = "dcp"


def _dcp_errors() -> tuple[type[BaseException], ...]:
    try:  # DCP's own failure type derives from BaseException: `except Exception` misses it
        from torch.distributed.checkpoint import CheckpointException
    except ImportError:
        return (Exception,)
    return (Exception, CheckpointException)


DCP_ERRORS = _dcp_errors()
"""What a failed save or load raises: catch this, not just ``Exception``."""


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def check_supported(model: torch.nn.Module) -> None:
    """Refuse wrappers whose state the hook cannot save correctly (a save would hang or be wrong).

    Raises:
        ValueError: naming the wrapper and what is supported.
    """
    supported = ("Supported: plain modules, DistributedDataParallel, torch.compile, and FSDP2 "
                 "(torch.distributed.fsdp.fully_shard) or other DTensor-sharded models")
    names = {cls.__name__ for cls in type(model).__mro__}
    if "FullyShardedDataParallel" in names:
        raise ValueError("dynamic checkpoints do not support FSDP1 (FullyShardedDataParallel): its state_dict() "
                         "calls are collectives that one rank cannot make alone. Shard the model with FSDP2 "
                         f"(torch.distributed.fsdp.fully_shard) instead. {supported}")
    if "DeepSpeedEngine" in names or "PipelineEngine" in names:
        raise ValueError(f"dynamic checkpoints do not support DeepSpeed engines ({type(model).__name__}): "
                         f"DeepSpeed shards and saves its own state. {supported}")
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise ValueError(f"dynamic checkpoints do not support FSDP1 submodules ({module.__class__.__module__}"
                             f".FullyShardedDataParallel). {supported}")


def live_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, kind: str) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` referring to the live (sharded) tensors; ``optim`` only for
    ``full`` saves. Local: no collective for FSDP2."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if kind == "full" and optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        return {"model": msd, "optim": osd}
    return {"model": get_model_state_dict(model)}


def _any_rank(group: dist.ProcessGroup | None, flag: bool) -> bool:
    """``True`` on every rank of ``group`` when ``flag`` is set on any (as ``Agreement.any_rank``, on
    the caller's group); ``group=None``: this process alone."""
    if group is None:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def write_sharded(directory: str, state: Mapping[str, Any], group: dist.ProcessGroup | None) -> list[str]:
    """Every rank, at the same point: DCP-save ``state`` (a host copy) into ``directory/dcp``.
    Collective on ``group``; raises on every rank when any rank failed. Returns this rank's files."""
    import torch.distributed.checkpoint as dcp

    path = os.path.join(directory, DCP_DIR)
    failed: Exception | None = None
    try:
        os.makedirs(path, exist_ok=True)
        writer = dcp.FileSystemWriter(path, sync_files=True)
    except Exception as exc:
        failed = exc
    # Agreed before DCP's first collective: a rank that failed here would otherwise wait in its
    # caller's error agreement while the others wait inside dcp.save, the group's collectives out of
    # step until they time out, and the group broken for the saves after.
    if _any_rank(group, failed is not None):
        if failed is not None:
            raise failed
        raise RuntimeError("another rank could not prepare its part of the checkpoint (see its log); no rank "
                           "wrote it")
    dcp.save(dict(state), storage_writer=writer, process_group=group, no_dist=group is None)
    return sorted(f"{DCP_DIR}/{name}" for name in os.listdir(path))


_METADATA_GLOBALS = frozenset({
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


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: a global outside :data:`_METADATA_GLOBALS` is
    refused before its module is even imported, so no code from the file runs."""

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        constant = module == "torch" and isinstance(torch.__dict__.get(name),
                                                    (torch.dtype, torch.layout, torch.memory_format))
        if constant or (module, name) in _METADATA_GLOBALS:
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


def _refuse_item(fqn: str, where: str, exc: Exception) -> CheckpointRestoreError:
    # torch's message ends in advice to allow-list the global: not what a reader of a hostile file needs.
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    why = (f"it refers to {found.group(1)}, which torch.load(weights_only=True) refuses" if found
           else f"torch.load(weights_only=True) refuses it: {first}")
    return CheckpointRestoreError(
        f"refused to load {fqn} from {where}: {why}. A non-tensor DCP item may hold numbers, strings, lists, "
        "dicts and tensors only: the checkpoint was not written by ray_dyncheck, or was altered")


@functools.cache
def _safe_dcp() -> tuple[type, type, type]:
    """DCP's reader and load planners, made safe: ``(reader, planner, empty-state-dict planner)``.
    Built on first use: DCP is imported only when a sharded checkpoint is loaded."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        """``read_metadata`` through :class:`_MetadataUnpickler`, read once: DCP's own call then gets
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
                        metadata = _MetadataUnpickler(cast(IO[bytes], file), where).load()
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
            raise _refuse_item(fqn, planner.where, exc) from None
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

    reader_type, _, _ = _safe_dcp()
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
            raise _refuse_item(index.fqn, file, exc) from None


def _refusal(exc: BaseException) -> BaseException:
    """Our refusal inside DCP's ``CheckpointException`` (which wraps every rank's error), else ``exc``."""
    for failure in getattr(exc, "failures", {}).values():
        if isinstance(failure[0], CheckpointRestoreError):
            return failure[0]
    return exc


def _read_metadata(reader: Any, group: dist.ProcessGroup | None) -> Any:
    """Every rank: the checkpoint's metadata, read before DCP's first collective and agreed on, so a
    refusal on one rank fails the load on every rank instead of leaving the others in DCP."""
    metadata, failed = None, None
    try:
        metadata = reader.read_metadata()
    except Exception as exc:
        failed = exc
    if _any_rank(group, failed is not None):
        if failed is not None:
            raise failed
        raise CheckpointRestoreError("another rank could not read the checkpoint's metadata (see its log)")
    return metadata


def load_sharded(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 group: dist.ProcessGroup | None) -> bool:
    """Every rank: load a sharded checkpoint into ``model`` (sharded at any world size, or not at
    all) and, when it holds one, the optimizer. Collective on ``group``. Returns whether the
    optimizer was loaded.

    Raises:
        CheckpointRestoreError: the checkpoint holds something that would run code when loaded.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    reader_cls, planner_cls, _ = _safe_dcp()
    path = os.path.join(directory, DCP_DIR)
    reader = reader_cls(path)
    metadata = _read_metadata(reader, group)
    has_optim = optimizer is not None and any(key.startswith("optim.") for key in metadata.state_dict_metadata)
    target = live_state(model, optimizer, "full" if has_optim else "weights")
    try:
        dcp.load(target, storage_reader=reader, planner=planner_cls(path), process_group=group,
                 no_dist=group is None)
    except DCP_ERRORS as exc:
        refused = _refusal(exc)
        if refused is exc:
            raise
        raise refused from None
    if has_optim:
        assert optimizer is not None
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    else:
        set_model_state_dict(model, target["model"])
    return has_optim


def load_full_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Every rank: full (unsharded) weights into a sharded model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    missing, unexpected = set_model_state_dict(model, dict(weights),
                                               options=StateDictOptions(full_state_dict=True, strict=False))
    if missing or unexpected:
        tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
            name for name, _ in model.named_parameters()}
        missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit this model: missing {list(missing)}, unexpected "
                         f"{list(unexpected)}")


def read_consolidated(directory: str) -> dict[str, Any]:
    """One process, no process group: the model's full tensors (``{"model": {...}}``).

    Raises:
        CheckpointRestoreError: the checkpoint holds something that would run code when loaded.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader_cls, _, empty_planner_cls = _safe_dcp()
    path = os.path.join(directory, DCP_DIR)
    reader = reader_cls(path)
    reader.read_metadata()  # our refusal as it is, not wrapped in DCP's CheckpointException
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=empty_planner_cls(path, keys={"model"}),
                         no_dist=True)  # not the optimizer
    except DCP_ERRORS as exc:
        refused = _refusal(exc)
        if refused is exc:
            raise
        raise refused from None
    return state
