"""Shared fixtures: one real Ray instance per test module that needs it; env and handlers restored; an S3
server on loopback per module, with an HTTP-aware fault proxy in front of it per test; a temporary
directory of its own for a test that counts what is left in it.

The tiers are folders: ``unit`` (one process: no Ray, no process groups, no subprocesses), ``gloo``
(real processes: gloo process groups, CLIs, the S3 server), ``ray`` (a local Ray) and ``cluster``
(several Ray nodes). Each test gets its folder's markers here. The helper modules live in ``harness``
and import as top-level names (Ray workers get some of them by value, subprocesses by path)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(TESTS, "harness")
if HARNESS not in sys.path:
    sys.path.insert(0, HARNESS)

# The markers each tier's folder gives its tests (registered in pyproject.toml).
TIER_MARKERS = {"gloo": ("gloo",), "ray": ("ray",), "cluster": ("ray", "cluster")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = os.path.relpath(str(item.path), TESTS)
        folder = rel.split(os.sep, 1)[0] if os.sep in rel else ""
        for name in TIER_MARKERS.get(folder, ()):
            item.add_marker(name)


@pytest.fixture(autouse=True)
def _restore_env_and_signals():
    env = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    os.environ.clear()
    os.environ.update(env)
    for s, h in handlers.items():
        if signal.getsignal(s) is not h and h is not None:
            signal.signal(s, h)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for this module. A rank that skips a collective fails the test instead of hanging."""
    import ray
    import ray_by_value

    saved = dict(os.environ)
    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = "120"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray_by_value.register()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def moto_port():
    """moto's S3 server on 127.0.0.1 with a bucket named ``bucket``, for this module; its port."""
    from s3_local import s3_server  # the S3 server on loopback, shared with the benchmarks

    with s3_server() as (port, _):
        yield port


@pytest.fixture
def proxy(moto_port):
    """An :class:`http_proxy.HttpFaultProxy` in front of the module's S3 server, for this test."""
    from http_proxy import HttpFaultProxy

    with HttpFaultProxy(upstream=("127.0.0.1", moto_port)) as p:
        yield p


@pytest.fixture
def tmpdir_of_our_own(tmp_path, monkeypatch):
    """A fresh, empty temporary directory for this test (``tempfile`` and child processes)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp
