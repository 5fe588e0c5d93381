"""Nothing from storage runs code (invariant 13), sharded checkpoints too: DCP's ``.metadata`` is
unpickled through an allow-list of DCP's own classes, DCP's non-tensor items load with
``torch.load(weights_only=True)``, and a manifest's file names stay inside the checkpoint directory;
on resume and on export. Real checkpoints (DCP in this process; an FSDP2 one written by 2 gloo
ranks is in ``gloo/test_safe_load_ranks.py``), altered as someone with write access to the bucket could."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import pytest
import torch
from hostile import Touch

import ray_dyncheck as rdc
from gloo_workers import _fsdp_model, fsdp_model_and_optimizer
from ray_dyncheck._state import (
    SHARDED_FORMAT_VERSION,
    Captured,
    capture_rank_state,
    load_checkpoint,
    read_manifest,
    read_stored_manifest,
    write_checkpoint,
    write_files,
    write_manifest,
)
from ray_dyncheck._state.sharded import live_state

# DCP warns when it loads in one process, which is what a resume at world size 1 and export do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _write_sharded_in_process(directory, model, optimizer, kind="full"):
    """A format-2 checkpoint written by one process (DCP without a process group), as a rank does."""
    tensors = live_state(model, optimizer, kind)
    return tensors, lambda: write_manifest(
        str(directory),
        write_files(str(directory), Captured(kind=kind, step=5, sharded=True, tensors=tensors, lr_scheduler=None,
                                             module=model),
                    rank=0, rank_states=[capture_rank_state(None)]),
        kind=kind, step=5, world_size=1, format_version=SHARDED_FORMAT_VERSION, layout="sharded")


def _trained():
    torch.manual_seed(0)
    model, opt = fsdp_model_and_optimizer()
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.timeout(120)
def test_a_non_tensor_item_that_needs_pickle_is_refused_on_resume(tmp_path):
    """DCP stores a non-tensor value (here the optimizer's lr) as a pickle: one that would run code is
    refused by ``torch.load(weights_only=True)``, and the error names the item."""
    marker = tmp_path / "pwned"
    model, opt = _trained()
    state, write = _write_sharded_in_process(tmp_path / "ckpt", model, opt)
    state["optim"]["param_groups"][0]["lr"] = Touch(str(marker))
    write()
    fresh, fresh_opt = fsdp_model_and_optimizer()
    with pytest.raises(rdc.CheckpointRestoreError,
                       match=r"refused to load optim\.param_groups\.0\.lr from .*ckpt/dcp: it refers to getattr, "
                             r"which torch\.load\(weights_only=True\) refuses"):
        load_checkpoint(str(tmp_path / "ckpt"), model=fresh, optimizer=fresh_opt, lr_scheduler=None,
                        extra_state=None, rank=0)
    assert not marker.exists(), "the payload ran"


@pytest.mark.timeout(120)
def test_a_non_tensor_item_that_needs_pickle_is_refused_by_export(tmp_path):
    marker = tmp_path / "pwned"
    model, opt = _trained()
    state, write = _write_sharded_in_process(tmp_path / "ckpt", model, opt, kind="weights")
    state["model"]["note"] = Touch(str(marker))
    write()
    with pytest.raises(ValueError, match=r"refused to load model\.note from .*ckpt/dcp: it refers to getattr"):
        rdc.export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert not marker.exists(), "the payload ran"


@pytest.mark.timeout(120)
def test_plain_non_tensor_items_still_load(tmp_path):
    """What DCP stores as pickles for a real optimizer (floats, tuples, bools, None) loads safely."""
    model, opt = _trained()
    _, write = _write_sharded_in_process(tmp_path / "ckpt", model, opt)
    write()
    fresh, fresh_opt = fsdp_model_and_optimizer()
    info = load_checkpoint(str(tmp_path / "ckpt"), model=fresh, optimizer=fresh_opt, lr_scheduler=None,
                           extra_state=None, rank=0)
    assert info.loaded_optimizer and fresh_opt.param_groups[0]["betas"] == (0.9, 0.999)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def _add_to_manifest(ckpt, name, target):
    """List ``name`` in the manifest, with the size of ``target`` (which exists, outside)."""
    target.write_bytes(b"x" * 16)
    manifest = json.loads((ckpt / "dyncheck.json").read_text())
    manifest["files"][name] = 16
    (ckpt / "dyncheck.json").write_text(json.dumps(manifest))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["parent", "absolute", "dotted"])
def test_manifest_names_outside_the_checkpoint_are_refused(tmp_path, where):
    import pyarrow.fs as pafs

    torch.manual_seed(0)
    model = _fsdp_model(1, shard=False)
    ckpt = tmp_path / "ckpt"
    write_checkpoint(str(ckpt), model=model, optimizer=None, lr_scheduler=None, step=1, kind="weights",
                     rank_states=[capture_rank_state(None)])
    outside = tmp_path / "x.safetensors"
    name = {"parent": "../x.safetensors", "absolute": str(outside), "dotted": "sub/../../x.safetensors"}[where]
    _add_to_manifest(ckpt, name, outside)
    refused = re.escape(f"checkpoint {ckpt} lists {name!r}, a file outside its directory: refused")
    with pytest.raises(ValueError, match=refused):
        read_manifest(str(ckpt))
    with pytest.raises(ValueError, match=refused):  # how the hook chooses what to resume
        read_stored_manifest(pafs.LocalFileSystem(), str(ckpt))
    with pytest.raises(ValueError, match=refused):
        load_checkpoint(str(ckpt), model=model, optimizer=None, lr_scheduler=None, extra_state=None, rank=0)
    with pytest.raises(ValueError, match=refused):
        rdc.export_checkpoint(str(ckpt), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.timeout(120)
def test_a_dcp_folder_another_library_loads_is_checked_first(tmp_path):
    """Accelerate loads a Hugging Face FSDP checkpoint's DCP folders with DCP's own reader (which
    unpickles freely): ``hf_resume_path`` checks each folder with ``check_dcp_folder`` first."""
    from ray_dyncheck._state.dcp_safe import check_dcp_folder

    marker = tmp_path / "pwned"
    model, opt = _trained()
    _, write = _write_sharded_in_process(tmp_path / "good", model, opt)
    write()
    check_dcp_folder(str(tmp_path / "good" / "dcp"))  # an honest folder passes
    state, write = _write_sharded_in_process(tmp_path / "item", model, opt)
    state["optim"]["param_groups"][0]["lr"] = Touch(str(marker))
    write()
    refused = r"refused to load optim\.param_groups\.0\.lr from .*item/dcp/"
    with pytest.raises(rdc.CheckpointRestoreError, match=refused):
        check_dcp_folder(str(tmp_path / "item" / "dcp"))
    shutil.copytree(tmp_path / "good", tmp_path / "meta")
    path = tmp_path / "meta" / "dcp" / ".metadata"
    path.write_bytes(pickle.dumps(Touch(str(marker))))
    with pytest.raises(rdc.CheckpointRestoreError, match=r"meta/dcp/\.metadata"):
        check_dcp_folder(str(tmp_path / "meta" / "dcp"))
    assert not marker.exists(), "the payload ran"
