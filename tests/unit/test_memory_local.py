"""Memory snapshots in one process (world size 1, no Ray): LocalBackend with an in-process store. What
is tested here is the hook's side (when, what, restore's choice and fallback); the holders on Ray and
real crashes are in ``tests/cluster/test_memory_snapshots.py``."""

from __future__ import annotations

import logging
import time

import pytest
import torch

import ray_dyncheck as rdc
from ray_dyncheck._state.memory import DictStore


class Position:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def make(tmp_path, cfg, store):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    pos = Position()
    dc = rdc.DynamicCheckpoint({"enabled": False, **cfg}, model=model, optimizer=opt, lr_scheduler=sched,
                               extra_state={"pos": pos}, backend=rdc.LocalBackend(str(tmp_path / "run"), memory=store))
    return dc, model, opt, sched, pos


def train(dc, model, opt, sched, pos, until):
    while dc.global_step < until:
        torch.manual_seed(1000 + dc.global_step)
        x = torch.randn(16, 4)
        loss = model(x).pow(2).mean() + torch.rand(()) * 0  # dropout draws from the restored RNG too
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        pos.n += 1
        dc.step()


def wait_snapshot(dc, step, timeout=30.0):
    deadline = time.time() + timeout
    while dc.memory_snapshot_step != step:
        assert time.time() < deadline, f"no complete snapshot of step {step} (newest {dc.memory_snapshot_step})"
        time.sleep(0.01)


def state(model, opt):
    moments = opt.state_dict()["state"]
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for k, s in moments.items()})


def same(a, b):
    (wa, oa), (wb, ob) = a, b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k][n], ob[k][n]) for k in oa for n in oa[k])


def test_a_crash_resumes_from_the_newest_snapshot_and_goes_on_as_if_never_stopped(tmp_path):
    store = DictStore()
    dc, *objs = make(tmp_path, {"memory_snapshots": 5}, store)
    train(dc, *objs, until=5)
    wait_snapshot(dc, 5)  # else the step-10 one may find it still in flight, and be skipped
    train(dc, *objs, until=10)
    wait_snapshot(dc, 10)
    train(dc, *objs, until=13)  # the "crash" comes at step 13: steps 11-13 are lost
    dc.close()
    assert store.newest().step == 10
    assert not list((tmp_path / "run").glob("checkpoint_*")), "nothing in storage: memory alone"

    reference, *ref_objs = make(tmp_path / "ref", {}, DictStore())
    train(reference, *ref_objs, until=20)
    reference.close()

    dc2, *objs2 = make(tmp_path, {"memory_snapshots": 5}, store)
    info = dc2.restore()
    assert (info.step, info.kind, info.loaded_optimizer) == (10, "full", True)
    assert info.path.startswith("memory (step 10")
    assert objs2[3].n == 10 and objs2[2].last_epoch == 10
    train(dc2, *objs2, until=20)
    dc2.close()
    same(state(objs2[0], objs2[1]), state(ref_objs[0], ref_objs[1]))


def test_a_stored_checkpoint_newer_than_the_snapshot_wins_and_a_lost_snapshot_falls_back(tmp_path, caplog):
    store = DictStore()
    dc, *objs = make(tmp_path, {"memory_snapshots": 4}, store)
    train(dc, *objs, until=4)
    wait_snapshot(dc, 4)
    train(dc, *objs, until=6)
    dc.save("full")
    dc.wait_stored()
    dc.close()
    dc2, *_ = make(tmp_path, {"memory_snapshots": 4}, store)
    assert dc2.restore().step == 6  # storage (6) is newer than memory (4)
    dc2.close()

    class Lost(DictStore):
        def get(self, held):
            raise ConnectionError("the holder's node is gone")

    lost = Lost()
    dc3, *objs3 = make(tmp_path, {"memory_snapshots": 4}, lost)
    train(dc3, *objs3, until=4)
    wait_snapshot(dc3, 4)
    train(dc3, *objs3, until=8)
    wait_snapshot(dc3, 8)
    dc3.close()
    dc4, *_ = make(tmp_path, {"memory_snapshots": 4}, lost)
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        info = dc4.restore()
    dc4.close()
    assert info.step == 6 and not info.path.startswith("memory"), info
    assert "the memory snapshot of step 8 is lost" in caplog.text and "resuming from storage" in caplog.text


def test_a_snapshot_of_another_world_size_or_run_is_not_used(tmp_path, caplog):
    store = DictStore()
    store.put(50, {"world_size": 4, "kind": "full", "run": str(tmp_path / "run"), "bytes": 0}, {})
    dc, *_ = make(tmp_path, {"memory_snapshots": 5}, store)
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        assert dc.restore() is None
    dc.close()
    assert "taken at world size 4, now 1: resuming from storage" in caplog.text


def test_without_holders_snapshots_are_off_and_say_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        dc, *objs = make(tmp_path, {"memory_snapshots": "auto"}, None)
    train(dc, *objs, until=12)
    dc.close()
    assert dc.memory_snapshot_step is None
    assert "memory_snapshots=auto is off for this run: no memory holders serve this run: start it with " \
           "rdc.fit(trainer)" in caplog.text


def test_auto_spaces_snapshots_by_their_measured_cost(tmp_path):
    store = DictStore()
    dc, *objs = make(tmp_path, {"memory_snapshots": "auto"}, store)
    train(dc, *objs, until=10)
    wait_snapshot(dc, 10)
    train(dc, *objs, until=25)
    # A tiny model's snapshot costs about as much as its step: 1 % of training time means ~100 steps apart.
    assert dc.memory_snapshot_interval > 10, dc.memory_snapshot_interval
    dc.close()


def test_the_store_keeps_the_newest_complete_set_and_the_one_being_made():
    store = DictStore()
    for step in (5, 10, 15):
        store.put(step, {"world_size": 1, "kind": "full", "run": "r", "bytes": 1}, {"model.safetensors": b"x" * step})
    assert store.newest().step == 15
    assert store.held_bytes() == {"local": 15}


@pytest.mark.parametrize("value", [0, -1, "sometimes", 2.5, True])
def test_memory_snapshots_must_be_off_auto_or_a_step_count(value):
    with pytest.raises(ValueError, match=r"dynamic_checkpoint.memory_snapshots: got .*; set it to 'off', 'auto' or "
                                         r"an integer >= 1 \(steps between snapshots\)"):
        rdc.DynamicCheckpointConfig(memory_snapshots=value)


def test_a_full_save_is_also_a_snapshot_and_copies_the_state_once(tmp_path, monkeypatch):
    import ray_dyncheck._pipeline as pipeline
    import ray_dyncheck._snapshots as snapshots

    copies = []
    for module in (pipeline, snapshots):  # a spy: the real copy, counted

        def spy(*a, _real=module.capture_state, _m=module.__name__, **k):
            copies.append((_m, k["step"]))
            return _real(*a, **k)

        monkeypatch.setattr(module, "capture_state", spy)
    store = DictStore()
    dc, model, opt, sched, pos = make(tmp_path, {"memory_snapshots": 100}, store)
    train(dc, model, opt, sched, pos, until=7)
    expected = state(model, opt)
    dc.save("full")
    dc.wait_stored()
    wait_snapshot(dc, 7)
    dc.save("weights")  # not a snapshot: a weights-only save copies its own
    dc.wait_stored()
    dc.close()
    assert copies == [("ray_dyncheck._snapshots", 7), ("ray_dyncheck._pipeline", 7)], copies
    assert [(s["step"], s["kind"]) for s in dc.saves] == [(7, "full"), (7, "weights")]

    # The stored checkpoint of step 7 (written from the snapshot's bytes) restores exactly.
    dc2, model2, opt2, *_ = make(tmp_path / "elsewhere", {}, None)
    dc2.close()
    full = sorted((tmp_path / "run").glob("checkpoint_00000007_full*"))
    assert len(full) == 1
    from ray_dyncheck._state import load_checkpoint

    info = load_checkpoint(str(full[0]), model=model2, optimizer=opt2, lr_scheduler=None, extra_state=None, rank=0)
    assert (info.step, info.kind, info.loaded_optimizer) == (7, "full", True)
    same(state(model2, opt2), expected)


def test_a_newer_checkpoint_we_did_not_write_leaves_memory_unused_too(tmp_path, caplog):
    import json
    import os

    store = DictStore()
    dc, *objs = make(tmp_path, {"memory_snapshots": 4}, store)
    train(dc, *objs, until=4)
    wait_snapshot(dc, 4)
    dc.close()
    os.makedirs(tmp_path / "run" / "checkpoint_99999999_theirs" / "weights")
    (tmp_path / "run" / "checkpoint_99999999_theirs" / ".dyncheck-committed").write_text(
        json.dumps({"time": time.time() + 10}))
    dc2, model2, *_ = make(tmp_path, {"memory_snapshots": 4}, store)
    before = [p.clone() for p in model2.parameters()]
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        assert dc2.restore() is None  # the user restores their own: nothing of ours is loaded over it
    dc2.close()
    assert "was not written by ray_dyncheck; training state left as it is" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))


def test_a_save_after_a_step_that_took_a_snapshot_reuses_it(tmp_path):
    class Counting(DictStore):
        puts: list[int] = []

        def put(self, step, meta, files):
            self.puts.append(step)
            return super().put(step, meta, files)

    store = Counting()
    dc, *objs = make(tmp_path, {"memory_snapshots": 4}, store)
    train(dc, *objs, until=4)  # the step-4 snapshot, taken inside step()
    wait_snapshot(dc, 4)
    dc.save("full")  # at the same step: the same snapshot, not a second one put over the complete one
    dc.wait_stored()
    dc.close()
    assert dc.memory_snapshot_step == 4 and store.newest().step == 4
    assert store.puts == [4], "one snapshot of step 4, put once"
    assert [(s["step"], s["kind"]) for s in dc.saves] == [(4, "full")]
