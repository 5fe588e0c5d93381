"""Capture and restore training state, in files that load without unpickling code.

A checkpoint directory written here holds (``format_version`` 1, the plain layout, written by rank 0)::

    model.safetensors     the model's weights (unwrapped from DDP / torch.compile; tied weights kept once);
                          a Hugging Face model is saved with ``save_pretrained`` (config.json too)
    optimizer.pt          the optimizer's state_dict (``full`` checkpoints only)
    trainer_state.pt      step, LR scheduler, per-rank RNG states and user state
    dyncheck.json         the manifest, written last: format, kind, step, every file's size

or, for a sharded model (``format_version`` 2, ``layout: sharded``), ``dcp/`` with every rank's shard
(:mod:`ray_dyncheck._sharded`) instead of the weights and optimizer files.

A save is two parts: :func:`capture_state` copies the state into host memory (the part that blocks
training), :func:`write_files` writes that copy (in the background). Everything but the weights loads
with ``torch.load(weights_only=True)``, a sharded checkpoint's DCP metadata through an allow-list of
DCP's own classes, and a manifest's file names must stay inside its checkpoint: a file in storage
never runs code. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import posixpath
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow.fs as pafs
import safetensors.torch
import torch

from ._files import read_capped
from ._sharded import is_sharded, live_state, load_full_weights, load_sharded, stays_inside, write_sharded
from ._snapshot import HostCopier

__all__ = ["Captured", "CheckpointInfo", "Stateful", "capture_rank_state", "capture_state", "load_checkpoint",
           "read_manifest", "read_stored_manifest", "unwrap_model", "write_checkpoint", "write_files",
           "write_manifest"]

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


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()`` (a sampler, a data loader position)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class CheckpointInfo:
    """What a restore loaded."""

    path: str
    step: int
    kind: str
    loaded_optimizer: bool


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


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("dyncheck: CUDA RNG state saved for %d devices, %d visible: not restored",
                           len(cuda), torch.cuda.device_count())


def _is_hf_model(module: torch.nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` (duck-typed: transformers stays optional)."""
    return callable(getattr(module, "save_pretrained", None)) and hasattr(getattr(module, "config", None),
                                                                           "to_json_string")


def _save_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], directory: str, step: int) -> list[str]:
    """``weights`` (a host copy of ``module``'s state, tied names dropped) in safetensors; a HF model in
    its own ``save_pretrained`` layout (config.json, possibly sharded), so ``from_pretrained(directory)``
    loads it as is."""
    if _is_hf_model(module):
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


def _load_weights(module: torch.nn.Module, directory: str, files: Mapping[str, int], device: torch.device) -> None:
    if MODEL_FILE in files and "config.json" not in files:
        safetensors.torch.load_model(module, os.path.join(directory, MODEL_FILE), strict=True, device=str(device))
        return
    state: dict[str, torch.Tensor] = {}
    for name in sorted(files):
        if name.endswith(".safetensors"):
            state.update(safetensors.torch.load_file(os.path.join(directory, name), device=str(device)))
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Tied weights are stored once: a missing name is fine only if it shares its tensor with a loaded one.
    by_tensor: dict[int, set[str]] = {}
    for pname, param in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), set()).add(pname)
    untied = [k for k in missing if not any(other in state for other in by_tensor.get(
        id(module.get_parameter(k)) if _has_param(module, k) else -1, set()))]
    if unexpected or untied:
        raise ValueError(f"checkpoint {directory} does not fit this model: missing {untied}, unexpected "
                         f"{list(unexpected)}")


def _has_param(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


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


def _trainer_state(captured: Captured, rank_states: Sequence[Mapping[str, Any]]) -> bytes:
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
        if rank == 0 and _is_hf_model(captured.module):  # for `export` to a from_pretrained folder
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
            f.write(_trainer_state(captured, rank_states or []))
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


def load_checkpoint(
    directory: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: Any | None,
    extra_state: Mapping[str, Stateful] | None,
    rank: int,
    group: Any = None,
) -> CheckpointInfo:
    """Load a checkpoint into live objects. Every rank calls it: a sharded checkpoint (or a sharded
    model) loads collectively, on ``group`` (a gloo group; ``None`` without a process group).

    Nothing read runs code: weights through safetensors or DCP's tensor reads, the rest with
    ``torch.load(weights_only=True)``, DCP's metadata through an allow-list of its classes.

    Raises:
        ValueError: not a complete checkpoint of ours, or its manifest names a file outside it.
        CheckpointRestoreError: a sharded checkpoint holds something that would run code when loaded.
    """
    manifest = read_manifest(directory)
    if manifest is None:
        raise ValueError(f"{directory} is not a ray_dyncheck checkpoint (no {MANIFEST_FILE})")
    if manifest.get("layout") == "transformers":
        raise ValueError(f"{directory} was written by DynamicCheckpointCallback (a Hugging Face Trainer "
                         "checkpoint): resume it with trainer.train(resume_from_checkpoint=rdc.hf_resume_path())")
    module = unwrap_model(model)
    if manifest.get("layout") == "sharded":  # any world size, into a sharded or a plain model
        loaded_optimizer = load_sharded(directory, module, optimizer, group)
    elif is_sharded(module):  # a plain checkpoint into a sharded model: every rank keeps its shard
        weights: dict[str, torch.Tensor] = {}
        for name in sorted(manifest["files"]):
            if name.endswith(".safetensors"):
                weights.update(safetensors.torch.load_file(os.path.join(directory, name)))
        load_full_weights(module, weights)
        loaded_optimizer = False
        if optimizer is not None and OPTIMIZER_FILE in manifest["files"]:
            _load_plain_optimizer_into_sharded(
                module, optimizer, torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))
            loaded_optimizer = True
    else:
        device = next(iter(module.parameters()), torch.empty(0)).device
        _load_weights(module, directory, manifest["files"], device)
        loaded_optimizer = False
        if optimizer is not None and OPTIMIZER_FILE in manifest["files"]:
            optimizer.load_state_dict(
                torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True, map_location=device))
            loaded_optimizer = True
    # Read after the collective part: a failure here on one rank cannot leave the others in a collective.
    state = torch.load(os.path.join(directory, TRAINER_FILE), weights_only=True)
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    ranks = state["ranks"]
    if rank < len(ranks):
        _set_rng_state(ranks[rank]["rng"])
        for name, obj in (extra_state or {}).items():
            if name in ranks[rank]["extra"]:
                obj.load_state_dict(ranks[rank]["extra"][name])
            else:
                logger.warning("dyncheck: extra_state %r is not in checkpoint %s; left as is", name, directory)
    else:
        logger.warning("dyncheck: checkpoint %s was written by %d ranks; rank %d keeps fresh RNG and "
                       "extra_state", directory, len(ranks), rank)
    return CheckpointInfo(path=directory, step=int(state["step"]), kind=str(state["kind"]),
                          loaded_optimizer=loaded_optimizer)


def _load_plain_optimizer_into_sharded(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                       saved: Mapping[str, Any]) -> None:
    """A plain ``optimizer.state_dict()`` (keyed by parameter index) into the optimizer of the same
    model sharded: indices become the parameters' names, then every rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(params) != len(saved_ids) or any(id(p) not in names for p in params):
        raise ValueError(f"the checkpoint's optimizer has {len(saved_ids)} parameters in "
                         f"{len(saved['param_groups'])} group(s), this one {len(params)} in "
                         f"{len(optimizer.param_groups)}: build the optimizer as the saved run did")
    fqn = {i: names[id(p)] for i, p in zip(saved_ids, params)}
    state: dict[str, Any] = {"state": {fqn[i]: v for i, v in saved["state"].items()},
             "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
