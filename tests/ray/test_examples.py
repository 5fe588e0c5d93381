"""The quickstart as a new user runs it: its own embedded Ray, even when a stale `ray start` left its
address file behind; progress lines while it trains, not Ray's warnings; one triggered checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(300)
def test_quickstart_starts_its_own_ray_despite_a_stale_address_file(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(ray_tmp, "ray"))
        with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9")  # a cluster that is long gone
        env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "train_torch.py"), "--storage-path", str(tmp_path),
             "--steps", "300", "--step-time", "0.02"],
            capture_output=True, text=True, timeout=280, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    progress = [line for line in out.splitlines() if "steps/s" in line]
    assert progress and "loss" in progress[0], "progress lines while training"
    assert len(set(progress)) == len(progress), "each line once (Ray Train's print patch is off)"
    assert "State API may be temporarily unavailable" not in out, "Ray's dashboard serves the State API"
    ckpts = [n for n in os.listdir(tmp_path / "quickstart")
             if n.startswith("checkpoint_") and (tmp_path / "quickstart" / n).is_dir()]
    assert len(ckpts) == 1, ckpts


@pytest.mark.timeout(400)
def test_lightning_example_saves_on_its_demo_trigger_then_resumes_at_that_step(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_lightning.py"), "--storage-path", str(tmp_path),
           "--steps", "200", "--step-time", "0.02"]  # 100 steps after the demo's touch: time to claim it
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=190, env=env)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert "[demo] step 100: touching" in out
    [line] = [line for line in out.splitlines() if line.startswith("checkpoint step=")]
    assert "kind=full reason=trigger" in line
    step = int(line.split("step=")[1].split()[0])
    assert 100 < step < 200
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=190, env=env)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resuming from" in out and f"step {step}" in out.split("resuming from", 1)[1]
    assert "[demo]" not in out, "the resumed run starts after the step the demo touches at"
