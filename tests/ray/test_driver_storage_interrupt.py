"""A second Ctrl+C ends a real driver process (local Ray, TorchTrainer) within seconds while its
object store (a real S3 server, moto, its own process on loopback) is frozen with SIGSTOP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from drivers import DRIVER, KILLED_BY_SIGINT, wait_ready
from s3_local import frozen, s3_server, s3_uri


@pytest.fixture
def s3():
    with s3_server() as (port, _):
        yield port


def test_second_sigint_exits_within_5_s_while_the_object_store_is_frozen(s3, tmp_path):
    """Ctrl+C with the run's object store frozen, Ctrl+C again 2 s later: the driver is gone within
    5 s of the second, with SIGINT's status (not held up at interpreter exit by a stuck S3 call)."""
    ready = tmp_path / "ready"
    env = dict(os.environ, RAY_TRAIN_COLLECTIVE_TIMEOUT_S="120", PYTHONUNBUFFERED="1")
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, DRIVER, s3_uri(s3), "run", str(tmp_path / "out"),
             str(ready), json.dumps({}), "100000", json.dumps({})],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_ready(proc, ready, tmp_path)
        with frozen(s3):
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C in a terminal does
            time.sleep(2.0)
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            t0 = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            try:
                rc = proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                rc = None
            elapsed = time.monotonic() - t0
        log_text = (tmp_path / "driver.log").read_text()
        assert rc is not None, f"driver still alive 5 s after the second SIGINT:\n{log_text[-3000:]}"
        assert rc in KILLED_BY_SIGINT, (rc, log_text[-3000:])
        assert "forced exit (second SIGINT)" in log_text
        print(f"frozen object store: second SIGINT -> driver exit {elapsed:.2f} s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and what is left of its Ray
        proc.wait(30)

