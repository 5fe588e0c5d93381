"""The save pipeline in real processes: two gloo ranks with FSDP2 that must agree, and a process that
exits while a write hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from drivers import HARNESS
from pipeline_workers import agreed_error_worker

from gloo_workers import run_ranks


@pytest.mark.timeout(180)
def test_an_agreed_error_after_a_copy_gives_the_kept_buffers_back(tmp_path):
    """Two FSDP2 ranks: at step 2 rank 0 has copied its shard when rank 1 fails; nothing is written and
    the step-3 save copies into the same kept buffers as step 1. An unclean close still closes the
    writers' group."""
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(agreed_error_worker, 2, str(tmp_path / "run"), str(out))
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    saves = ranks[0]["saves"]
    assert [s["step"] for s in saves] == [1, 2, 3]
    assert saves[0]["error"] is None and saves[2]["error"] is None
    assert saves[1]["error"] == "another rank could not capture its state (see its log)"
    for rank in ranks:
        assert sorted(rank["buffers"]) == ["1", "3"]
        assert rank["buffers"]["3"] == rank["buffers"]["1"], "the save after the agreed error pinned fresh buffers"
        assert rank["writers_group_closed"], "an unclean close left the writers' group open"
    assert sorted(_stored_steps(tmp_path / "run")) == [1, 3]


def _stored_steps(run_dir):
    return [json.load(open(os.path.join(run_dir, n, "dyncheck.json")))["step"] for n in os.listdir(run_dir)
            if n.startswith("checkpoint_") and os.path.exists(os.path.join(run_dir, n, ".dyncheck-committed"))]


def test_the_process_exits_while_a_write_hangs(tmp_path):
    script = textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {HARNESS!r})
        import torch
        import ray_dyncheck as rdc
        from pipeline_workers import HeldWrites, use_pipeline

        writes = HeldWrites(limit_s=3600)  # never let go
        model = torch.nn.Linear(4, 2)
        dc = rdc.DynamicCheckpoint({{"enabled": False, "commit_timeout_s": 0.5}}, model=model,
                                   backend=rdc.LocalBackend({str(tmp_path / "run")!r}))
        use_pipeline(dc, writes)
        dc.step()
        dc.save("weights")
        assert writes.started[1].wait(10)
        dc.close(timeout=0.5)
        print("closed", flush=True)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process did not exit within 60 s of a hung write: {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert "closed" in done.stdout

