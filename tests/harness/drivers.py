"""Driver processes for the tests: ``interrupt_driver.py`` started in its own process (and process
group), waited for, and its run read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

HARNESS = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HARNESS, "interrupt_driver.py")
KILLED_BY_SIGINT = (-signal.SIGINT, 130)


def start_driver(tmp_path, dc=None, steps=100_000, extra=None):
    ready = tmp_path / "ready"
    log = open(tmp_path / "driver.log", "w")
    env = dict(os.environ, RAY_TRAIN_COLLECTIVE_TIMEOUT_S="120", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, DRIVER, str(tmp_path / "results"), "run",
         str(tmp_path / "out"), str(ready), json.dumps(dc or {}), str(steps), json.dumps(extra or {})],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, ready


def wait_ready(proc, ready, tmp_path, timeout=180):
    deadline = time.time() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"driver never started training:\n{(tmp_path / 'driver.log').read_text()[-4000:]}")
        time.sleep(0.2)


def finish(proc, tmp_path, timeout=120):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"driver did not exit:\n{(tmp_path / 'driver.log').read_text()[-4000:]}")
    return rc, (tmp_path / "driver.log").read_text()


def weights_checkpoints(tmp_path):
    run = tmp_path / "results" / "run"
    out = []
    for d in sorted(p for p in run.glob("checkpoint_*") if p.is_dir()):
        meta = json.loads((d / ".metadata.json").read_text())
        out.append((d, meta))
    return out

