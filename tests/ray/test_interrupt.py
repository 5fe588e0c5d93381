"""Graceful interrupt with real processes and real signals: the driver runs ``rdc.fit`` in its own
process (and process group), with its own local Ray; the test signals it like a terminal would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timezone

import pytest
import safetensors.torch
from drivers import DRIVER, KILLED_BY_SIGINT, finish, start_driver, wait_ready, weights_checkpoints


def committed_after(tmp_path, t0):
    """Seconds from the signal to the interrupt receipt (written once the checkpoint is stored)."""
    from datetime import datetime

    [receipt] = (tmp_path / "results" / "run" / ".dyncheck" / "receipts").glob("interrupt-*.json")
    stamp = json.loads(receipt.read_text())["time"]
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp() - t0


@pytest.mark.parametrize("target", ["group", "pid"])
def test_sigint_saves_weights_and_stops(tmp_path, target):
    proc, ready = start_driver(tmp_path)
    wait_ready(proc, ready, tmp_path)
    t0 = time.time()
    if target == "group":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C in a terminal does
    else:
        os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, tmp_path)
    elapsed = time.time() - t0
    assert rc in KILLED_BY_SIGINT, log[-3000:]
    assert "interrupt received (SIGINT): asking workers for a weights-only save (SIGINT again to force)" in log
    [(path, meta)] = weights_checkpoints(tmp_path)
    assert (meta["kind"], meta["reason"]) == ("weights", "interrupt")
    assert not (path / "optimizer.pt").exists()
    weights = safetensors.torch.load_file(path / "model.safetensors")
    assert weights["0.weight"].shape == (32, 8)
    assert f"weights checkpoint at step {meta['step']}" in log
    print(f"SIGINT ({target}): signal -> weights committed {committed_after(tmp_path, t0):.2f} s, "
          f"-> driver exit {elapsed:.1f} s")


def test_sigterm_to_the_driver_pid_then_resume_from_weights(tmp_path):
    proc, ready = start_driver(tmp_path)
    wait_ready(proc, ready, tmp_path)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)  # what `ray job stop` sends
    rc, log = finish(proc, tmp_path)
    assert rc == 128 + signal.SIGTERM, log[-3000:]
    print(f"SIGTERM (pid): signal -> weights committed {committed_after(tmp_path, t0):.2f} s, "
          f"-> driver exit {time.time() - t0:.1f} s")
    [(_, meta)] = weights_checkpoints(tmp_path)
    assert (meta["kind"], meta["reason"]) == ("weights", "interrupt")
    # Resume: the same name and storage continue at the saved step with a fresh optimizer.
    step = meta["step"]
    proc, ready = start_driver(tmp_path, steps=step + 10)
    rc, log = finish(proc, tmp_path, timeout=180)
    assert rc == 0, log[-3000:]
    record = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert (record["restored"], record["start"], record["final_step"]) == ([step, "weights"], step, step + 10)
    assert "optimizer state starts fresh: the interrupt saved weights only" in log


def test_second_sigint_forces_exit(tmp_path):
    # Checks are 10 000 steps apart: the first SIGINT's request cannot be honoured in time.
    proc, ready = start_driver(tmp_path, dc={"check_interval": 10_000})
    wait_ready(proc, ready, tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)  # inside the debounce: the same Ctrl+C, not a second one
    time.sleep(1.5)
    assert proc.poll() is None, "a duplicate within the debounce must not force the exit"
    t0 = time.time()
    os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, tmp_path, timeout=60)
    assert rc in KILLED_BY_SIGINT
    assert time.time() - t0 < 20
    assert "forced exit (second SIGINT)" in log
    assert "a request is waiting; the next check is in" in log
    assert weights_checkpoints(tmp_path) == []


def test_grace_deadline_forces_exit(tmp_path):
    proc, ready = start_driver(tmp_path, dc={"check_interval": 10_000, "interrupt_grace_s": 2})
    wait_ready(proc, ready, tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, tmp_path, timeout=60)
    assert rc in KILLED_BY_SIGINT
    assert "forced exit (no answer within interrupt_grace_s=2 s)" in log
    assert "no receipt yet (the workers have not saved)" in log


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_stop_saves_weights(tmp_path):
    """`ray job submit` against a Ray head this test starts on loopback; `ray job stop` -> a save."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, dash = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TRAIN_COLLECTIVE_TIMEOUT_S="120")
    head_log = open(tmp_path / "head.log", "w")
    ray_tmp = tempfile.mkdtemp(prefix="rdj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         f"--temp-dir={ray_tmp}", "--include-dashboard=true", "--disable-usage-stats"],
        stdout=head_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"

    def ray_cli(*args, timeout=120):
        return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout)

    try:
        deadline = time.time() + 120
        while ray_cli("job", "list", "--address", address, timeout=60).returncode != 0:
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        ready = tmp_path / "ready"
        runtime_env = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120", "PYTHONUNBUFFERED": "1"}}
        sub = ray_cli("job", "submit", "--address", address, "--no-wait",
                      "--runtime-env-json", json.dumps(runtime_env), "--",
                      sys.executable, DRIVER, str(tmp_path / "results"), "run",
                      str(tmp_path / "out"), str(ready))
        assert sub.returncode == 0, sub.stdout + sub.stderr
        job_id = next(w.strip("'") for line in sub.stdout.splitlines() for w in line.split()
                      if w.strip("'").startswith("raysubmit_"))
        deadline = time.time() + 180
        while not ready.exists():
            assert time.time() < deadline, ray_cli("job", "logs", "--address", address, job_id).stdout[-4000:]
            time.sleep(0.5)
        t0 = time.time()
        stop = ray_cli("job", "stop", "--address", address, job_id, timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        from ray.job_submission import JobStatus, JobSubmissionClient

        os.environ["RAY_AUTH_MODE"] = "disabled"  # restored by the autouse fixture
        client = JobSubmissionClient(address)
        while not (status := client.get_job_status(job_id)).is_terminal():
            assert time.time() - t0 < 180, (status, stop.stdout, stop.stderr)
            time.sleep(0.5)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.STOPPED, (status, logs[-3000:])
        [(path, meta)] = weights_checkpoints(tmp_path)
        assert (meta["kind"], meta["reason"]) == ("weights", "interrupt"), logs[-3000:]
        assert "interrupt received (SIGTERM)" in logs
        assert safetensors.torch.load_file(path / "model.safetensors")
        print(f"ray job stop -> job ended: {time.time() - t0:.1f} s")
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
