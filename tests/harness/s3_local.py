"""An S3 server on loopback (moto's, in its own process), shared by the tests and the benchmarks; the
URIs and filesystems that reach it, and a way to freeze it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
          "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def s3_server(log: str | None = None) -> Iterator[tuple[int, str]]:
    """moto's S3 server on 127.0.0.1 with a bucket named ``bucket``; yields ``(port, log path)``. The
    log holds one line per HTTP request the server answered (to count storage requests); one made here
    is removed afterwards. Stopped by pid. ``S3_ENV`` is set in this process while it runs."""
    port = _free_port()
    own_log = log is None
    log = log or tempfile.mktemp(prefix="dyncheck-moto-", suffix=".log")
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    with open(log, "w") as out:
        server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    saved = dict(os.environ)
    os.environ.update(S3_ENV)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto server did not start (see {log})") from None
                time.sleep(0.2)
        s3fs(port, create=True).create_dir("bucket")
        yield port, log
    finally:
        server.terminate()
        server.wait(30)
        os.environ.clear()
        os.environ.update(saved)
        if own_log:
            os.remove(log)


def s3fs(port: int, create: bool = False) -> Any:
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                             allow_bucket_creation=create)


def s3_uri(port: int, prefix: str = "bucket/ray_results") -> str:
    return f"s3://{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


def count_requests(log: str) -> int:
    """HTTP requests the S3 server logged so far (werkzeug's access lines)."""
    with open(log, errors="replace") as f:
        return sum(1 for line in f if '" 2' in line or '" 3' in line or '" 4' in line)


@contextlib.contextmanager
def frozen(port: int):
    """The moto server on ``port`` stopped (SIGSTOP) inside the block; always continued afterwards."""
    import psutil

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
