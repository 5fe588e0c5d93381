"""The `ray-dyncheck` CLI and `request_save`, as real processes against a run with a live hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import ray_dyncheck as rdc

CLI = os.path.join(os.path.dirname(sys.executable), "ray-dyncheck")


class Trainer:
    """A live hook (world size 1, LocalBackend) stepping in a thread, as a job's rank 0 would."""

    def __init__(self, run_dir, **cfg):
        self.model = torch.nn.Linear(4, 1)
        self.dc = rdc.DynamicCheckpoint({"check_interval": 2, "poll_interval_s": 0.05, **cfg}, model=self.model,
                                        optimizer=torch.optim.SGD(self.model.parameters(), lr=0.1),
                                        backend=rdc.LocalBackend(str(run_dir)))
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set() and not self.dc.should_stop:
            time.sleep(0.01)
            self.dc.step()
        self.dc.close()

    def stop(self):
        self.done.set()
        self.thread.join(30)


def cli(*args, timeout=120):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def live(tmp_path):
    trainer = Trainer(tmp_path / "run")
    yield tmp_path / "run", trainer
    trainer.stop()


def test_save_wait_prints_the_checkpoint_path(live):
    run, trainer = live
    out = cli("save", run, "--wait", "--timeout", 60)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip().splitlines()[-1]
    assert os.path.isdir(path) and os.path.basename(path).startswith("checkpoint_")
    assert os.path.isfile(os.path.join(path, "optimizer.pt"))
    assert "full checkpoint at step" in out.stdout


def test_status_table_and_json(live):
    run, trainer = live
    assert cli("save", run, "--weights-only", "--wait", "--timeout", 60).returncode == 0
    table = cli("status", run)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0] == f"run {run}: 1 checkpoint(s)"
    assert lines[1].split() == ["DIR", "KIND", "STEP", "REASON", "TIME", "SIZE", "STATE"]
    assert lines[2].split()[1:4][0] == "weights" and lines[2].split()[3] == "request"
    assert lines[2].split()[-1] == "committed"
    assert lines[-1] == "pending requests: none"
    data = json.loads(cli("status", run, "--json").stdout)
    [ckpt] = data["checkpoints"]
    assert (ckpt["kind"], ckpt["reason"]) == ("weights", "request") and ckpt["size"] > 0
    assert [r["status"] for r in data["receipts"]] == ["ok"]
    # A writer killed halfway leaves a torn directory; one never committed is marked too.
    import shutil

    src = run / ckpt["dir"]
    shutil.copytree(src, run / "checkpoint_x_torn")
    with open(run / "checkpoint_x_torn" / "model.safetensors", "r+b") as f:
        f.truncate(5)
    shutil.copytree(src, run / "checkpoint_y_uncommitted")
    os.remove(run / "checkpoint_y_uncommitted" / ".dyncheck-committed")
    states = {c["dir"]: c["state"] for c in json.loads(cli("status", run, "--json").stdout)["checkpoints"]}
    assert states == {ckpt["dir"]: "committed", "checkpoint_x_torn": "torn", "checkpoint_y_uncommitted": "uncommitted"}


def test_stop_asks_for_weights_and_a_stop(live):
    run, trainer = live
    out = cli("stop", run, "--wait", "--timeout", 60)
    assert out.returncode == 0, out.stderr
    trainer.thread.join(30)
    assert trainer.dc.should_stop
    [save] = trainer.dc.saves
    assert (save["kind"], save["reason"]) == ("weights", "request")


def test_bad_run_and_timeout(tmp_path):
    out = cli("save", tmp_path / "nope")
    assert out.returncode == 2
    assert out.stderr.strip() == (f"ray-dyncheck: no run directory at {tmp_path / 'nope'}: expected "
                                  "<storage_path>/<name>/ of a Ray Train run")
    (tmp_path / "plain").mkdir()
    out = cli("status", tmp_path / "plain")
    assert out.returncode == 2 and "is not a Ray Train run directory (no .validate_storage_marker)" in out.stderr
    out = cli("save", "s3://bucket/run?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    assert out.returncode == 2 and out.stderr.startswith("ray-dyncheck: cannot reach s3://bucket/run")
    assert len(out.stderr.strip().splitlines()) == 1
    rdc.LocalBackend(str(tmp_path / "idle"))  # a run with no job watching it
    out = cli("save", tmp_path / "idle", "--wait", "--timeout", 1)
    assert out.returncode == 2 and "no receipt for request req-" in out.stderr


def test_save_wait_gets_an_answer_when_the_run_ends_before_a_check(tmp_path):
    # check_interval far beyond the run: the request is claimed but never reaches a check. When the
    # loop ends, it gets an "unserved" receipt, so `save --wait` returns instead of timing out.
    trainer = Trainer(tmp_path / "run", check_interval=100_000)
    waiter = subprocess.Popen([CLI, "save", str(tmp_path / "run"), "--wait", "--timeout", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pending = tmp_path / "run" / ".dyncheck"
    deadline = time.time() + 60
    while not (pending / "claimed").is_dir() or not os.listdir(pending / "claimed"):
        assert time.time() < deadline, "the request was never claimed"
        time.sleep(0.05)
    trainer.stop()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 1, out + err  # a timeout would be 2
    assert "unserved: training ended at step" in err and "before a check served it" in err
