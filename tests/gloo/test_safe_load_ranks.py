"""Nothing from storage runs code, on an FSDP2 checkpoint written by 2 gloo ranks, altered as someone
with write access to the bucket could: on resume and on export."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import pytest
from hostile import Touch

import ray_dyncheck as rdc
from gloo_workers import fsdp_model_and_optimizer, fsdp_worker, run_ranks
from ray_dyncheck import cli
from ray_dyncheck._state import (
    load_checkpoint,
    read_manifest,
)

# DCP warns when it loads in one process, which is what a resume at world size 1 and export do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
    """A full checkpoint of a 2-rank FSDP2 model at step 3 (format 2), written by the hook."""
    tmp = tmp_path_factory.mktemp("fsdp")
    run_dir, out = tmp / "run", tmp / "out"
    out.mkdir()
    run_ranks(fsdp_worker, 2, str(run_dir), str(out),
              {"steps": 4, "save_at": [3], "check_interval": 100, "save_mode": "sync"})
    [name] = [n for n in os.listdir(run_dir) if n.startswith("checkpoint_")]
    return run_dir / name


def _copy_run(fsdp_checkpoint, tmp_path):
    """A run directory of its own holding a copy of the checkpoint (``LocalBackend`` resumes it)."""
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_checkpoint.parent, run_dir)
    return run_dir, run_dir / fsdp_checkpoint.name


def _hostile_metadata(ckpt, marker):
    """Replace ``dcp/.metadata`` with a pickle that creates ``marker``, padded to the same size, so the
    manifest's size check passes (pickle stops reading at its STOP opcode)."""
    path = ckpt / "dcp" / ".metadata"
    size = path.stat().st_size
    payload = pickle.dumps(Touch(str(marker)))
    assert len(payload) < size
    path.write_bytes(payload + b"\0" * (size - len(payload)))
    return path


@pytest.mark.timeout(300)
def test_the_untouched_sharded_checkpoint_resumes_and_exports(fsdp_checkpoint, tmp_path):
    """The safe reads load what DCP really writes: metadata, shards and non-tensor items (lr, betas)."""
    run_dir, _ = _copy_run(fsdp_checkpoint, tmp_path)
    model, opt = fsdp_model_and_optimizer()
    with rdc.DynamicCheckpoint({"enabled": False}, model=model, optimizer=opt,
                               backend=rdc.LocalBackend(str(run_dir))) as dc:
        info = dc.restore()
    assert info is not None and (info.step, info.kind, info.loaded_optimizer) == (3, "full", True)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["lr"] == 0.005  # StepLR halved it
    assert rdc.export_checkpoint(str(fsdp_checkpoint), str(tmp_path / "out")) == ["model.safetensors"]


@pytest.mark.timeout(300)
def test_a_metadata_pickle_that_runs_code_is_refused_on_resume(fsdp_checkpoint, tmp_path):
    run_dir, ckpt = _copy_run(fsdp_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    metadata = _hostile_metadata(ckpt, marker)
    assert read_manifest(str(ckpt)) is not None, "the manifest's size check passes"
    model, opt = fsdp_model_and_optimizer()
    with pytest.raises(rdc.CheckpointRestoreError,
                       match=f"{re.escape(str(metadata))}: refused to unpickle pathlib.Path.touch: not a DCP "
                             "metadata class"):
        load_checkpoint(str(ckpt), model=model, optimizer=opt, lr_scheduler=None, extra_state=None, rank=0)
    assert not marker.exists(), "the payload ran"
    # Through the hook: every rank raises the same CheckpointRestoreError, naming the file.
    with rdc.DynamicCheckpoint({"enabled": False}, model=model, optimizer=opt,
                               backend=rdc.LocalBackend(str(run_dir))) as dc:
        refused = f"failed on 1 rank.*{re.escape(str(metadata))}: refused to unpickle pathlib.Path.touch"
        with pytest.raises(rdc.CheckpointRestoreError, match=refused):
            dc.restore()
    assert not marker.exists(), "the payload ran"


@pytest.mark.timeout(300)
def test_a_metadata_pickle_that_runs_code_is_refused_by_export(fsdp_checkpoint, tmp_path, capsys):
    _, ckpt = _copy_run(fsdp_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    metadata = _hostile_metadata(ckpt, marker)
    with pytest.raises(ValueError, match=f"{re.escape(str(metadata))}: refused to unpickle pathlib.Path.touch: "
                                         "not a DCP metadata class"):
        rdc.export_checkpoint(str(ckpt), str(tmp_path / "out"))
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert cli.main(["export", str(ckpt), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ray-dyncheck: ") and "refused to unpickle pathlib.Path.touch" in err, err
    assert not marker.exists(), "the payload ran"


@pytest.mark.timeout(300)
def test_metadata_naming_a_shard_outside_its_folder_is_refused(fsdp_checkpoint, tmp_path):
    """Only DCP's classes, but a shard's file name that leaves ``dcp/``: no file outside is read."""
    _, ckpt = _copy_run(fsdp_checkpoint, tmp_path)
    path = ckpt / "dcp" / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # the test's own copy, known to be DCP's
    info = next(iter(metadata.storage_data.values()))
    shutil.copy(ckpt / "dcp" / info.relative_path, tmp_path / "elsewhere.distcp")
    for info in metadata.storage_data.values():
        info.relative_path = "../../../elsewhere.distcp"
    path.write_bytes(pickle.dumps(metadata))
    manifest = json.loads((ckpt / "dyncheck.json").read_text())
    manifest["files"]["dcp/.metadata"] = path.stat().st_size
    (ckpt / "dyncheck.json").write_text(json.dumps(manifest))
    refused = re.escape(f"{path} names '../../../elsewhere.distcp', a file outside its folder: refused")
    model, opt = fsdp_model_and_optimizer()
    with pytest.raises(rdc.CheckpointRestoreError, match=refused):
        load_checkpoint(str(ckpt), model=model, optimizer=opt, lr_scheduler=None, extra_state=None, rank=0)
    with pytest.raises(ValueError, match=refused):
        rdc.export_checkpoint(str(ckpt), str(tmp_path / "out"))

