"""The hook in one process (world size 1, no Ray) with LocalBackend: schedule, failures, restore."""

from __future__ import annotations

import json
import logging
import os
import time

import torch

import ray_dyncheck as rdc


class Counter:
    def __init__(self):
        self.n = 0
        self.fail = False

    def state_dict(self):
        if self.fail:
            raise RuntimeError("data loader state unavailable")
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def make(tmp_path, cfg, counter=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dc = rdc.DynamicCheckpoint(cfg, model=model, optimizer=opt,
                               extra_state={"c": counter or Counter()},
                               backend=rdc.LocalBackend(str(tmp_path / "run")))
    return dc, model


def wait_claimed(dc, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline and not dc.pending_requests:
        time.sleep(0.02)
    assert dc.pending_requests, "the poller did not claim the trigger"


def ckpt_dirs(tmp_path):
    return sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint_"))


def test_scheduled_and_triggered_on_the_same_step_save_once(tmp_path):
    dc, _ = make(tmp_path, {"check_interval": 4, "save_steps": 4, "poll_interval_s": 0.02})
    for _ in range(2):
        dc.step()
    (tmp_path / "run" / "dyncheck.save").touch()
    wait_claimed(dc)
    for _ in range(6):
        dc.step()
    dc.close()
    assert [(s["step"], s["reason"]) for s in dc.saves] == [(4, "trigger"), (8, "schedule")]
    assert len(ckpt_dirs(tmp_path)) == 2
    receipt = json.loads(next((tmp_path / "run" / ".dyncheck" / "receipts").glob("*.json")).read_text())
    assert (receipt["status"], receipt["step"]) == ("ok", 4)


def test_failed_write_reports_nothing_and_leaves_an_error_receipt(tmp_path, caplog):
    counter = Counter()
    counter.fail = True
    dc, _ = make(tmp_path, {"check_interval": 2, "poll_interval_s": 0.02}, counter)
    (tmp_path / "run" / "dyncheck.save").touch()
    wait_claimed(dc)
    with caplog.at_level(logging.ERROR, logger="ray_dyncheck"):
        dc.step(), dc.step()
    dc.close()
    assert ckpt_dirs(tmp_path) == [], "a checkpoint that failed to write is never reported"
    [save] = dc.saves
    assert save["error"] == "rank 0: RuntimeError: data loader state unavailable"
    receipt = json.loads(next((tmp_path / "run" / ".dyncheck" / "receipts").glob("*.json")).read_text())
    assert (receipt["status"], receipt["error"]) == ("error", save["error"])
    assert "no checkpoint at step 2 (trigger)" in caplog.text


def test_restore_skips_incomplete_and_refuses_foreign(tmp_path, caplog):
    counter = Counter()
    dc, model = make(tmp_path, {"enabled": False, "save_steps": 3}, counter)
    for i in range(6):
        counter.n = i
        dc.step()
    dc.close()
    first, second = ckpt_dirs(tmp_path)
    # The newest is truncated: restore takes the one before it.
    with open(tmp_path / "run" / second / "model.safetensors", "r+b") as f:
        f.truncate(8)
    fresh_counter = Counter()
    dc2, model2 = make(tmp_path, {"enabled": False}, fresh_counter)
    with caplog.at_level(logging.ERROR, logger="ray_dyncheck"):
        info = dc2.restore()
    assert info is not None and info.step == 3 and dc2.global_step == 3
    assert fresh_counter.n == 2
    assert "is incomplete: model.safetensors is missing or truncated" in caplog.text
    # A torn one (never committed: no marker) is not even listed.
    os.makedirs(tmp_path / "run" / "checkpoint_99999998_torn")
    (tmp_path / "run" / "checkpoint_99999998_torn" / "model.safetensors").write_bytes(b"half")
    assert make(tmp_path, {"enabled": False})[0].restore().step == 3
    # A newer committed checkpoint someone else wrote: say so, touch nothing.
    os.makedirs(tmp_path / "run" / "checkpoint_99999999_theirs" / "weights")
    (tmp_path / "run" / "checkpoint_99999999_theirs" / ".dyncheck-committed").write_text(
        json.dumps({"time": time.time() + 10}))
    dc3, model3 = make(tmp_path, {"enabled": False})
    before = [p.clone() for p in model3.parameters()]
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        assert dc3.restore() is None
    assert "was not written by ray_dyncheck; training state left as it is" in caplog.text
    assert dc3.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model3.parameters()))


def test_check_steps_after_a_resume_and_when_disabled(tmp_path):
    """A fixed interval keeps Axolotl's meaning after a resume at any step (checks at multiples of N);
    ``enabled: false`` never checks, and its schedule still saves."""
    dc, _ = make(tmp_path / "a", {"check_interval": 5})
    dc.global_step = 7
    checks = [dc.global_step for _ in range(10) if dc.step() is not None]
    assert checks == [10, 15]
    dc.close()
    off, _ = make(tmp_path / "b", {"enabled": False, "save_steps": 4})
    assert [off.step() for _ in range(9)] == [None] * 9
    assert [s["step"] for s in off.saves] == [4, 8]
    off.close()


def test_waiting_request_is_announced_once_with_when_it_will_be_seen(tmp_path, caplog):
    dc, _ = make(tmp_path, {"check_interval": 1000, "poll_interval_s": 0.05})
    dc.step()
    open(tmp_path / "run" / "dyncheck.save", "w").close()
    wait_claimed(dc)
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        for _ in range(5):
            dc.step()
    lines = [r.getMessage() for r in caplog.records if "is waiting" in r.getMessage()]
    assert lines == ["dyncheck: a request is waiting; the next check is in 998 step(s) (check_interval=1000)"]
    dc.close()
