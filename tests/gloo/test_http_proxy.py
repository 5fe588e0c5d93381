"""The HTTP fault proxy in front of a real S3 server (moto on loopback), driven by pyarrow's S3 client:
requests pass through unchanged, and a rule fails, holds or loses the answer of the request it names."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

import pyarrow.fs as pafs
import pytest
from http_proxy import HttpFaultProxy


@pytest.fixture
def prefix():
    """A directory of its own in the bucket for each test."""
    return f"bucket/{uuid.uuid4().hex[:8]}"


def s3fs(proxy: HttpFaultProxy, attempts: int = 1, request_timeout: float = 10) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=proxy.endpoint, scheme="http", access_key="testing",
                             secret_key="testing", region="us-east-1", request_timeout=request_timeout,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))


def write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def key_re(path: str) -> str:
    """The proxy's path pattern for one object."""
    return f"^/{re.escape(path)}$"


def in_thread(fn, *args):
    """Runs ``fn(*args)`` in a thread; the returned ``result`` dict gets ``"error"`` or ``"value"``."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001  (handed to the test)
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    result["thread"] = t
    return result


def test_get_put_list_move_delete_pass_through_and_are_logged(proxy, prefix):
    fs = s3fs(proxy)
    write(fs, f"{prefix}/a", b"hello")
    assert read(fs, f"{prefix}/a") == b"hello"
    listed = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    assert [i.path for i in listed] == [f"{prefix}/a"]
    fs.move(f"{prefix}/a", f"{prefix}/b")
    assert read(fs, f"{prefix}/b") == b"hello" and not exists(fs, f"{prefix}/a")
    fs.delete_file(f"{prefix}/b")
    assert not exists(fs, f"{prefix}/b")
    big = os.urandom(6 << 20)  # a chunked upload of many chunks, a long Content-Length answer
    write(fs, f"{prefix}/big", big)
    assert read(fs, f"{prefix}/big") == big

    a, b = f"/{prefix}/a", f"/{prefix}/b"
    log = [e for e in proxy.log if e.path in (a, b)]
    assert all(e.done.is_set() and e.forwarded for e in proxy.log)
    # What pyarrow sends: a stream is a multipart upload whose part is an aws-chunked body.
    part = next(e for e in log if e.method == "PUT" and e.path == a)
    assert "partNumber=1" in part.query and part.outcome == 200
    assert part.header("Transfer-Encoding") == "chunked" and part.header("Content-Encoding") == "aws-chunked"
    assert ("POST", a, 200) in [e.as_tuple() for e in log]
    # A range GET, a LIST on the bucket with the prefix in the query.
    assert any(e.method == "GET" and e.path == a and e.header("Range") and e.outcome == 206 for e in log)
    lists = [e for e in proxy.log if e.method == "GET" and e.path == "/bucket" and "list-type=2" in e.query]
    assert any(f"prefix={prefix.split('/')[1]}" in e.query for e in lists)
    # move: CopyObject (a PUT naming its source in a header), then DeleteObject.
    copy = next(e for e in log if e.method == "PUT" and e.path == b)
    assert copy.header("x-amz-copy-source") == prefix + "/a" and copy.body_bytes == 0 and copy.outcome == 200
    deletes = [e.as_tuple() for e in log if e.method == "DELETE"]
    assert deletes == [("DELETE", a, 204), ("DELETE", b, 204)]
    assert ("HEAD", b, 404) in [e.as_tuple() for e in log]


def test_fail_rule_on_the_delete_raises_and_the_object_stays(proxy, prefix):
    fs = s3fs(proxy)
    write(fs, f"{prefix}/a", b"x")
    rule = proxy.add_rule(method="DELETE", path=key_re(f"{prefix}/a"), action="fail")
    with pytest.raises(OSError, match="DeleteObject"):
        fs.delete_file(f"{prefix}/a")
    assert rule.reached.is_set() and [e.as_tuple() for e in rule.hits] == [("DELETE", f"/{prefix}/a", "failed")]
    assert not rule.hits[0].forwarded
    assert exists(fs, f"{prefix}/a")
    fs.delete_file(f"{prefix}/a")  # only the 1st matching request fails
    assert not exists(fs, f"{prefix}/a")


def test_fail_after_on_the_delete_raises_but_the_delete_landed(proxy, prefix):
    fs = s3fs(proxy)
    write(fs, f"{prefix}/a", b"x")
    rule = proxy.add_rule(method="DELETE", path=key_re(f"{prefix}/a"), action="fail_after")
    with pytest.raises(OSError, match="DeleteObject"):
        fs.delete_file(f"{prefix}/a")
    (ex,) = rule.hits
    assert ex.forwarded and ex.upstream_status == 204 and ex.outcome == "lost"
    assert not exists(fs, f"{prefix}/a")


def test_error503_answers_slow_down(proxy, prefix):
    fs = s3fs(proxy)
    write(fs, f"{prefix}/a", b"x")
    proxy.add_rule(method="DELETE", path=key_re(f"{prefix}/a"), action="error503")
    with pytest.raises(OSError, match="SLOW_DOWN"):
        fs.delete_file(f"{prefix}/a")
    assert exists(fs, f"{prefix}/a")
    assert proxy.calls("DELETE") == [("DELETE", f"/{prefix}/a", 503)]


def test_a_retry_is_the_next_request(proxy, prefix):
    """With retries, the SDK sends the failed request again (attempt=2): a new request to the rules."""
    fs = s3fs(proxy, attempts=3)
    for name in "ab":
        write(fs, f"{prefix}/{name}", b"x")
    proxy.add_rule(method="DELETE", path=key_re(f"{prefix}/a"), action="fail")
    fs.delete_file(f"{prefix}/a")  # the retry goes through
    first, retry = (e for e in proxy.log if e.method == "DELETE")
    assert (first.outcome, retry.outcome) == ("failed", 204)
    assert first.header("amz-sdk-request") == "attempt=1" and retry.header("amz-sdk-request") == "attempt=2"
    assert first.header("amz-sdk-invocation-id") == retry.header("amz-sdk-invocation-id")

    proxy.add_rule(method="DELETE", path=key_re(f"{prefix}/b"), action="fail", times=None)  # every attempt
    with pytest.raises(OSError):
        fs.delete_file(f"{prefix}/b")
    assert [o for m, p, o in proxy.calls("DELETE") if p.endswith("/b")] == ["failed"] * 3
    assert exists(fs, f"{prefix}/b")


def test_hold_the_delete_of_a_move_and_it_deletes_the_object_written_meanwhile(proxy, prefix):
    """fs.move is CopyObject then DeleteObject, two requests: an object written at the source between
    them is deleted by the move."""
    fs = s3fs(proxy)
    src, dst = f"{prefix}/a", f"{prefix}/b"
    write(fs, src, b"old")
    rule = proxy.add_rule(method="DELETE", path=key_re(src), action="hold")
    moving = in_thread(fs.move, src, dst)
    held = rule.wait(10)
    assert held.outcome == "held" and not held.forwarded
    assert read(fs, dst) == b"old" and read(fs, src) == b"old"  # copied, not yet deleted
    write(fs, src, b"new")  # someone writes the source again during the cut
    assert read(fs, src) == b"new"
    rule.release()
    moving["thread"].join(10)
    assert "error" not in moving and held.wait() == 204
    assert not exists(fs, src)  # the new object is gone with the move's DELETE
    assert read(fs, dst) == b"old"


def test_hold_then_drop_fails_the_request_unforwarded(proxy, prefix):
    fs = s3fs(proxy)
    write(fs, f"{prefix}/a", b"x")
    rule = proxy.add_rule(method="DELETE", path=key_re(f"{prefix}/a"), action="hold")
    deleting = in_thread(fs.delete_file, f"{prefix}/a")
    held = rule.wait(10)
    rule.drop()
    deleting["thread"].join(10)
    assert isinstance(deleting.get("error"), OSError)
    assert held.wait() == "dropped" and not held.forwarded
    assert exists(fs, f"{prefix}/a")


def test_a_request_held_past_the_client_timeout_still_lands(proxy, prefix):
    fs = s3fs(proxy, request_timeout=1)
    write(fs, f"{prefix}/a", b"x")
    rule = proxy.add_rule(method="DELETE", path=key_re(f"{prefix}/a"), action="hold")
    deleting = in_thread(fs.delete_file, f"{prefix}/a")
    held = rule.wait(10)
    deleting["thread"].join(10)
    assert "curlCode: 28" in str(deleting.get("error"))  # the client gave up
    assert exists(fs, f"{prefix}/a")
    rule.release()
    assert held.wait() == "lost" and held.upstream_status == 204
    assert not exists(fs, f"{prefix}/a")


def test_a_header_rule_tells_copy_object_from_put_object(proxy, prefix):
    fs = s3fs(proxy)
    src, dst = f"{prefix}/a", f"{prefix}/b"
    write(fs, src, b"x")
    rule = proxy.add_rule(method="PUT", path=key_re(dst), header=("x-amz-copy-source", "."), action="fail")
    write(fs, dst, b"written")  # PutObject (its upload part) to the same key: not matched
    assert rule.seen == 0
    with pytest.raises(OSError, match="CopyObject"):
        fs.move(src, dst)
    assert rule.seen == 1 and rule.hits[0].header("x-amz-copy-source") == src
    assert read(fs, src) == b"x" and read(fs, dst) == b"written"  # no copy, no delete
    assert not [c for c in proxy.calls("DELETE") if c[1] == f"/{src}"]


def test_cut_fails_every_request_fast_and_uncut_restores_service(proxy, prefix):
    fs = s3fs(proxy)
    write(fs, f"{prefix}/a", b"x")
    proxy.cut(True)
    t0 = time.monotonic()
    for call in (lambda: read(fs, f"{prefix}/a"), lambda: write(fs, f"{prefix}/b", b"y"),
                 lambda: fs.get_file_info(pafs.FileSelector(prefix))):
        with pytest.raises(OSError):
            call()
    assert time.monotonic() - t0 < 2  # connection resets, not timeouts
    failed = [e for e in proxy.log if e.outcome == "failed"]
    assert failed and not any(e.forwarded for e in failed)
    proxy.cut(False)
    assert read(fs, f"{prefix}/a") == b"x"
    write(fs, f"{prefix}/b", b"y")
    assert read(fs, f"{prefix}/b") == b"y"
