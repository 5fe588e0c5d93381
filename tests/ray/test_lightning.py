"""PyTorch Lightning in real Ray TorchTrainer workers (2 CPU workers, gloo) with the Lightning callback: a
trigger served mid-epoch, a request during validation served at its end, resume at the same batch (DDP and
FSDP2 through ``RayModelParallelStrategy``), Ctrl+C through ``rdc.fit`` into a weights-only checkpoint that
``ray-dyncheck export`` turns into the model's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import safetensors.torch
import torch
from drivers import KILLED_BY_SIGINT, finish, start_driver, wait_ready

from lightning_workloads import Tiny, train_fn

STEPS = 12


def make_trainer(storage, name, out, *, dc=None, **config):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    dc = dc or {"check_interval": 5, "poll_interval_s": 0.05}
    config = {"steps": STEPS, "out": str(out), "dynamic_checkpoint": dc, **config}
    return TorchTrainer(train_fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=2),
                        run_config=RunConfig(name=name, storage_path=str(storage),
                                             checkpoint_config=CheckpointConfig(num_to_keep=None)))


def records(out):
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


def reported(result):
    out = [(c.get_metadata()["step"], c.get_metadata(), c.path) for c, _ in result.best_checkpoints]
    return sorted(out, key=lambda t: t[0])


def receipts(run_dir):
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / ".dyncheck" / "receipts").glob("*.json")}


def test_trigger_mid_epoch_and_during_validation_then_resume_at_the_same_batch(ray_local, tmp_path):
    """Touched after step 2: saved at the check of step 5, mid-epoch (40 batches an epoch). Touched during the
    validation after step 8 (3 slow batches): served at that validation's end, step 8, not at the next check
    (10). Resumed from step 8, the run continues at batch 8 of the epoch and ends bitwise where an
    uninterrupted one does."""
    storage = tmp_path / "results"
    first = make_trainer(storage, "run", tmp_path / "a", actions={"2": ["touch_until_claimed"]},
                         val_every=8, val_batch_time=0.3, val_actions=["touch_until_claimed"]).fit()
    a0, a1 = records(tmp_path / "a")
    assert a0["validated_at"] == [8]
    ckpts = reported(first)
    assert [(s, m["kind"], m["reason"]) for s, m, _ in ckpts] == [(5, "full", "trigger"), (8, "full", "trigger")]
    for _, meta, path in ckpts:
        manifest = json.load(open(os.path.join(path, "dyncheck.json")))
        assert manifest["layout"] == "lightning" and set(manifest["files"]) == {"checkpoint.ckpt"}
        assert set(os.listdir(path)) - {".metadata.json"} == {"checkpoint.ckpt", "dyncheck.json"}
        ckpt = torch.load(os.path.join(path, "checkpoint.ckpt"), weights_only=True)
        assert ckpt["global_step"] == meta["step"] and ckpt["optimizer_states"][0]["state"], "a full checkpoint"
        assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"consumed": meta["step"]}]
    rec = receipts(storage / "run")
    assert sorted((r["status"], r["step"]) for r in rec.values()) == [("ok", 5), ("ok", 8)]
    assert a0["saves"] == [5, 8] and a1["saves"] == []  # rank 0 keeps the record

    # The same run again: it resumes from its newest checkpoint (step 8) and trains steps 9..12.
    make_trainer(storage, "run", tmp_path / "b").fit()
    b0, b1 = records(tmp_path / "b")
    assert b0["begin_step"] == b1["begin_step"] == 8 and b0["final_step"] == STEPS
    for a, b in ((a0, b0), (a1, b1)):
        assert b["seen"] == a["seen"][8:], "the same batches, from batch 8 of the epoch"
        assert b["resumed_from"].endswith("checkpoint.ckpt")
    final_a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    final_b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), "bitwise where the uninterrupted run ended"


def test_a_save_that_fails_on_one_rank_is_an_error_receipt_and_no_rank_waits(ray_local, tmp_path):
    """Rank 1's hook raises while it saves at step 4 (rank 0 writes the file): no rank waits in Lightning's
    barrier, nothing is reported, the request gets an error receipt naming rank 1, training goes on, and the
    next request saves."""
    storage = tmp_path / "results"
    result = make_trainer(storage, "failing", tmp_path / "a", steps=8, fail_save=[1, 4],
                          dc={"check_interval": 4, "poll_interval_s": 0.05},
                          actions={"2": ['request_until_claimed:{"id": "first", "kind": "full"}'],
                                   "5": ['request_until_claimed:{"id": "second", "kind": "full"}']}).fit()
    r0, r1 = records(tmp_path / "a")
    assert r0["final_step"] == r1["final_step"] == 8
    assert [(s, m["request_id"]) for s, m, _ in reported(result)] == [(8, "second")]
    rec = receipts(storage / "failing")
    assert rec["first"]["status"] == "error" and "rank 1: OSError" in rec["first"]["error"]
    assert (rec["second"]["status"], rec["second"]["step"]) == ("ok", 8)


def test_fsdp2_trigger_saves_every_ranks_shard_and_resumes(ray_local, tmp_path):
    """``RayModelParallelStrategy`` shards with FSDP2 on the CPU workers: Lightning writes a DCP folder, each
    rank reports its own shard, rank 0's manifest lists both; the resume ends bitwise where the
    uninterrupted run did."""
    storage = tmp_path / "results"
    first = make_trainer(storage, "sharded", tmp_path / "a", model="fsdp", steps=8,
                         actions={"2": ["touch_until_claimed"]}, dc={"check_interval": 4, "poll_interval_s": 0.05}
                         ).fit()
    [(step, meta, path)] = reported(first)
    assert (step, meta["kind"], meta["reason"]) == (4, "full", "trigger")
    files = set(json.load(open(os.path.join(path, "dyncheck.json")))["files"])
    assert {"checkpoint.ckpt/__0_0.distcp", "checkpoint.ckpt/__1_0.distcp", "checkpoint.ckpt/.metadata",
            "checkpoint.ckpt/meta.pt"} <= files
    assert all(os.path.isfile(os.path.join(path, f)) for f in files)
    make_trainer(storage, "sharded", tmp_path / "b", model="fsdp", steps=8).fit()
    b0, _ = records(tmp_path / "b")
    assert b0["begin_step"] == 4 and b0["final_step"] == 8
    final_a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    final_b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_ctrl_c_saves_weights_that_export_loads_into_the_model(tmp_path):
    """Ctrl+C to the driver's process group (``rdc.fit``): a weights-only Lightning checkpoint (with the LR
    schedulers beside it), then a clean exit; ``ray-dyncheck export`` writes safetensors the model loads."""
    proc, ready = start_driver(tmp_path, dc={"check_interval": 1, "poll_interval_s": 0.05},
                               extra={"workload": "lightning", "step_time": 0.05})
    wait_ready(proc, ready, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    rc, log = finish(proc, tmp_path)
    assert rc in KILLED_BY_SIGINT, log[-3000:]
    run_dir = tmp_path / "results" / "run"
    [path] = [p for p in run_dir.glob("checkpoint_*") if "weights" in p.name]
    manifest = json.load(open(path / "dyncheck.json"))
    assert (manifest["kind"], manifest["layout"]) == ("weights", "lightning")
    assert set(manifest["files"]) == {"checkpoint.ckpt", "resume_state.pt"}
    ckpt = torch.load(path / "checkpoint.ckpt", weights_only=True)
    assert "optimizer_states" not in ckpt and ckpt["global_step"] == manifest["step"]
    out = tmp_path / "export"
    cli = subprocess.run([sys.executable, "-m", "ray_dyncheck.cli", "export", str(path), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    model = Tiny()
    missing, unexpected = safetensors.torch.load_model(model, out / "model.safetensors", strict=True)
    assert not missing and not unexpected
    assert torch.equal(model.state_dict()["net.0.weight"], ckpt["state_dict"]["net.0.weight"])
