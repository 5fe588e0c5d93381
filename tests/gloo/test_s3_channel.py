"""The request channel on a real S3 server (moto on loopback) behind an HTTP-aware proxy: the link is
cut at each storage request of a claim and of a retirement, and a new trigger is written during the
cut. Every request is served exactly once; no receipt is written twice.

No Ray: the channel runs as rank 0's poller would run it, on a bounded S3 filesystem (3 attempts).
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pyarrow.fs as pafs
import pytest
from http_proxy import HttpFaultProxy

from ray_dyncheck._requests.channel import RequestChannel
from ray_dyncheck._requests.files import RUN_MARKER, bounded


def s3(endpoint: str) -> pafs.FileSystem:
    return bounded(pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                                     access_key="testing", secret_key="testing"))


def touch(fs: pafs.FileSystem, path: str, after: float = 0.0) -> float:
    """Write an empty object, in a later second of the store's clock than ``after`` (S3 dates to the
    second: two writes within one second are one version). Returns its modification time."""
    while time.time() < int(after) + 1.05:
        time.sleep(0.05)
    with fs.open_output_stream(path):
        pass
    return fs.get_file_info(path).mtime.timestamp()


def receipts(fs: pafs.FileSystem, run: str) -> dict[str, dict]:
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(f"{run}/.dyncheck/receipts", allow_not_found=True)):
        with fs.open_input_stream(info.path) as f:
            out[info.base_name[:-5]] = json.loads(f.read())
    return out


class Served:
    """Drives a channel as rank 0's poller would: poll, then retire each claim with an ``ok`` receipt;
    a storage error is retried at the next pass. Keeps every request it was handed."""

    def __init__(self, channel: RequestChannel) -> None:
        self.channel, self.served, self.pending = channel, [], []

    def poll(self) -> None:
        try:
            found = self.channel.poll()
        except OSError:
            return
        self.served += found
        self.pending += found

    def retire(self) -> None:
        left = []
        for req in self.pending:
            try:
                self.channel.retire([req], {"status": "ok", "step": 1})
            except OSError:
                left.append(req)
        self.pending = left

    def settle(self, passes: int = 4) -> None:
        for _ in range(passes):
            self.poll()
            self.retire()


def _start(fs: pafs.FileSystem) -> str:
    run = f"bucket/run-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(f"{run}/{RUN_MARKER}"):
        pass
    return run


def _requests_of(proxy: HttpFaultProxy, fn) -> int:
    before = len(proxy.log)
    fn()
    return len(proxy.log) - before


@pytest.mark.timeout(300)
@pytest.mark.parametrize("source", ["trigger", "request"])
def test_a_cut_at_each_request_of_claim_and_retire_serves_everything_once(proxy, moto_port, source):
    direct = s3(f"127.0.0.1:{moto_port}")

    def first_request(run: str) -> float:
        if source == "trigger":
            return touch(direct, f"{run}/dyncheck.save")
        with direct.open_output_stream(f"{run}/.dyncheck/requests/r1.json") as f:
            f.write(b"{}")
        return time.time()

    # A dry run counts the storage requests of one claim and of its retirement.
    run = _start(direct)
    ch = RequestChannel(s3(proxy.endpoint), run, "dyncheck.save")
    ch.poll()  # the first poll reads the run's markers; the cases cut a claim and a retirement
    first_request(run)
    got: list = []
    claim = _requests_of(proxy, lambda: got.extend(ch.poll()))
    assert len(got) == 1
    retire = _requests_of(proxy, lambda: ch.retire(got, {"status": "ok", "step": 1}))
    assert claim >= 2 and retire >= 2, (claim, retire)
    print(f"\n{source}: a claim is {claim} storage requests, its retirement {retire}; each is cut in turn")

    for cut_at in range(claim + retire):
        run = _start(direct)
        served = Served(RequestChannel(s3(proxy.endpoint), run, "dyncheck.save"))
        served.poll()
        t1 = first_request(run)
        rule = proxy.add_rule(action="hold", nth=cut_at + 1)  # the request to cut, whatever it is
        worker = threading.Thread(target=lambda: (served.poll(), served.retire()))  # noqa: B023
        worker.start()
        rule.wait(timeout=30)
        touch(direct, f"{run}/dyncheck.save", after=t1)  # a new trigger, written during the cut
        proxy.cut(True)
        rule.drop()
        worker.join(60)
        assert not worker.is_alive()
        proxy.cut(False)
        rule.remove()
        served.settle()
        where = f"cut at request {cut_at} of {claim} + {retire}"
        ids = [r.id for r in served.served]
        assert len(ids) == len(set(ids)), f"{where}: a request served twice: {ids}"
        # The trigger's newest version is served: a version of it nobody claimed is never lost. (With
        # the cut before the first trigger was claimed, the second write replaced it: one request.)
        trig = direct.get_file_info(f"{run}/dyncheck.save")
        [record] = direct.get_file_info(pafs.FileSelector(f"{run}/.dyncheck/served"))
        with direct.open_input_stream(record.path) as f:
            assert json.loads(f.read())["identity"][1] == trig.mtime_ns, f"{where}: the newest trigger was lost"
        if source == "request":
            assert "r1" in ids and len(ids) == 2, f"{where}: served {ids}; the last requests: {proxy.calls()[-12:]}"
        else:
            assert len(ids) in (1, 2), f"{where}: served {ids}"
        got = receipts(direct, run)
        assert sorted(got) == sorted(ids) and all(r["status"] == "ok" for r in got.values()), (where, got)
        assert direct.get_file_info(pafs.FileSelector(f"{run}/.dyncheck/claimed", allow_not_found=True)) == []
        assert direct.get_file_info(pafs.FileSelector(f"{run}/.dyncheck/requests", allow_not_found=True)) == []
