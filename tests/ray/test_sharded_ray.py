"""FSDP2 (``fully_shard``) on real Ray: TorchTrainer with 2 CPU workers over gloo. Every rank reports
its own shard into one checkpoint; resume is bitwise at 2 workers and reshards to 1; an interrupt
through ``rdc.fit`` saves sharded weights that ``export`` turns into a plain model; a worker killed
while its save is still being stored leaves a checkpoint that is never resumed."""

from __future__ import annotations

import json
import os
import signal

import pytest
import safetensors.torch
import torch
from drivers import KILLED_BY_SIGINT, finish, start_driver, wait_ready

from faultfs import fault_fs, set_plan
from ray_dyncheck import cli
from ray_workloads import train_fn

DC = {"check_interval": 5, "poll_interval_s": 0.1, "collective_timeout_s": 60}


def fit(storage, name, out, *, steps, workers=2, actions=None, fs=None, max_failures=0):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"steps": steps, "step_time": 0.02, "dynamic_checkpoint": DC, "model": "fsdp",
                           "actions": actions or {}, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(name=name, storage_path=str(storage), storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    result = trainer.fit()
    return result, [json.load(open(out / f"rank{r}.json")) for r in range(workers)]


@pytest.mark.timeout(600)
def test_fsdp2_trigger_saves_every_shard_resumes_bitwise_and_reshards(ray_local, tmp_path):
    storage, name = tmp_path / "results", "fsdp"
    result, records = fit(storage, name, tmp_path / "a", steps=40, actions={"10": ["touch", "sleep:1.0"]})
    assert records[0]["checks"] == records[1]["checks"]
    [(ckpt, _)] = result.best_checkpoints
    meta = ckpt.get_metadata()
    assert (meta["step"], meta["kind"], meta["reason"], meta["format_version"]) == (15, "full", "trigger", 1)
    files = set(os.listdir(os.path.join(ckpt.path, "dcp")))
    assert files == {".metadata", "__0_0.distcp", "__1_0.distcp"}, "every rank's shard, merged by Ray"
    manifest = json.load(open(os.path.join(ckpt.path, "dyncheck.json")))
    assert (manifest["format_version"], manifest["layout"], manifest["world_size"]) == (2, "sharded", 2)
    for f, size in manifest["files"].items():
        assert os.path.getsize(os.path.join(ckpt.path, f)) == size, f
    uninterrupted = torch.load(tmp_path / "a" / "final.pt")

    # The same name resumes at 2 workers: bitwise what never stopping gave.
    _, again = fit(storage, name, tmp_path / "b", steps=40)
    assert again[0]["restored"] == [15, "full"]
    resumed = torch.load(tmp_path / "b" / "final.pt")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    # And at 1 worker (resharded into an unsharded model): trains on.
    _, one = fit(storage, name, tmp_path / "c", steps=45, workers=1)
    assert one[0]["restored"] == [15, "full"] and one[0]["final_step"] == 45


@pytest.mark.timeout(600)
def test_a_worker_killed_while_its_shard_is_stored_leaves_no_resumable_checkpoint(ray_local, tmp_path):
    """Rank 1's upload of the step-15 checkpoint hangs; rank 0 kills rank 1. That checkpoint never
    commits: the restarted group resumes from the step-5 one and serves the request again."""
    storage, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    plan = out / "plan.json"
    set_plan(plan, [])
    hang = json.dumps([{"op": "open_output_stream", "path": "__1_0.distcp", "action": "hang", "seconds": 60}])
    actions = {"2": ['once:a:request:{"id": "first"}', "once:w1:wait_claimed:first"],
               "11": ["once:w0:wait_receipt:first", f"once:f:fault_rank1:{hang}",
                      'once:b:request:{"id": "second"}', "once:w2:wait_claimed:second"],
               "18": ["once:k:kill_rank1"]}
    _, records = fit(storage, "killed", out, steps=30, actions=actions, fs=fault_fs(plan), max_failures=1)
    starts = [int(x) for x in (out / "starts.log").read_text().split()]
    assert starts == [0, 5], f"the restarted group resumed from the step-5 checkpoint: {starts}"
    receipts = {p.stem: json.loads(p.read_text())
                for p in (storage / "killed" / ".dyncheck" / "receipts").glob("*.json")}
    assert receipts["first"]["status"] == "ok" and receipts["first"]["step"] == 5
    # Served again by the restarted group (which resumed at 5): not the torn step-15 checkpoint.
    assert receipts["second"]["status"] == "ok" and 5 < receipts["second"]["step"] <= 10, receipts["second"]
    assert records[0]["final_step"] == 30


@pytest.mark.timeout(300)
def test_sigint_saves_sharded_weights_that_export_to_a_plain_model(tmp_path):
    proc, ready = start_driver(tmp_path, dc={"check_interval": 2, "poll_interval_s": 0.1},
                               extra={"model": "fsdp"})
    wait_ready(proc, ready, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    rc, log = finish(proc, tmp_path)
    assert rc in KILLED_BY_SIGINT, log[-3000:]
    [path] = [p for p in (tmp_path / "results" / "run").glob("checkpoint_*") if p.is_dir()]
    meta = json.loads((path / ".metadata.json").read_text())
    assert (meta["kind"], meta["reason"]) == ("weights", "interrupt")
    assert sorted(os.listdir(path / "dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"], "stays sharded"
    out = tmp_path / "export"
    assert cli.main(["export", str(path), "--out", str(out)]) == 0
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 1))
    safetensors.torch.load_model(model, str(out / "model.safetensors"), strict=True)
    final = torch.load(tmp_path / "out" / "final.pt")  # gathered from the shards when the loop ended
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
