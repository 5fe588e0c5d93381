"""Consolidate a checkpoint into plain weights: ``ray-dyncheck export CHECKPOINT --out DIR``.

Any checkpoint ray_dyncheck wrote (plain or sharded, by the hook, HF's or Lightning's callback, on a local path
or a URI) becomes one
``model.safetensors`` of full tensors, named as the model's ``state_dict()`` (a tied weight under one
name, as ``safetensors`` stores it), which ``safetensors.torch.load_model`` loads into the unsharded
model; with the model's
``config.json`` when the checkpoint carries one, so the folder is a Hugging Face ``save_pretrained``
layout that ``from_pretrained(DIR)`` loads. One process, no process group, no GPU.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
from collections.abc import Iterator

import safetensors.torch
import torch

from ._lightning.resume import CHECKPOINT_NAME
from ._requests.files import resolve_run_dir
from ._state import MODEL_FILE, read_stored_manifest
from ._state.fetch import local_directory
from ._state.sharded import DCP_DIR, read_consolidated
from .errors import CheckpointRestoreError

__all__ = ["export_checkpoint"]

HF_FSDP_DIR = "pytorch_model_fsdp_0"  # Accelerate's FSDP_MODEL_NAME, sharded state dict of the first model
LIGHTNING_CKPT = CHECKPOINT_NAME  # the Lightning callback's file (a DCP folder under ModelParallelStrategy)


@contextlib.contextmanager
def _local(checkpoint: str) -> Iterator[tuple[str, dict]]:
    fs, path = resolve_run_dir(checkpoint)
    try:
        manifest = read_stored_manifest(fs, path)
    except FileNotFoundError:
        manifest = None
    if manifest is None:
        raise ValueError(f"{checkpoint} is not a ray_dyncheck checkpoint (no dyncheck.json): pass a checkpoint "
                         "directory, e.g. one listed by `ray-dyncheck status RUN`")
    with local_directory(fs, path, "dyncheck-export-") as local:
        yield local, manifest


def export_checkpoint(checkpoint: str, out: str) -> list[str]:
    """Write ``checkpoint``'s full weights into the local folder ``out``; returns the files written.

    Raises:
        ValueError: ``checkpoint`` is not a complete ray_dyncheck checkpoint, holds something that
            would run code when loaded (nothing of it is run), or ``out`` holds files.
    """
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"--out {out} is not empty: pass a new or empty folder")
    with _local(checkpoint) as (directory, manifest):
        files = manifest["files"]
        layout = manifest.get("layout")
        if layout == "lightning" and os.path.isdir(os.path.join(directory, LIGHTNING_CKPT)) and not os.path.isfile(
                os.path.join(directory, LIGHTNING_CKPT, ".metadata")):
            raise ValueError(f"{checkpoint}: its {LIGHTNING_CKPT} folder is not a DCP checkpoint (DeepSpeed's "
                             "layout?): consolidate it with DeepSpeed's zero_to_fp32.py, which is in that folder")
        if layout == "sharded" or (layout == "lightning" and os.path.isdir(os.path.join(directory, LIGHTNING_CKPT))):
            folder, key = (LIGHTNING_CKPT, "state_dict") if layout == "lightning" else (DCP_DIR, "model")
            try:
                weights = read_consolidated(directory, folder, key)[key]
            except CheckpointRestoreError as exc:  # a downloaded copy's file named by its place in storage
                raise ValueError(f"cannot export {checkpoint}: {str(exc).replace(directory, checkpoint)}") from None
        elif layout == "lightning":  # Lightning's own file: its LightningModule's state_dict
            try:
                weights = torch.load(os.path.join(directory, LIGHTNING_CKPT), map_location="cpu",
                                     weights_only=True)["state_dict"]
            except pickle.UnpicklingError as exc:
                raise ValueError(f"cannot export {checkpoint}: its {LIGHTNING_CKPT} holds more than tensors and "
                                 f"plain containers, which would run code when loaded (refused: {exc})") from None
        else:
            weights = {}
            for name in sorted(files):
                if name.endswith(".safetensors"):
                    weights.update(safetensors.torch.load_file(os.path.join(directory, name)))
            if not weights and layout == "transformers" and os.path.isfile(os.path.join(directory, HF_FSDP_DIR,
                                                                                        ".metadata")):
                # HF under FSDP's SHARDED_STATE_DICT: Accelerate's DCP folder of {"model": state_dict}
                try:
                    weights = read_consolidated(directory, HF_FSDP_DIR, "model")["model"]
                except CheckpointRestoreError as exc:
                    raise ValueError(f"cannot export {checkpoint}: {str(exc).replace(directory, checkpoint)}") \
                        from None
        if not weights:
            raise ValueError(f"{checkpoint} holds no model weights")
        os.makedirs(out, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in weights.items() if isinstance(v, torch.Tensor)}
        safetensors.torch.save_file(tensors, os.path.join(out, MODEL_FILE),
                                    metadata={"format": "pt", "step": str(manifest["step"])})
        written = [MODEL_FILE]
        for extra in ("config.json", "generation_config.json"):
            if extra in files:
                shutil.copyfile(os.path.join(directory, extra), os.path.join(out, extra))
                written.append(extra)
    return written
