"""Agreement across real gloo process groups (no Ray): every rank makes the same decisions."""

from __future__ import annotations

import json
import os

import pytest

from gloo_workers import agreement_worker, run_ranks


def results(out, world_size):
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_trigger_decision_reaches_every_rank(tmp_path, world_size):
    run_dir, out = str(tmp_path / "run"), str(tmp_path)
    cfg = {"check_interval": 5, "poll_interval_s": 0.05, "steps": 60, "step_time": 0.01}
    # Touch at step 10, then hold rank 0 for a moment so the poller has surely claimed it.
    run_ranks(agreement_worker, world_size, run_dir, out, cfg, {"10": ["touch", "sleep:0.3"]})
    res = results(out, world_size)
    assert all(r["checks"] == res[0]["checks"] for r in res), "every rank saw the same decisions"
    assert [c[0] for c in res[0]["checks"]] == list(range(5, 61, 5)), "check_interval 5: step % 5 == 0"
    saves = [c for c in res[0]["checks"] if c[1]]
    assert [(c[0], c[2]) for c in saves] == [(15, "full")], "exactly one save, at the next check"
    [save] = res[0]["saves"]
    assert save["step"] == 15 and save["reason"] == "trigger" and save["path"].endswith(save["name"])
    ckpt = os.path.join(run_dir, save["name"])
    assert sorted(os.listdir(ckpt)) == [".dyncheck-committed", ".metadata.json", "dyncheck.json", "model.safetensors",
                                        "optimizer.pt", "trainer_state.pt"]
    meta = json.load(open(os.path.join(ckpt, ".metadata.json")))
    assert (meta["kind"], meta["step"], meta["reason"], meta["format_version"]) == ("full", 15, "trigger", 1)
    assert meta["request_id"] == save["requests"][0]
    receipt = json.load(open(os.path.join(run_dir, ".dyncheck", "receipts", f"{meta['request_id']}.json")))
    assert (receipt["status"], receipt["step"], receipt["checkpoint"]) == ("ok", 15, ckpt)
    assert not os.path.exists(os.path.join(run_dir, "dyncheck.save"))
    assert os.listdir(os.path.join(run_dir, ".dyncheck", "claimed")) == []


def test_rank0_storage_error_is_no_request_and_no_hang(tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path)
    cfg = {"check_interval": 2, "poll_interval_s": 0.05, "steps": 40, "step_time": 0.01}
    run_ranks(agreement_worker, 2, run_dir, out, cfg,
              {"3": ["break_requests", "sleep:0.3"], "20": ["touch", "sleep:0.3"]})
    res = results(out, 2)
    assert res[0]["checks"] == res[1]["checks"]
    assert res[0]["final_step"] == res[1]["final_step"] == 40
    assert [c[0] for c in res[0]["checks"] if c[1]] == [22], "trigger still honoured, request folder broken"


def test_request_with_stop_ends_every_rank_at_the_same_step(tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path)
    cfg = {"check_interval": 4, "poll_interval_s": 0.05, "steps": 80, "step_time": 0.005}
    req = json.dumps({"id": "stop-now", "kind": "weights", "stop": True})
    run_ranks(agreement_worker, 2, run_dir, out, cfg, {"10": [f"request:{req}", "sleep:0.3"]})
    res = results(out, 2)
    assert res[0]["final_step"] == res[1]["final_step"] == 12
    [save] = res[0]["saves"]
    assert (save["kind"], save["reason"], save["requests"]) == ("weights", "request", ["stop-now"])
    assert "optimizer.pt" not in os.listdir(os.path.join(run_dir, save["name"]))


def test_auto_interval_is_agreed_on_all_ranks(tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path)
    # A 5 % budget keeps intervals short enough that a check follows the trigger within 300 steps
    # even on a loaded machine (at 0.5 % a slow check cost can push the interval past the run).
    cfg = {"check_interval": "auto", "max_check_overhead": 0.05, "poll_interval_s": 0.05, "steps": 300,
           "step_time": 0.002}
    run_ranks(agreement_worker, 2, run_dir, out, cfg, {"150": ["touch", "sleep:0.3"]})
    res = results(out, 2)
    checks = res[0]["checks"]
    assert checks == res[1]["checks"]
    steps = [c[0] for c in checks]
    # Each check happens exactly next_interval steps after the previous one, on both ranks.
    assert all(b - a == c[4] for a, b, c in zip(steps, steps[1:], checks))
    assert max(c[4] for c in checks) > 1, "auto backs off from checking every step"
    assert len(checks) < 300 / 2
    assert [c[0] > 150 for c in checks if c[1]] == [True]


def test_preemption_notice_saves_at_the_next_check_and_training_goes_on(tmp_path):
    """Rank 0's backend reports a drain (as Ray's watcher marks a worker): every rank saves at the next
    check with reason preemption, full while the deadline leaves room, weights when it does not, once
    per notice; nobody stops."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path)
    cfg = {"check_interval": 5, "poll_interval_s": 0.05, "steps": 40, "step_time": 0.03,
           "preempt": {"7": 100.0, "22": 3.0}}
    # The second notice comes once the first save is committed (one still in flight would answer it), with
    # a request for a full save that would not fit before its deadline: weights first, the request after.
    req = json.dumps({"id": "full-1", "kind": "full"})
    run_ranks(agreement_worker, 2, run_dir, out, cfg, {"22": ["committed:1", f"request:{req}", "sleep:0.3"]})
    res = results(out, 2)
    assert res[0]["checks"] == res[1]["checks"]
    assert res[0]["final_step"] == res[1]["final_step"] == 40
    saves = [(s["step"], s["kind"], s["reason"]) for s in res[0]["saves"]]
    assert saves[:2] == [(10, "full", "preemption"), (25, "weights", "preemption")]
    assert saves[2][1:] == ("full", "request") and saves[2][0] in (30, 35) and len(saves) == 3
    assert res[0]["saves"][2]["requests"] == ["full-1"]
    for s in res[0]["saves"]:
        meta = json.load(open(os.path.join(run_dir, s["name"], ".metadata.json")))
        assert (meta["reason"], meta["step"]) == (s["reason"], s["step"])

