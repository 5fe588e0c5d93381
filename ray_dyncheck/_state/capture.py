"""Capture training state and write it, in files that load without unpickling code (loading: :mod:`.restore`).

A checkpoint directory written here holds (``format_version`` 1, the plain layout, written by rank 0)::

    model.safetensors     the model's weights (unwrapped from DDP / torch.compile; tied weights kept once);
                          a Hugging Face model is saved with ``save_pretrained`` (config.json too)
    optimizer.pt          the optimizer's state_dict (``full`` checkpoints only)
    trainer_state.pt      step, LR scheduler, per-rank RNG states and user state
    dyncheck.json         the manifest, written last: format, kind, step, every file's size

or, for a sharded model (``format_version`` 2, ``layout: sharded``), ``dcp/`` with every rank's shard
(:mod:`ray_dyncheck._state.sharded`) instead of the weights and optimizer files.

A save is two parts: :func:`capture_state` copies the state into host memory (the part that blocks
training), :func:`write_files` writes that copy (in the background). Everything but the weights loads
with ``torch.load(weights_only=True)``, a sharded checkpoint's DCP metadata through an allow-list of
DCP's own classes, and a manifest's file names must stay inside its checkpoint: a file in storage
never runs code. Nothing here imports Ray.
"""


from __future__ import annotations

import copy
import io
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import safetensors.torch
import torch

from .layout import FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE, SHARDED_FORMAT_VERSION, TRAINER_FILE, write_manifest
from .sharded import is_sharded, live_state, write_sharded
from .snapshot import HostCopier

__all__ = [
    "Captured",
    "Stateful",
    "capture_rank_state",
    "capture_state",
    "is_hf_model",
    "trainer_state_bytes",
    "unwrap_model",
    "write_checkpoint",
    "write_files",
]

logger = logging.getLogger(__name__)

@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()`` (a sampler, a data loader position)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def is_hf_model(module: torch.nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` (duck-typed: transformers stays optional)."""
    return callable(getattr(module, "save_pretrained", None)) and hasattr(getattr(module, "config", None),
                                                                           "to_json_string")


def _save_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], directory: str, step: int) -> list[str]:
    """``weights`` (a host copy of ``module``'s state, tied names dropped) in safetensors; a HF model in
    its own ``save_pretrained`` layout (config.json, possibly sharded), so ``from_pretrained(directory)``
    loads it as is."""
    if is_hf_model(module):
        before = set(os.listdir(directory))
        module.save_pretrained(directory, state_dict=weights, safe_serialization=True)  # type: ignore[operator]
        # Not dot files: the metadata is written beside them meanwhile (from the training thread).
        return sorted(n for n in set(os.listdir(directory)) - before if not n.startswith("."))
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, MODEL_FILE),
                                metadata={"format": "pt", "step": str(step)})
    return [MODEL_FILE]


def _untied_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with each shared tensor under one name (as ``safetensors.save_model``)."""
    state = module.state_dict()
    for removed in safetensors.torch._remove_duplicate_names(state).values():
        for name in removed:
            del state[name]
    return state


def capture_rank_state(extra_state: Mapping[str, Stateful] | None) -> dict[str, Any]:
    """This rank's small state: RNG states and the user's ``extra_state`` dicts."""
    extra = {name: obj.state_dict() for name, obj in (extra_state or {}).items()}
    return {"rng": _rng_state(), "extra": extra}


@dataclass
class Captured:
    """One rank's training state in host memory, ready to be written in the background."""

    kind: str
    step: int
    sharded: bool
    tensors: dict[str, Any]
    """Plain layout: ``{"model": weights, "optim": optimizer state_dict}``; sharded: DCP's state."""
    lr_scheduler: dict[str, Any] | None
    module: torch.nn.Module
    """The unwrapped model (``save_pretrained`` and its config for a Hugging Face model)."""


def capture_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, lr_scheduler: Any | None,
                  *, kind: str, step: int, copier: HostCopier, sharded: bool | None = None) -> Captured:
    """Copy what a ``kind`` checkpoint holds into host memory: the only part of a save that blocks
    training. A sharded model is captured on every rank (its shard), a plain one on rank 0.
    ``sharded``: what the caller planned for (every rank agreed on it when the hook was made)."""
    module = unwrap_model(model)
    if sharded is not None and sharded != is_sharded(module):
        raise ValueError("the model was sharded (or unsharded) after DynamicCheckpoint was created: create "
                         "the hook after fully_shard(), on every rank")
    sharded = is_sharded(module)
    if sharded:
        live = live_state(module, optimizer, kind)
    else:
        live = {"model": _untied_state_dict(module)}
        if kind == "full" and optimizer is not None:
            live["optim"] = optimizer.state_dict()
    sched = copy.deepcopy(lr_scheduler.state_dict()) if lr_scheduler is not None else None
    return Captured(kind=kind, step=step, sharded=sharded, tensors=copier.copy(live), lr_scheduler=sched,
                    module=module)


def trainer_state_bytes(captured: Captured, rank_states: Sequence[Mapping[str, Any]]) -> bytes:
    """The bytes of ``trainer_state.pt``: step, kind, LR scheduler and every rank's small state (checked to load
    with ``torch.load(weights_only=True)``)."""
    trainer_state = {
        "format_version": SHARDED_FORMAT_VERSION if captured.sharded else FORMAT_VERSION,
        "step": captured.step,
        "kind": captured.kind,
        "lr_scheduler": captured.lr_scheduler,
        "ranks": list(rank_states),
    }
    buf = io.BytesIO()
    try:
        torch.save(trainer_state, buf)
        # Small: prove now that it loads without unpickling code, not at resume time.
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as exc:
        raise ValueError(
            "the training state (LR scheduler state_dict or extra_state) holds a type that "
            f"torch.load(weights_only=True) refuses: {exc}. Keep extra_state to tensors, numbers, "
            "strings, lists and dicts"
        ) from None
    return buf.getvalue()


def write_files(directory: str, captured: Captured, *, rank: int, rank_states: Sequence[Mapping[str, Any]] | None,
                group: Any = None) -> dict[str, int]:
    """Write this rank's files of a checkpoint into a local ``directory``; ``{file: bytes}``.

    Sharded: every rank, at the same point (a collective on ``group``). Plain: rank 0 only.
    ``rank_states`` (rank 0): every rank's :func:`capture_rank_state`. The manifest is not written here.
    """
    files: list[str] = []
    if captured.sharded:  # makes the directory: a failure there is agreed on before DCP's collectives
        files += write_sharded(directory, captured.tensors, group)
        if rank == 0 and is_hf_model(captured.module):  # for `export` to a from_pretrained folder
            with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
                f.write(captured.module.config.to_json_string())  # type: ignore[union-attr,operator]
            files.append("config.json")
    else:
        os.makedirs(directory, exist_ok=True)
        files += _save_weights(captured.module, captured.tensors["model"], directory, captured.step)
        if "optim" in captured.tensors:
            torch.save(captured.tensors["optim"], os.path.join(directory, OPTIMIZER_FILE))
            files.append(OPTIMIZER_FILE)
    if rank == 0:
        with open(os.path.join(directory, TRAINER_FILE), "wb") as f:
            f.write(trainer_state_bytes(captured, rank_states or []))
        files.append(TRAINER_FILE)
    return {name: os.path.getsize(os.path.join(directory, name)) for name in files}


def write_checkpoint(
    directory: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: Any | None,
    step: int,
    kind: str,
    rank_states: Sequence[Mapping[str, Any]],
) -> dict[str, int]:
    """Write one plain-layout checkpoint into a local ``directory`` now (rank 0). Returns ``{file: bytes}``.

    ``kind="weights"`` leaves out the optimizer's state. The manifest is written last, so a
    directory without it is not a complete checkpoint.
    """
    captured = capture_state(model, optimizer, lr_scheduler, kind=kind, step=step, copier=HostCopier())
    if captured.sharded:
        raise ValueError("write_checkpoint writes the plain layout; a sharded model is saved by every rank "
                         "through DynamicCheckpoint")
    files = write_files(directory, captured, rank=0, rank_states=rank_states)
    return write_manifest(directory, files, kind=kind, step=step, world_size=len(rank_states))
