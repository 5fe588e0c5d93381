"""Sharded writers agree before DCP's first collective: a rank that fails while preparing its part
(before ``dcp.save``) fails the write on every rank at once, and the writers' gloo group stays in
step for the next save. Real FSDP2 ranks over gloo, no Ray; the failure is injected in rank 1's
process (its ``dcp/`` folder cannot be created once)."""

from __future__ import annotations

import json
import os

import pytest

from gloo_workers import fsdp_prepare_fault_worker, run_ranks


@pytest.mark.timeout(300)
def test_a_rank_failing_before_dcp_save_fails_the_write_everywhere_and_the_next_save_works(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    run_ranks(fsdp_prepare_fault_worker, 2, str(run_dir), str(out))
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    first, second = ranks[0]["saves"]
    assert first["step"] == 1 and "rank 1: OSError" in first["error"] and "(injected)" in first["error"], first
    # Promptly, not after the writers' collective timeout (20 s) with their collectives out of step.
    assert all(r["seconds"][0] < 10 for r in ranks), [r["seconds"] for r in ranks]
    assert second["step"] == 2 and second["error"] is None, second
    checkpoints = [n for n in os.listdir(run_dir) if n.startswith("checkpoint_")]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint_00000002_full"), checkpoints
    for r in ranks:
        assert r["restored"] == [2, "full", True]
        assert r["restored_weights"] == r["weights"]
