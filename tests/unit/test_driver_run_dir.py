"""The driver's run directory on object storage: resolving it touches no network, and its filesystem
gives up in bounded time."""

from __future__ import annotations

import pyarrow.fs as pafs
from s3_local import s3_uri

from ray_dyncheck._requests.files import CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S
from ray_dyncheck._requests.rundir import RunDir


def timeouts(fs: pafs.FileSystem) -> tuple[float, float]:
    _, (options,) = fs.__reduce__()
    return options["connect_timeout"], options["request_timeout"]


def test_driver_run_dir_on_s3_is_bounded():
    from ray.train import RunConfig

    uri = s3_uri(1)  # nothing listens there: resolving must not touch the network
    fs, path = RunDir(RunConfig(name="run", storage_path=uri)).resolve()
    assert (timeouts(fs), path) == ((CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S), "bucket/ray_results/run")
    given = pafs.S3FileSystem(endpoint_override="127.0.0.1:1", scheme="http", region="us-east-1")
    fs, path = RunDir(RunConfig(name="run", storage_path="bucket/x", storage_filesystem=given)).resolve()
    assert (timeouts(fs), path) == ((CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S), "bucket/x/run")
    assert fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:1"
    local = pafs.LocalFileSystem()
    assert RunDir(RunConfig(name="run", storage_path="/tmp/x", storage_filesystem=local)).resolve()[0] is local

