"""The driver and the client against an object store that stops answering: a real S3 server (moto,
its own process on loopback) frozen with SIGSTOP, so connections are accepted and requests are
never answered. Every storage call made by the driver or the client gives up in bounded time, and a
second Ctrl+C ends a real driver process within seconds even while its request write is stuck."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow.fs as pafs
import pytest
from test_interrupt import HERE, KILLED_BY_SIGINT, wait_ready

from ray_dyncheck import driver, request_save
from ray_dyncheck._files import CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S, REQUESTS, write_json
from ray_dyncheck.errors import RunNotFoundError

sys.path.insert(0, os.path.dirname(HERE))
from benchmarks._common import s3_server, s3fs  # noqa: E402  (the S3 server on loopback, shared)

# A frozen server fails one bounded call after RETRY_ATTEMPTS x REQUEST_TIMEOUT_S (~17 s measured); a
# request write makes two (the folder, then the object: ~32 s). Arrow's defaults: ~100 s and ~200 s.
BOUNDED_S = 60.0


def s3_uri(port: int, prefix: str = "bucket/ray_results") -> str:
    return f"s3://{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


def timeouts(fs: pafs.FileSystem) -> tuple[float, float]:
    _, (options,) = fs.__reduce__()
    return options["connect_timeout"], options["request_timeout"]


@contextlib.contextmanager
def frozen(port: int):
    """The moto server on ``port`` stopped (SIGSTOP) inside the block; always continued afterwards."""
    servers = [p for p in psutil.Process().children(recursive=True)
               if "moto_server" in " ".join(p.cmdline()) and str(port) in p.cmdline()]
    assert servers, "no moto server process found"
    for p in servers:
        p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in servers:
            p.send_signal(signal.SIGCONT)


@pytest.fixture
def s3():
    with s3_server() as (port, _):
        yield port


def test_driver_run_dir_on_s3_is_bounded():
    from ray.train import RunConfig

    uri = s3_uri(1)  # nothing listens there: resolving must not touch the network
    fs, path = driver._RunDir(RunConfig(name="run", storage_path=uri)).resolve()
    assert (timeouts(fs), path) == ((CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S), "bucket/ray_results/run")
    given = pafs.S3FileSystem(endpoint_override="127.0.0.1:1", scheme="http", region="us-east-1")
    fs, path = driver._RunDir(RunConfig(name="run", storage_path="bucket/x", storage_filesystem=given)).resolve()
    assert (timeouts(fs), path) == ((CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S), "bucket/x/run")
    assert fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:1"
    local = pafs.LocalFileSystem()
    assert driver._RunDir(RunConfig(name="run", storage_path="/tmp/x", storage_filesystem=local)).resolve()[0] is local


def test_storage_calls_give_up_in_bounded_time_on_a_frozen_server(s3):
    """The driver's request write and the client's request (given a filesystem the caller built with
    Arrow's defaults) both fail in bounded time on a frozen server, instead of waiting it out. The
    filesystems exist before the freeze, as they do in a run (creating an S3 client waits for the
    calls in flight on the others)."""
    from ray.train import RunConfig

    write_json(s3fs(s3), "bucket/ray_results/run/.validate_storage_marker", {})  # a run directory
    run_dir = driver._RunDir(RunConfig(name="run", storage_path=s3_uri(s3)))
    run_dir.resolve()
    users_fs, _ = pafs.FileSystem.from_uri(s3_uri(s3))
    calls = {
        "driver": lambda: write_json(*run_dir.join(REQUESTS, "x.json"), {"id": "x"}),
        "client": lambda: request_save("bucket/ray_results/run", filesystem=users_fs),
    }
    took: dict[str, tuple[float, BaseException | None]] = {}

    def call(name):
        t0 = time.monotonic()
        try:
            calls[name]()
            took[name] = (time.monotonic() - t0, None)
        except Exception as exc:
            took[name] = (time.monotonic() - t0, exc)

    with frozen(s3):
        threads = [threading.Thread(target=call, args=(name,), daemon=True) for name in calls]
        for t in threads:
            t.start()
        deadline = time.monotonic() + BOUNDED_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert set(took) == set(calls), f"still waiting after {BOUNDED_S:g} s: {set(calls) - set(took)}"
    assert isinstance(took["driver"][1], OSError), took
    assert isinstance(took["client"][1], RunNotFoundError), took
    print({name: round(seconds, 1) for name, (seconds, _) in took.items()})


@pytest.mark.ray
def test_second_sigint_exits_within_5_s_while_the_object_store_is_frozen(s3, tmp_path):
    """Ctrl+C with the run's object store frozen, Ctrl+C again 2 s later: the driver is gone within
    5 s of the second, with SIGINT's status (not held up at interpreter exit by a stuck S3 call)."""
    ready = tmp_path / "ready"
    env = dict(os.environ, RAY_TRAIN_COLLECTIVE_TIMEOUT_S="120", PYTHONUNBUFFERED="1")
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "interrupt_driver.py"), s3_uri(s3), "run", str(tmp_path / "out"),
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
