"""Real faults on real Ray: one TorchTrainer fit() walks a sequence of them on a fault-injecting
filesystem (its plan is a file), with worker processes SIGKILLed by pid, under FailureConfig.

Every request ends with one final receipt, a torn checkpoint is never resumed from, and each
restarted group serves what the one before it had claimed.
"""

from __future__ import annotations

import json
import os

import pytest

from faultfs import fault_fs, set_plan
from ray_workloads import train_fn

REQUEST = 'request:{{"id": "{}"}}'
UPLOAD_FAILS = json.dumps([{"op": "open_output_stream", "path": "/checkpoint_", "action": "raise", "rank": 0}])
UPLOAD_HANGS = json.dumps([{"op": "open_output_stream", "path": "trainer_state.pt", "action": "hang",
                            "seconds": 120, "rank": 0}])
CLAIM_READ_FAILS = json.dumps([{"op": "open_input_stream", "path": ".dyncheck/claimed", "action": "raise",
                                "times": 1}])


@pytest.mark.timeout(420)
def test_a_sequence_of_faults_and_kills_ends_with_every_request_answered(ray_local, tmp_path):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_dyncheck.client import run_status

    storage, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    plan = out / "plan.json"
    set_plan(plan, [])
    actions = {
        # 1. the request path: reading the claimed request fails once; the next poll finds it again.
        "3": [f"once:f1:fault:{CLAIM_READ_FAILS}", "once:a:" + REQUEST.format("req-a"), "once:s0:sleep:0.5"],
        # 2. before the report: rank 0 cannot even make its temporary directory. Error receipt,
        #    every rank reports without a checkpoint, training goes on.
        "12": ["once:t1:tmpdir:/nonexistent/dyncheck", "once:b:" + REQUEST.format("req-b"),
               "once:w1:wait_claimed:req-b"],
        "16": ["tmpdir:"],
        # 3. the background upload fails on every retry: error receipt, then Ray fails the group,
        #    which restarts from the newest committed checkpoint.
        "22": [f"once:f2:fault:{UPLOAD_FAILS}", "once:c:" + REQUEST.format("req-c"), "once:w2:wait_claimed:req-c"],
        "26": ["once:s1:sleep:10"],
        # 4. a worker SIGKILLed after rank 0 claimed a request, before the check that saves it.
        "40": ["once:d:" + REQUEST.format("req-d"), "once:w3:wait_claimed:req-d", "once:k1:kill_rank1",
               "once:s2:sleep:10"],
        # 5. rank 0 SIGKILLed while its upload is half done: a torn directory is left behind.
        "60": [f"once:f3:fault:{UPLOAD_HANGS}", "once:e:" + REQUEST.format("req-e"), "once:w4:wait_claimed:req-e"],
        "67": ["once:k2:kill_self"],
    }
    dc = {"check_interval": 5, "poll_interval_s": 0.1, "collective_timeout_s": 60, "commit_timeout_s": 60}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"steps": 100, "step_time": 0.02, "dynamic_checkpoint": dc, "actions": actions,
                           "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="faults", storage_path=str(storage), storage_filesystem=fault_fs(plan),
                             failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    result = trainer.fit()
    assert result.error is None
    starts = [int(x) for x in (out / "starts.log").read_text().split()]
    assert len(starts) == 4, f"three restarts survived: {starts}"
    run = storage / "faults"
    receipts = {p.stem: json.loads(p.read_text()) for p in (run / ".dyncheck" / "receipts").glob("*.json")}
    status = {k: receipts[k]["status"] for k in ("req-a", "req-b", "req-c", "req-d", "req-e")}
    assert status == {"req-a": "ok", "req-b": "error", "req-c": "error", "req-d": "ok", "req-e": "ok"}, receipts
    assert "No such file or directory" in receipts["req-b"]["error"]
    assert receipts["req-c"]["error"].startswith("not stored: OSError: injected fault")
    # Served by the restarted groups (which resumed from older steps): after their starts.
    assert receipts["req-d"]["step"] > starts[2] and receipts["req-e"]["step"] > starts[3], (starts, receipts)
    for sub in ("requests", "claimed"):
        folder = run / ".dyncheck" / sub
        assert not folder.exists() or list(folder.iterdir()) == [], list(folder.iterdir())
    # The upload killed halfway left a directory nobody registered; nothing resumed from it.
    dirs = {c["dir"]: c for c in run_status(str(run))["checkpoints"]}
    torn = [d for d in dirs if d.startswith("checkpoint_00000065_")]
    assert torn and all(dirs[d]["state"] in ("torn", "uncommitted") for d in torn), dirs
    assert 65 not in starts and starts[-1] == receipts["req-d"]["step"]
    ok_paths = {receipts[k]["checkpoint"] for k in ("req-a", "req-d", "req-e")}
    assert all(dirs[os.path.basename(p)]["state"] == "committed" for p in ok_paths)


@pytest.mark.timeout(300)
def test_a_trigger_claimed_by_its_version_fires_once_across_a_restart(ray_local, tmp_path):
    """The trigger on another store than the run's (a local path; the run on a wrapped filesystem):
    claimed by its version, never deleted. One written before the run started does not fire; one
    written during the run fires once, and the group restarted under FailureConfig (rank 1 SIGKILLed
    after it was answered) does not save for it again."""
    import time

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_dyncheck.client import run_status

    storage, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    plan = out / "plan.json"
    set_plan(plan, [])
    trigger = tmp_path / "elsewhere" / "go.save"
    trigger.parent.mkdir()
    trigger.touch()
    before = time.time() - 60
    os.utime(trigger, (before, before))  # left from before this run
    actions = {
        "8": [f"once:t:touch_at:{trigger}"],
        "20": ["once:w:wait_any_receipt:trigger-", "once:k:kill_rank1", "once:s:sleep:10"],
    }
    dc = {"check_interval": 5, "poll_interval_s": 0.1, "collective_timeout_s": 60, "commit_timeout_s": 60,
          "trigger_file_path": str(trigger)}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"steps": 50, "step_time": 0.02, "dynamic_checkpoint": dc, "actions": actions,
                           "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="once", storage_path=str(storage), storage_filesystem=fault_fs(plan),
                             failure_config=FailureConfig(max_failures=1)),
    )
    result = trainer.fit()
    assert result.error is None
    starts = [int(x) for x in (out / "starts.log").read_text().split()]
    assert len(starts) == 2 and starts[1] > 8, f"one restart, from the trigger's checkpoint: {starts}"
    run = storage / "once"
    receipts = [json.loads(p.read_text()) for p in (run / ".dyncheck" / "receipts").glob("*.json")]
    assert [(r["source"], r["status"]) for r in receipts] == [("trigger", "ok")], receipts
    saved = [c for c in run_status(str(run))["checkpoints"] if c.get("reason") == "trigger"]
    assert len(saved) == 1 and saved[0]["step"] > 8, saved
    assert trigger.exists(), "a trigger claimed by its version is never deleted"
