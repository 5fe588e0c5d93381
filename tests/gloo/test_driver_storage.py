"""The driver and the client against an object store that stops answering: a real S3 server (moto,
its own process on loopback) frozen with SIGSTOP, so connections are accepted and requests are
never answered. Every storage call made by the driver or the client gives up in bounded time."""

from __future__ import annotations

import threading
import time

import pyarrow.fs as pafs
import pytest
from s3_local import frozen, s3_server, s3_uri, s3fs

from ray_dyncheck import request_save
from ray_dyncheck._requests.files import REQUESTS, write_json
from ray_dyncheck._requests.rundir import RunDir
from ray_dyncheck.errors import RunNotFoundError

# A frozen server fails one bounded call after RETRY_ATTEMPTS x REQUEST_TIMEOUT_S (~17 s measured); a
# request write makes two (the folder, then the object: ~32 s). Arrow's defaults: ~100 s and ~200 s.
BOUNDED_S = 60.0


@pytest.fixture
def s3():
    with s3_server() as (port, _):
        yield port


def test_storage_calls_give_up_in_bounded_time_on_a_frozen_server(s3):
    """The driver's request write and the client's request (given a filesystem the caller built with
    Arrow's defaults) both fail in bounded time on a frozen server, instead of waiting it out. The
    filesystems exist before the freeze, as they do in a run (creating an S3 client waits for the
    calls in flight on the others)."""
    from ray.train import RunConfig

    write_json(s3fs(s3), "bucket/ray_results/run/.validate_storage_marker", {})  # a run directory
    run_dir = RunDir(RunConfig(name="run", storage_path=s3_uri(s3)))
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
