"""An HTTP/1.1 proxy on loopback for S3 tests: forwards every request to a real S3 server (moto) and
can fail, hold or lose the answer of the Nth request that matches a method, a path and a header.

pyarrow's S3 client (the AWS SDK over curl) talks plain HTTP/1.1 with keep-alive to
``endpoint_override=proxy.endpoint`` with ``scheme="http"``, path-style: ``/bucket/key``. The proxy
parses each request (request line, headers, a ``Content-Length`` or ``Transfer-Encoding: chunked``
body), decides what to do with it, forwards it over its own keep-alive connection to the upstream
server and streams the answer back (``Content-Length``, chunked, or up to the close; a HEAD answer
has no body)::

    proxy = HttpFaultProxy(upstream=("127.0.0.1", moto_port)).start()
    fs = pafs.S3FileSystem(endpoint_override=proxy.endpoint, scheme="http", ...)
    rule = proxy.add_rule(method="DELETE", path=r"^/bucket/run/dyncheck\\.save$", action="hold")
    ...                      # start the call that sends that DELETE, in a thread
    held = rule.wait(10)     # the DELETE is held (rule.reached is set): it has not reached the server
    ...                      # act while it is held
    rule.release()           # now it is forwarded (rule.drop() resets its connection instead)
    held.wait()              # its final outcome: 204
    proxy.calls()            # [("PUT", "/bucket/a", 200), ("DELETE", "/bucket/run/dyncheck.save", 204), ...]
    proxy.stop()

Actions (see :meth:`HttpFaultProxy.add_rule`):

``"fail"``
    the request is not forwarded; the client's connection is reset, as by a network cut.
``"error503"``
    the request is not forwarded; the proxy answers ``503 SlowDown`` (an S3 error document).
``"hold"``
    the request is kept until :meth:`Rule.release` (then forwarded) or :meth:`Rule.drop` (then the
    connection is reset); :attr:`Rule.reached` is set when it arrives.
``"fail_after"``
    the request is forwarded and the server answers it, but the answer is lost: the client's
    connection is reset. The request LANDED, the client sees an error (a timed-out DELETE that
    still deleted).

Counting: pyarrow's S3 client retries a request that failed (a reset connection, a 503, a
timeout) with its retry strategy, and every retry is a new request for the rules (it carries
``amz-sdk-request: attempt=N+1``): a ``nth=1`` ``"fail"`` rule fails the first attempt and the
retry goes through. With ``AwsStandardS3RetryStrategy(max_attempts=1)`` nothing is retried; with
more attempts, ``times=`` fails the retries as well. Below the SDK, curl may re-send an attempt by
itself, on a new connection, when a kept-alive connection breaks before any answer: such a copy (the
same ``amz-sdk-invocation-id`` and ``amz-sdk-request``, see :attr:`Exchange.identity`) is the same
request to the rules and meets the same fate; the log lists it again.

Holding: curl gives a request up when no byte arrives for ``request_timeout`` seconds (its
low-speed limit: the S3FileSystem's ``request_timeout`` applies on Linux too, 3 s when not set), so a
hold longer than that times the client out (``curlCode: 28``), and a release after it forwards a
request nobody waits for any more: it lands, and its outcome is ``"lost"`` -- a timed-out request
that still lands. A test that holds longer gives its filesystem a longer ``request_timeout``.

What pyarrow sends (observed with pyarrow 26 against moto):

* ``open_output_stream`` is a multipart upload, even for a few bytes: ``POST /bucket/key?uploads``,
  then ``PUT /bucket/key?partNumber=N&uploadId=...`` for each part, then ``POST
  /bucket/key?uploadId=...`` (CompleteMultipartUpload: the object appears). A part is sent with
  ``Expect: 100-continue``, ``Transfer-Encoding: chunked``, ``Content-Encoding: aws-chunked``,
  ``x-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER`` and a checksum trailer
  (``x-amz-trailer: x-amz-checksum-crc64nvme``). With ``allow_delayed_open=True`` a small stream is
  one PutObject, ``PUT /bucket/key`` framed the same way. ``create_dir`` is ``PUT /bucket/dir/``
  with ``Content-Length: 0``.
* CopyObject (the first half of ``fs.move``): ``PUT /bucket/dest`` with an empty body and a header
  ``x-amz-copy-source: bucket/src`` -- match it with ``header=("x-amz-copy-source", ".")``.
* DeleteObject: ``DELETE /bucket/key`` (204); ``delete_dir_contents`` is one ``POST /bucket?delete``.
* HeadObject: ``HEAD /bucket/key`` (``get_file_info`` of a file; a missing key: 404, then a LIST
  for ``key/``); GetObject: ``GET /bucket/key`` with ``Range: bytes=...`` (206).
* ListObjectsV2: ``GET /bucket?list-type=2&max-keys=1000&prefix=dir%2F`` (plus ``delimiter=%2F``
  when not recursive): the path is ``/bucket``, the rest is :attr:`Exchange.query`.

The proxy answers ``Expect: 100-continue`` itself and does not pass that header on.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

ACTIONS = ("fail", "error503", "hold", "fail_after")

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class _Closed(Exception):
    """The peer closed its connection (or it broke) in the middle of a message."""


class _Reader:
    """Buffered reads from a socket: lines and exact byte counts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError as e:
            raise _Closed(str(e)) from None
        if not data:
            raise _Closed("end of stream")
        self.buf += data

    def at_eof(self) -> bool:
        """True when the peer closed before sending anything more (between two messages)."""
        if self.buf:
            return False
        try:
            self._fill()
        except _Closed:
            return True
        return False

    def line(self, limit: int = 65536) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                out = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return out
            if len(self.buf) > limit:
                raise _Closed("line too long")
            self._fill()

    def some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes."""
        if not self.buf:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> Iterable[bytes]:
        """Everything up to the close."""
        if self.buf:
            yield bytes(self.buf)
            self.buf.clear()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            yield data


def _read_head(reader: _Reader) -> tuple[bytes, list[tuple[str, str]]]:
    """The start line and the header fields of a message."""
    start = reader.line()
    while start in (b"\r\n", b"\n"):  # tolerated before a request line (RFC 9112 2.2)
        start = reader.line()
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.line()
        if line in (b"\r\n", b"\n"):
            return start.rstrip(b"\r\n"), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _head_bytes(start: bytes, headers: list[tuple[str, str]]) -> bytes:
    lines = [start] + [f"{k}: {v}".encode("latin-1") for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _body(reader: _Reader, headers: list[tuple[str, str]], *, until_close: bool) -> Iterable[bytes]:
    """The body of a message as it is on the wire (chunk framing and trailers kept)."""
    if "chunked" in (_header(headers, "Transfer-Encoding") or "").lower():
        while True:
            size_line = reader.line()
            yield size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailer fields, then the empty line
                    line = reader.line()
                    yield line
                    if line in (b"\r\n", b"\n"):
                        return
            left = size + 2  # the data and its CRLF
            while left:
                data = reader.some(min(left, 65536))
                left -= len(data)
                yield data
    length = _header(headers, "Content-Length")
    if length is not None:
        left = int(length)
        while left:
            data = reader.some(min(left, 65536))
            left -= len(data)
            yield data
    elif until_close:
        yield from reader.rest()


def _reset(sock: socket.socket | None) -> None:
    """Close with a TCP reset (what a client sees when the network drops the connection)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _quietly(sock.close)


def _gone(sock: socket.socket) -> bool:
    """True when the peer has closed the connection (or reset it)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    _quietly(sock.shutdown, socket.SHUT_RDWR)
    _quietly(sock.close)


def _quietly(fn: Any, *args: Any) -> None:
    """A socket call whose failure (the peer already gone) changes nothing."""
    try:
        fn(*args)
    except OSError:
        pass


@dataclass
class Exchange:
    """One request the proxy received, and what became of it.

    ``outcome`` is the status the client got (an ``int``), or: ``"held"`` (held now), ``"failed"``
    (not forwarded, connection reset: a ``"fail"`` rule or a :meth:`HttpFaultProxy.cut`),
    ``"dropped"`` (held, then dropped), ``"lost"`` (forwarded and answered with ``upstream_status``,
    but the answer did not reach the client: a ``"fail_after"`` rule, or the client had gone),
    ``"error"`` (the upstream server could not be reached or broke off), ``"aborted"`` (the client
    went away in the middle of its request), or ``None`` while in flight. :attr:`done` is set
    with the final outcome. ``forwarded`` says whether the request reached the upstream server."""

    method: str
    path: str  # percent-decoded, without the query
    query: str  # the raw query string ('' when none)
    headers: list[tuple[str, str]]
    body_bytes: int = 0
    outcome: int | str | None = None
    forwarded: bool = False
    upstream_status: int | None = None
    rule: Rule | None = field(default=None, repr=False)  # the rule that acted on it
    done: threading.Event = field(default_factory=threading.Event, repr=False)  # set with the final outcome

    def header(self, name: str) -> str | None:
        return _header(self.headers, name)

    @property
    def identity(self) -> tuple[str, str] | None:
        """``(amz-sdk-invocation-id, amz-sdk-request)``: the AWS SDK's name for one attempt of one
        call (a retry has the same invocation id and ``attempt=N+1``). None without those headers."""
        invocation, attempt = self.header("amz-sdk-invocation-id"), self.header("amz-sdk-request")
        return (invocation, attempt) if invocation and attempt else None

    def _finish(self, outcome: int | str) -> None:
        self.outcome = outcome
        self.done.set()

    def wait(self, timeout: float = 10.0) -> int | str | None:
        """The final outcome, waiting up to ``timeout`` seconds for it (e.g. after a release)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.method} {self.path} still {self.outcome!r} after {timeout} s")
        return self.outcome

    def as_tuple(self) -> tuple[str, str, int | str | None]:
        return (self.method, self.path, self.outcome)


@dataclass(eq=False)
class Rule:
    """Acts on the ``nth`` .. ``nth + times - 1``-th requests that match (all of them from the
    ``nth`` on when ``times`` is None). Made by :meth:`HttpFaultProxy.add_rule`."""

    action: str
    method: str | None = None
    path: re.Pattern[str] | None = None
    query: re.Pattern[str] | None = None
    header: tuple[str, re.Pattern[str]] | None = None
    nth: int = 1
    times: int | None = 1
    seen: int = 0  # matching requests so far (counted while the rule is active)
    hits: list[Exchange] = field(default_factory=list, repr=False)  # the requests it acted on
    reached: threading.Event = field(default_factory=threading.Event)  # set when it first acted
    active: bool = True
    _gate: threading.Event = field(default_factory=threading.Event, repr=False)
    _decision: str = field(default="", repr=False)
    _fates: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)

    def matches(self, ex: Exchange) -> bool:
        if self.method is not None and ex.method != self.method:
            return False
        if self.path is not None and not self.path.search(ex.path):
            return False
        if self.query is not None and not self.query.search(ex.query):
            return False
        if self.header is not None:
            value = ex.header(self.header[0])
            if value is None or not self.header[1].search(value):
                return False
        return True

    def _count(self, ex: Exchange) -> bool:
        """Counts one matching request; True when this one is to be acted on. A copy of a request
        counted already (the same :attr:`Exchange.identity`) is not counted again: it meets the
        first one's fate."""
        key = ex.identity
        if key is not None and key in self._fates:
            return self._fates[key]
        self.seen += 1
        acts = self.seen >= self.nth and (self.times is None or self.seen < self.nth + self.times)
        if key is not None:
            self._fates[key] = acts
        return acts

    def release(self) -> None:
        """Forward the requests this ``"hold"`` rule holds (now and later)."""
        self._decision = "release"
        self._gate.set()

    def drop(self) -> None:
        """Reset the connections of the requests this ``"hold"`` rule holds (now and later)."""
        self._decision = "drop"
        self._gate.set()

    def remove(self) -> None:
        """Stop matching (requests held already stay held until released or dropped)."""
        self.active = False

    def wait(self, timeout: float = 10.0) -> Exchange:
        """The first request the rule acted on, waiting up to ``timeout`` seconds for it."""
        if not self.reached.wait(timeout):
            raise TimeoutError(f"{self} acted on no request within {timeout} s")
        return self.hits[0]


class HttpFaultProxy:
    """An HTTP/1.1 proxy on ``127.0.0.1`` in front of ``upstream`` with fault rules; see the module
    docstring. Each client connection gets its own keep-alive connection to the upstream server."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        self.upstream = upstream
        self.host = host
        self.timeout = timeout  # for reads from the upstream server, and idle client connections
        self.port = 0
        self.log: list[Exchange] = []
        self.rules: list[Rule] = []
        self._cut = False
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._srv: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    @property
    def endpoint(self) -> str:
        """``host:port`` for ``S3FileSystem(endpoint_override=..., scheme="http")``."""
        return f"{self.host}:{self.port}"

    def start(self) -> HttpFaultProxy:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.host, 0))
        srv.listen(64)
        self._srv = srv
        self.port = srv.getsockname()[1]
        t = threading.Thread(target=self._accept, name="http-proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __enter__(self) -> HttpFaultProxy:
        return self.start() if self._srv is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def add_rule(self, *, action: str, method: str | None = None, path: str | None = None,
                 query: str | None = None, header: tuple[str, str] | None = None, nth: int = 1,
                 times: int | None = 1) -> Rule:
        """A rule for requests whose ``method`` is the one given, whose percent-decoded path (without
        the query) matches the regex ``path`` (``re.search``), whose raw query string matches
        ``query``, and that carry the header ``header[0]`` with a value matching ``header[1]``; an
        argument left None matches anything. It acts (``action``, one of :data:`ACTIONS`) on the
        ``nth`` matching request and the ``times - 1`` after it (``times=None``: all from the
        ``nth`` on). Every rule counts every request it matches; when two rules would act on the same
        request, the one added first acts. Requests failed by :meth:`cut` are not counted."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
        if nth < 1 or (times is not None and times < 1):
            raise ValueError("nth and times count from 1")
        rule = Rule(action=action, method=method.upper() if method else None,
                    path=re.compile(path) if path is not None else None,
                    query=re.compile(query) if query is not None else None,
                    header=(header[0], re.compile(header[1])) if header is not None else None,
                    nth=nth, times=times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        """Remove every rule, releasing what a ``"hold"`` rule holds."""
        with self._lock:
            rules, self.rules = self.rules, []
        for r in rules:
            r.remove()
            if not r._gate.is_set():
                r.release()

    def cut(self, down: bool = True) -> None:
        """A full outage while ``down``: every new request (on a new or a kept-alive connection) is
        failed with a connection reset, without being forwarded. ``cut(False)`` ends it."""
        self._cut = down

    def calls(self, method: str | None = None) -> list[tuple[str, str, int | str | None]]:
        """``(method, path, outcome)`` of every request so far (of one method if given), in order."""
        with self._lock:
            return [e.as_tuple() for e in self.log if method is None or e.method == method]

    def stop(self) -> None:
        """Stop accepting, drop what is held, and close every connection."""
        self._stopped.set()
        if self._srv is not None:
            _close(self._srv)
        with self._lock:
            rules = list(self.rules)
            socks = list(self._socks)
        for r in rules:
            if not r._gate.is_set():
                r.drop()
        for s in socks:
            _close(s)
        for t in list(self._threads):
            t.join(5)

    # -- the connections --------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._srv is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            with self._lock:
                self._socks.add(client)
                self._threads = [t for t in self._threads if t.is_alive()]
            t = threading.Thread(target=self._serve, args=(client,), name="http-proxy-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        up: socket.socket | None = None
        ex: Exchange | None = None
        try:
            client.settimeout(self.timeout)
            reader = _Reader(client)
            up_reader: _Reader | None = None
            while not self._stopped.is_set():
                if reader.at_eof():
                    return
                start, headers = _read_head(reader)
                method, target, _version = start.decode("latin-1").split(" ", 2)
                raw_path, _, query = target.partition("?")
                ex = Exchange(method=method.upper(), path=unquote(raw_path), query=query, headers=headers)
                with self._lock:
                    self.log.append(ex)
                    rule = None if self._cut else self._match(ex)
                if self._cut:
                    ex._finish("failed")
                    return _reset(client)
                action = rule.action if rule else None
                if action == "fail":
                    ex._finish("failed")
                    return _reset(client)

                # The body: a client that asked "Expect: 100-continue" is told to send it now (the
                # header is not passed on, so the upstream server answers once).
                expect = _header(headers, "Expect")
                if expect and expect.lower() == "100-continue":
                    headers = [(k, v) for k, v in headers if k.lower() != "expect"]
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = b"".join(_body(reader, headers, until_close=False))
                ex.body_bytes = len(body)
                keep_alive = (_header(headers, "Connection") or "").lower() != "close"

                if action == "error503":
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(_SLOW_DOWN) + _SLOW_DOWN)
                    ex._finish(503)
                    if not keep_alive:
                        return
                    continue
                if action == "hold" and rule is not None:
                    ex.outcome = "held"
                    rule.reached.set()
                    while not rule._gate.wait(0.1):
                        if self._stopped.is_set():
                            break
                    if rule._decision != "release":
                        ex._finish("dropped")
                        return _reset(client)

                # Forward, over the kept-alive upstream connection (a new one if it went stale).
                request = _head_bytes(start, headers) + body
                for attempt in (0, 1):
                    fresh = up is None
                    try:
                        if up is None:
                            up = socket.create_connection(self.upstream, timeout=self.timeout)
                            with self._lock:
                                self._socks.add(up)
                            up_reader = _Reader(up)
                        assert up_reader is not None
                        up.sendall(request)
                        ex.forwarded = True
                        status_line, rheaders = _read_head(up_reader)
                        while status_line.split(b" ")[1:2] == [b"100"]:  # interim answers
                            status_line, rheaders = _read_head(up_reader)
                        break
                    except (OSError, _Closed, IndexError):
                        _close(up)
                        up, up_reader = None, None
                        if fresh or attempt:
                            ex._finish("error")
                            return _reset(client)
                assert up is not None and up_reader is not None
                status = int(status_line.split(b" ")[1])
                ex.upstream_status = status
                no_body = ex.method == "HEAD" or status in (204, 304) or 100 <= status < 200
                framed = no_body or _header(rheaders, "Content-Length") is not None or \
                    "chunked" in (_header(rheaders, "Transfer-Encoding") or "").lower()
                up_keep = framed and (_header(rheaders, "Connection") or "").lower() != "close"
                body_parts = iter(()) if no_body else _body(up_reader, rheaders, until_close=not framed)

                if action == "fail_after":  # the server has answered: the request has landed
                    ex._finish("lost")
                    return _reset(client)
                if _gone(client):  # e.g. it gave up on a held request
                    ex._finish("lost")
                    return _reset(client)
                ex.outcome = status  # before the client has it, so that a test reading the log sees it
                try:
                    client.sendall(_head_bytes(status_line, rheaders))
                    for part in body_parts:
                        client.sendall(part)
                except _Closed:  # the upstream server broke off in the middle of the body
                    ex._finish("error")
                    return _reset(client)
                except OSError:  # the client has gone
                    ex._finish("lost")
                    return _reset(client)
                ex.done.set()
                if not (keep_alive and up_keep):
                    return
        except (_Closed, OSError, ValueError):
            if ex is not None and not ex.done.is_set():
                ex._finish("aborted")  # the client went away, or sent what is not HTTP/1.1
            return
        finally:
            _close(client)
            _close(up)
            with self._lock:
                self._socks.discard(client)
                if up is not None:
                    self._socks.discard(up)

    def _match(self, ex: Exchange) -> Rule | None:
        """The rule that acts on ``ex`` (every active rule that matches counts it); under the lock."""
        acting = None
        for rule in self.rules:
            if rule.active and rule.matches(ex) and rule._count(ex) and acting is None:
                acting = rule
        if acting is not None:
            ex.rule = acting
            acting.hits.append(ex)
            if acting.action != "hold":
                acting.reached.set()
        return acting
