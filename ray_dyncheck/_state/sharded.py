"""Sharded models (FSDP2, ``DTensor`` parameters): every rank writes its own shard with
``torch.distributed.checkpoint`` (DCP); nothing is gathered to one rank.

A sharded checkpoint holds ``dcp/`` (DCP's ``.metadata``, written by rank 0, and one
``__<rank>_0.distcp`` per rank) beside the usual ``trainer_state.pt`` and manifest. Model and
optimizer go through ``torch.distributed.checkpoint.state_dict``, so the names are the model's own
(FQNs) and a load reshards to any world size, or into an unsharded model. Nothing here imports Ray.

Loads run no code from storage: see :mod:`.dcp_safe`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CheckpointRestoreError
from .dcp_safe import refusal, safe_dcp

__all__ = ["DCP_DIR", "DCP_ERRORS", "check_supported", "is_sharded", "live_state", "load_full_weights", "load_sharded",
           "read_consolidated", "write_sharded"]

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

    reader_cls, planner_cls, _ = safe_dcp()
    path = os.path.join(directory, DCP_DIR)
    reader = reader_cls(path)
    metadata = _read_metadata(reader, group)
    has_optim = optimizer is not None and any(key.startswith("optim.") for key in metadata.state_dict_metadata)
    target = live_state(model, optimizer, "full" if has_optim else "weights")
    try:
        dcp.load(target, storage_reader=reader, planner=planner_cls(path), process_group=group,
                 no_dist=group is None)
    except DCP_ERRORS as exc:
        refused = refusal(exc)
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


def read_consolidated(directory: str, folder: str = DCP_DIR, key: str = "model") -> dict[str, Any]:
    """One process, no process group: the model's full tensors (``{key: {...}}``) of the DCP folder
    ``directory/folder`` (ours: ``key`` ``model``; Lightning's ``checkpoint.ckpt``: ``state_dict``).

    Raises:
        CheckpointRestoreError: the checkpoint holds something that would run code when loaded.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader_cls, _, empty_planner_cls = safe_dcp()
    path = os.path.join(directory, folder)
    reader = reader_cls(path)
    reader.read_metadata()  # our refusal as it is, not wrapped in DCP's CheckpointException
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=reader, planner=empty_planner_cls(path, keys={key}),
                         no_dist=True)  # not the optimizer
    except DCP_ERRORS as exc:
        refused = refusal(exc)
        if refused is exc:
            raise
        raise refused from None
    return state
