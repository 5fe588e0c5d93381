"""Loading a checkpoint written by :mod:`.capture` into a model, optimizer, scheduler, RNG and
``extra_state`` (plain or sharded, on any world size).
"""


from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch

from .capture import Stateful, unwrap_model
from .layout import MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE, read_manifest
from .sharded import is_sharded, load_full_weights, load_sharded

__all__ = ["CheckpointInfo", "load_checkpoint"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class CheckpointInfo:
    """What a restore loaded."""

    path: str
    step: int
    kind: str
    loaded_optimizer: bool


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
