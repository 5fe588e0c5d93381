"""Sharded models (FSDP2 ``fully_shard``, DTensor parameters) on real gloo ranks, no Ray: every rank
writes its shard in the background, a checkpoint lists every rank's files, resume is bitwise at the
same world size and reshards to others; async saves keep training going and never overlap."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ray_dyncheck as rdc
from faultfs import set_plan
from gloo_workers import fsdp_worker, run_ranks


def _run(tmp_path, name, world_size, run_dir, **case):
    out = tmp_path / name
    out.mkdir()
    run_ranks(fsdp_worker, world_size, str(run_dir), str(out), case)
    return [json.load(open(out / f"rank{r}.json")) for r in range(world_size)]


def _checkpoints(run_dir):
    return sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One 2-rank FSDP2 run: a trigger at step 3 saves the state of step 4 (check_interval 2); run to 8."""
    tmp = tmp_path_factory.mktemp("fsdp")
    run_dir = tmp / "run"
    ranks = _run(tmp, "a", 2, run_dir, steps=8, touch_at=[3])
    return tmp, run_dir, ranks


@pytest.mark.timeout(300)
def test_trigger_saves_one_sharded_checkpoint_with_every_ranks_files(saved):
    _, run_dir, ranks = saved
    names = _checkpoints(run_dir)
    assert len(names) == 1, names
    ckpt = os.path.join(run_dir, names[0])
    manifest = json.load(open(os.path.join(ckpt, "dyncheck.json")))
    assert manifest["format_version"] == 2 and manifest["layout"] == "sharded"
    assert manifest["kind"] == "full" and manifest["step"] == 4 and manifest["world_size"] == 2
    files = manifest["files"]
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "trainer_state.pt"} <= set(files)
    for name, size in files.items():  # every rank's file, complete
        assert os.path.getsize(os.path.join(ckpt, name)) == size, name
    assert os.path.isfile(os.path.join(ckpt, ".dyncheck-committed"))
    assert not os.path.exists(os.path.join(ckpt, "model.safetensors")), "nothing gathered to rank 0"
    receipts = os.listdir(os.path.join(run_dir, ".dyncheck", "receipts"))
    receipt = json.load(open(os.path.join(run_dir, ".dyncheck", "receipts", receipts[0])))
    assert receipt["status"] == "ok" and receipt["step"] == 4, receipt
    meta = json.load(open(os.path.join(ckpt, ".metadata.json")))
    assert meta["kind"] == "full" and meta["reason"] == "trigger" and meta["world_size"] == 2


@pytest.mark.timeout(300)
def test_resume_at_two_ranks_is_bitwise(saved):
    tmp, run_dir, ranks = saved
    again = _run(tmp, "b", 2, run_dir, steps=8, restore=True)
    assert again[0]["restored"] == [4, "full", True]
    assert again[0]["weights"]["4"] == ranks[0]["weights"]["4"]
    assert again[0]["weights"]["8"] == ranks[0]["weights"]["8"], "continuation differs from never stopping"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size,shard", [(1, False), (1, True), (4, True)])
def test_resume_reshards_to_another_world_size(saved, world_size, shard):
    tmp, run_dir, ranks = saved
    got = _run(tmp, f"ws{world_size}{shard}", world_size, run_dir, steps=6, restore=True, shard=shard,
               check_interval=100)
    assert got[0]["restored"] == [4, "full", True]
    want = ranks[0]["weights"]["4"]
    for name, values in got[0]["weights"]["4"].items():
        assert torch.equal(torch.tensor(values), torch.tensor(want[name])), name
    assert "6" in got[0]["weights"], "trains on after a resharded resume"


@pytest.mark.timeout(300)
def test_async_save_lets_training_go_on_and_a_request_meanwhile_waits(tmp_path):
    """The store hangs 1.5 s: steps go on while it is in flight; a trigger touched meanwhile is saved
    at the first check after it is stored, as a second checkpoint (never two at once)."""
    run_dir, plan = tmp_path / "run", str(tmp_path / "plan.json")
    set_plan(plan, [{"op": "open_output_stream", "path": "/checkpoint_", "action": "hang", "seconds": 1.5,
                     "times": 1, "rank": 0}])
    ranks = _run(tmp_path, "a", 2, run_dir, steps=60, touch_at=[3, 9], plan=plan, step_time=0.05)
    in_flight = ranks[0]["in_flight"]
    assert len(in_flight) >= 5, f"training advanced while the save was in flight: {in_flight}"
    steps = [s["step"] for s in ranks[0]["saves"]]
    assert len(steps) == 2 and steps[0] == 4 and steps[1] > max(in_flight[:5]), (steps, in_flight)
    assert len(_checkpoints(run_dir)) == 2
    got = [json.load(open(os.path.join(run_dir, ".dyncheck", "receipts", n)))
           for n in sorted(os.listdir(os.path.join(run_dir, ".dyncheck", "receipts")))]
    assert sorted(r["step"] for r in got) == steps and all(r["status"] == "ok" for r in got), got


@pytest.mark.timeout(300)
def test_plain_checkpoint_loads_into_the_same_model_sharded(tmp_path):
    """A plain-layout checkpoint (unsharded model) into FSDP2 at 2 ranks: weights and optimizer state
    (its parameter indices mapped to names) land in every rank's shard."""
    run_dir = tmp_path / "run"
    plain = _run(tmp_path, "plain", 2, run_dir, steps=5, shard=False, save_at=[3], check_interval=100)
    ckpt = os.path.join(run_dir, _checkpoints(run_dir)[0])
    assert json.load(open(os.path.join(ckpt, "dyncheck.json")))["format_version"] == 1
    got = _run(tmp_path, "sharded", 2, run_dir, steps=5, restore=True, check_interval=100)
    assert got[0]["restored"] == [3, "full", True]
    assert got[0]["weights"]["3"] == plain[0]["weights"]["3"]


@pytest.mark.timeout(300)
def test_export_consolidates_a_sharded_checkpoint_into_plain_weights(saved, tmp_path):
    import safetensors.torch

    from gloo_workers import _fsdp_model

    _, run_dir, ranks = saved
    ckpt = os.path.join(run_dir, _checkpoints(run_dir)[0])
    out = tmp_path / "export"
    assert rdc.export_checkpoint(ckpt, str(out)) == ["model.safetensors"]
    model = _fsdp_model(1, shard=False)
    safetensors.torch.load_model(model, str(out / "model.safetensors"), strict=True)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().reshape(-1), torch.tensor(ranks[0]["weights"]["4"][name])), name
    with pytest.raises(ValueError, match="not empty"):
        rdc.export_checkpoint(ckpt, str(out))
    with pytest.raises(ValueError, match="not a ray_dyncheck checkpoint"):
        rdc.export_checkpoint(str(run_dir), str(tmp_path / "x"))


@pytest.mark.timeout(300)
def test_a_stop_during_a_save_in_flight_is_answered_by_that_save(tmp_path):
    """A full save is in flight (its store hangs); a weights-and-stop request arrives: every rank stops
    at the next check with no second save, and the request's receipt is the full checkpoint's."""
    run_dir, plan = tmp_path / "run", str(tmp_path / "plan.json")
    set_plan(plan, [{"op": "open_output_stream", "path": "/checkpoint_", "action": "hang", "seconds": 1.5,
                     "times": 1, "rank": 0}])
    stop = {"id": "stop1", "kind": "weights", "stop": True}
    ranks = _run(tmp_path, "a", 2, run_dir, steps=100, touch_at=[3], request_at={"5": stop}, plan=plan)
    assert [s["step"] for s in ranks[0]["saves"]] == [4], "no second save"
    final = max(int(k) for k in ranks[0]["weights"])
    assert final == 6 and max(int(k) for k in ranks[1]["weights"]) == 6, "both ranks stopped at the check"
    receipt = json.load(open(os.path.join(run_dir, ".dyncheck", "receipts", "stop1.json")))
    assert receipt["status"] == "ok" and receipt["step"] == 4 and receipt["kind"] == "full", receipt
