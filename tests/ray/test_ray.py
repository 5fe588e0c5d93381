"""Real Ray Train: TorchTrainer with 2 CPU workers (gloo), one local Ray for the module."""

from __future__ import annotations

import json
import os
import time

import torch

from ray_workloads import train_fn


def fit(storage, name, out, *, steps, dc, actions=None, step_time=0.02):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"steps": steps, "step_time": step_time, "dynamic_checkpoint": dc,
                           "actions": actions or {}, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    result = trainer.fit()
    records = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    return result, records


def reported(result):
    """(step, metadata, path) of every checkpoint Ray holds for the run, oldest first."""
    out = []
    for ckpt, _metrics in result.best_checkpoints:
        meta = ckpt.get_metadata()
        out.append((meta["step"], meta, ckpt.path))
    return sorted(out, key=lambda t: t[0])


def receipts(run_dir):
    folder = run_dir / ".dyncheck" / "receipts"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def test_trigger_request_stale_and_directory(ray_local, tmp_path):
    storage, name = tmp_path / "results", "channel"
    run_dir = storage / name
    # Left over from an earlier run: written before this fit() started, so stale.
    (run_dir / ".dyncheck" / "requests").mkdir(parents=True)
    (run_dir / "dyncheck.save").touch()
    (run_dir / ".dyncheck" / "requests" / "old.json").write_text("{}")
    past = time.time() - 60
    os.utime(run_dir / "dyncheck.save", (past, past))
    os.utime(run_dir / ".dyncheck" / "requests" / "old.json", (past, past))

    dc = {"check_interval": 5, "poll_interval_s": 0.1}
    actions = {
        "10": ["touch", "sleep:1.0"],
        "30": ['request:{"id": "req-1"}', "sleep:1.0"],
        "50": ["mkdir_trigger", "sleep:1.0"],  # cannot be removed: acted on once, no save storm
    }
    result, records = fit(storage, name, tmp_path / "out", steps=90, dc=dc, actions=actions)

    assert records[0]["checks"] == records[1]["checks"], "both ranks agreed at every check"
    saves = [c[0] for c in records[0]["checks"] if c[1]]
    assert len(saves) == 3, saves
    ckpts = reported(result)
    assert [s for s, _, _ in ckpts] == saves
    (t_step, t_meta, t_path), (r_step, r_meta, r_path), (d_step, d_meta, _) = ckpts
    # Each within one check interval (5 steps) after the poller saw it (claimed during the sleep).
    assert 10 < t_step <= 15 and 30 < r_step <= 35 and 50 < d_step <= 55
    assert {k: t_meta[k] for k in ("format_version", "kind", "step", "reason")} == \
        {"format_version": 1, "kind": "full", "step": t_step, "reason": "trigger"}
    assert (r_meta["reason"], r_meta["request_id"], d_meta["reason"]) == ("request", "req-1", "trigger")
    assert sorted(os.listdir(t_path)) == [".metadata.json", "dyncheck.json", "model.safetensors",
                                          "optimizer.pt", "trainer_state.pt"]
    rec = receipts(run_dir)
    assert rec["old"]["status"] == "discarded"
    assert (rec["req-1"]["status"], rec["req-1"]["step"], rec["req-1"]["checkpoint"]) == ("ok", r_step, r_path)
    assert rec[t_meta["request_id"]]["checkpoint"] == t_path
    # The stale trigger was claimed (moved aside) and answered too: every claim ends with a receipt.
    stale = [r for r in rec.values() if r["status"] == "discarded" and r["id"].startswith("trigger-")]
    assert len(stale) == 1 and "written before this run started" in stale[0]["error"], rec
    assert len(rec) == 5
    assert (run_dir / "dyncheck.save").is_dir(), "the directory trigger stays, and did not fire again"
    assert list((run_dir / ".dyncheck" / "claimed").iterdir()) == []
    assert list((run_dir / ".dyncheck" / "requests").iterdir()) == []


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(ray_local, tmp_path):
    storage = tmp_path / "results"
    dc = {"check_interval": 5, "poll_interval_s": 0.1}
    _, straight = fit(storage, "straight", tmp_path / "a", steps=40, dc=dc, step_time=0.0)
    assert straight[0]["final_step"] == 40

    stop = {"12": ['request:{"id": "pause", "stop": true}', "sleep:1.0"]}
    result, first = fit(storage, "resumed", tmp_path / "b1", steps=40, dc=dc, actions=stop, step_time=0.0)
    assert first[0]["final_step"] == first[1]["final_step"] == 15
    assert result.checkpoint.get_metadata()["step"] == 15
    _, second = fit(storage, "resumed", tmp_path / "b2", steps=40, dc=dc, step_time=0.0)
    assert [r["restored"] for r in second] == [[15, "full"], [15, "full"]]
    assert second[0]["start"] == 15 and second[0]["final_step"] == 40

    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b2" / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
