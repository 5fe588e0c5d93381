"""Config validation across real gloo ranks: a bad trigger URI fails every rank at once."""

from __future__ import annotations

import pytest


def _bad_trigger_rank(rank: int, world_size: int, port: int, out: str) -> None:
    import json
    import os
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import ray_dyncheck as rdc

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    t0, error = time.monotonic(), None
    try:
        rdc.DynamicCheckpoint({"trigger_file_path": "s4://bucket/go.save", "collective_timeout_s": 30},
                              model=torch.nn.Linear(2, 1), backend=rdc.LocalBackend(out))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"error": error, "seconds": time.monotonic() - t0}, f)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_bad_trigger_uri_fails_every_rank_at_once(tmp_path):
    """Before any rank makes its side group or touches storage: the same error on each, no wait."""
    import json

    from gloo_workers import run_ranks

    run_ranks(_bad_trigger_rank, 2, str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["error"] == got[1]["error"]
    assert got[0]["error"].startswith("ValueError: dynamic_checkpoint.trigger_file_path: got 's4://bucket/go.save'")
    assert max(g["seconds"] for g in got) < 10, got

