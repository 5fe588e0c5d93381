"""`request_save` against a run with a live hook (world size 1, LocalBackend), in this process."""

from __future__ import annotations

import json
import time

import torch

import ray_dyncheck as rdc


def test_two_requests_at_one_check_share_a_checkpoint_with_two_receipts(tmp_path):
    run = tmp_path / "run"
    model = torch.nn.Linear(4, 1)
    dc = rdc.DynamicCheckpoint({"check_interval": 5, "poll_interval_s": 0.05}, model=model,
                               backend=rdc.LocalBackend(str(run)))
    a = rdc.request_save(str(run))
    b = rdc.request_save(str(run), kind="weights")
    assert a["status"] == b["status"] == "pending"
    deadline = time.time() + 10
    while dc.pending_requests < 2 and time.time() < deadline:
        time.sleep(0.02)
    for _ in range(5):
        dc.step()
    dc.close()
    [save] = dc.saves
    assert (save["step"], save["kind"], sorted(save["requests"])) == (5, "full", sorted([a["id"], b["id"]]))
    receipts = [json.loads((run / ".dyncheck" / "receipts" / f"{r['id']}.json").read_text()) for r in (a, b)]
    assert [r["status"] for r in receipts] == ["ok", "ok"]
    assert receipts[0]["checkpoint"] == receipts[1]["checkpoint"] == save["path"]
    assert [r["requested_kind"] for r in receipts] == ["full", "weights"]

