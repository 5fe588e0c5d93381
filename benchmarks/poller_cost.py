"""What rank 0's request poller costs while nothing is asked: storage requests per poll and per day,
their price on S3, and the poller thread's CPU.

Storage requests: a ``RequestChannel`` on an idle run directory (a run marker, no trigger, no
request) polled N times after its first poll (which also rescans ``claimed/``), (a) on the local
disk, counting the ``pyarrow.fs`` calls through a counting proxy, and (b) in a bucket of the S3
server on loopback (moto), counting the HTTP requests in the server's log by kind (HEAD, GET, LIST =
a GET with ``list-type``). Per day at the default ``poll_interval_s``, and priced at AWS S3 Standard
(us-east-1) request prices, stated in the table.

CPU: a ``RequestPoller`` at its default interval in a fresh process whose main thread only sleeps,
one process per run directory (local, S3) and one without a poller (the floor), measured together
over the same window: CPU seconds (``time.process_time``, every thread of the process) per wall
second, sampled once per poll interval between polls. On S3 the same window's HTTP requests divided
by the poller's ``.polls`` check the per-poll count of a poller as it runs.

Only rank 0 polls (``WorkerCore`` starts the poller on rank 0 alone, cited in the table): the other
ranks make no storage requests for the channel, whatever the world size.

    python -m benchmarks.poller_cost [--mode smoke|quick|full] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
from s3_local import count_requests, s3_server, s3fs

import ray_dyncheck as rdc
from benchmarks._common import MODES, bootstrap_ci, machine, report, section_parser
from ray_dyncheck._requests.channel import RequestChannel
from ray_dyncheck._requests.poller import RequestPoller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# AWS S3 Standard, us-east-1, USD per 1,000 requests: GET, SELECT and all other requests (HEAD);
# PUT, COPY, POST, LIST; DELETE is free.
PRICE_PER_1000 = {"HEAD": 0.0004, "GET": 0.0004, "LIST": 0.005, "PUT": 0.005, "POST": 0.005, "DELETE": 0.0}
POLLS = {"smoke": 3, "quick": 30, "full": 100}
CPU_SECONDS = {"smoke": 1.0, "quick": 12.0, "full": 60.0}
_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')


class _Counting:
    """Delegates to a ``pyarrow.fs`` filesystem and counts the calls made through it, by name."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self._fs = fs
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def _kinds(lines: list[str], needle: str) -> Counter[str]:
    """HTTP requests in moto's access-log lines whose target holds ``needle`` (the run directory's
    name: a poller child may poll another directory of the same server meanwhile), by kind (a GET
    with ``list-type`` is a LIST)."""
    out: Counter[str] = Counter()
    for line in lines:
        m = _LINE.search(line)
        if m is None or m.group(3)[0] not in "234" or needle not in m.group(2):
            continue
        method, target = m.group(1), m.group(2)
        out["LIST" if method == "GET" and "list-type=" in target else method] += 1
    return out


def _log_lines(log: str) -> list[str]:
    with open(log, errors="replace") as f:
        return f.readlines()


def _per_poll(fs: pafs.FileSystem, run_dir: str, polls: int, log: str | None) -> dict[str, Any]:
    """Storage calls (and, with moto's ``log``, HTTP requests) of one first and ``polls`` idle polls."""
    rdc.LocalBackend(run_dir, filesystem=fs)  # the run marker, as a run has it
    counting = _Counting(fs)
    channel = RequestChannel(counting, run_dir, rdc.DynamicCheckpointConfig().trigger_file_path)  # type: ignore[arg-type]

    def measure(n: int) -> dict[str, Any]:
        counting.calls.clear()
        if log is not None:
            time.sleep(0.3)  # the server logs a request after answering it
            start = len(_log_lines(log))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            found = channel.poll()
            times.append(time.perf_counter() - t0)
            assert not found, f"an idle run directory had requests: {found}"
        out: dict[str, Any] = {"polls": n, "fs_calls": dict(counting.calls),
                               "fs_calls_per_poll": sum(counting.calls.values()) / n,
                               "poll_ms_median": statistics.median(times) * 1e3}
        if log is not None:
            time.sleep(0.3)
            kinds = _kinds(_log_lines(log)[start:], posixpath.basename(run_dir))
            out["http_requests"] = sum(kinds.values())
            out["http_per_poll"] = out["http_requests"] / n
            out["kinds_per_poll"] = {k: v / n for k, v in sorted(kinds.items())}
        return out

    return {"first": measure(1), "idle": measure(polls)}


def _day(kinds_per_poll: dict[str, float], interval_s: float) -> dict[str, Any]:
    per_day = 86400 / interval_s
    requests = {k: v * per_day for k, v in kinds_per_poll.items()}
    usd = sum(n * PRICE_PER_1000.get(k, 0.005) / 1000 for k, n in requests.items())
    return {"requests_per_day": sum(requests.values()), "by_kind_per_day": requests, "usd_per_day": usd,
            "usd_per_30_days": usd * 30}


# -- the CPU of a poller in a process of its own ------------------------------------------------


def _child(kind: str, run_dir: str, port: int | None, log: str | None) -> None:
    """A fresh process: a RequestPoller (unless ``kind`` is ``none``) while the main thread sleeps."""
    poller: RequestPoller | None = None
    interval = rdc.DynamicCheckpointConfig().poll_interval_s
    if kind != "none":
        fs = s3fs(int(port or 0)) if kind == "s3" else pafs.LocalFileSystem()
        rdc.LocalBackend(run_dir, filesystem=fs)
        channel = RequestChannel(fs, run_dir, rdc.DynamicCheckpointConfig().trigger_file_path)
        poller = RequestPoller(channel, interval).start()

    def between_polls() -> None:
        """Until half an interval after the next poll: no request in flight (none half-logged)."""
        if poller is None:
            return
        n = poller.polls
        while poller.polls == n:
            time.sleep(0.01)
        time.sleep(interval / 2)

    between_polls()
    print("ready", flush=True)
    _, seconds_text, align = sys.stdin.readline().split()
    seconds = float(seconds_text)
    if align == "1":
        between_polls()
    p0 = poller.polls if poller is not None else 0
    r0 = count_requests(log) if log is not None else 0
    # The window: the main thread only sleeps, one sample per poll interval.
    t0, c0 = time.perf_counter(), time.process_time()
    samples: list[float] = []
    t, c = t0, c0
    while t - t0 < seconds - 1e-3:
        time.sleep(interval)
        t1, c1 = time.perf_counter(), time.process_time()
        samples.append((c1 - c) / (t1 - t))
        t, c = t1, c1
    out: dict[str, Any] = {"kind": kind, "wall_s": t - t0, "cpu_s": c - c0, "samples": samples, "interval_s": interval}
    if align == "1":
        between_polls()  # so the last poll's requests are all logged (spent outside the CPU window)
    if poller is not None:
        out["polls"] = poller.polls - p0
        out["polls_per_s"] = out["polls"] / (time.perf_counter() - t0)  # both ends between polls when aligned
    if log is not None:
        out["http_requests"] = count_requests(log) - r0
    print("result " + json.dumps(out), flush=True)
    if poller is not None:
        poller.close()


def _cpu(kinds: list[str], seconds: float, root: str, port: int | None, log: str | None,
         before_go: Callable[[], None] | None = None, align: bool = True) -> dict[str, Any]:
    """One process per kind, started together; measured over the same window."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    procs = {}
    for kind in kinds:
        run_dir = "bucket/poller-cpu" if kind == "s3" else posixpath.join(root, f"cpu-{kind}")
        cmd = [sys.executable, "-m", "benchmarks.poller_cost", "--child", kind, "--run-dir", run_dir]
        if kind == "s3":
            cmd += ["--port", str(port), "--log", str(log)]
        procs[kind] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
    try:
        if before_go is not None:
            before_go()  # the in-process measurement runs while the children import
        for kind, proc in procs.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"poller child {kind} did not start (said {line!r})")
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write(f"go {seconds} {int(align)}\n")
            proc.stdin.flush()
        out = {}
        for kind, proc in procs.items():
            stdout, _ = proc.communicate(timeout=seconds + 60)
            found = next((x for x in stdout.splitlines() if x.startswith("result ")), None)
            if found is None or proc.returncode != 0:
                raise RuntimeError(f"poller child {kind} failed (exit {proc.returncode})")
            r = json.loads(found[len("result "):])
            lo, hi = bootstrap_ci(r["samples"], stat=statistics.fmean)
            r["cpu_pct"] = {"mean": 100 * r["cpu_s"] / r["wall_s"], "lo": 100 * lo, "hi": 100 * hi,
                            "n": len(r["samples"])}
            if r.get("polls") and "http_requests" in r:
                r["http_per_poll"] = r["http_requests"] / r["polls"]
            out[kind] = r
        return out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _rank0_only() -> str:
    """Where ``WorkerCore`` starts the poller on rank 0 alone."""
    return "ray_dyncheck/_core/worker.py (WorkerCore.__init__: the poller starts when rank == 0)"


def run(mode: str) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t_start = time.perf_counter()
    interval = rdc.DynamicCheckpointConfig().poll_interval_s
    result: dict[str, Any] = {"mode": mode, "machine": machine(), "poll_interval_s": interval,
                              "price_per_1000_usd": PRICE_PER_1000, "rank0_only": _rank0_only(), "storage": {}}
    root = tempfile.mkdtemp(prefix="dyncheck-bench-poller-")
    try:
        local_fs = pafs.LocalFileSystem()
        if mode == "smoke":
            def part_a() -> None:
                result["storage"]["local"] = _per_poll(local_fs, posixpath.join(root, "run"), POLLS[mode], None)

            result["cpu"] = _cpu(["local"], CPU_SECONDS[mode], root, None, None, before_go=part_a, align=False)
        else:
            with s3_server() as (port, log):
                def part_a() -> None:
                    result["storage"]["local"] = _per_poll(local_fs, posixpath.join(root, "run"), POLLS[mode],
                                                           None)
                    result["storage"]["s3"] = _per_poll(s3fs(port), "bucket/poller-run", POLLS[mode], log)
                    result["storage"]["s3"]["day"] = _day(result["storage"]["s3"]["idle"]["kinds_per_poll"],
                                                          interval)

                result["cpu"] = _cpu(["none", "local", "s3"], CPU_SECONDS[mode], root, port, log, before_go=part_a)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t_start
    return result


def _cpu_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "n/a"
    c = r["cpu_pct"]
    text = f"{c['mean']:.3f} %"
    if c["lo"] == c["lo"]:
        text += f" ({c['lo']:.3f} … {c['hi']:.3f})"
    return text


def table(result: dict[str, Any]) -> list[str]:
    interval = result["poll_interval_s"]
    per_day = 86400 / interval
    lines = ["| rank 0's run directory | storage requests per idle poll | per day | S3 price per day | "
             "poller CPU, % of one core |", "| --- | --- | --- | --- | --- |"]
    local = result["storage"].get("local")
    if local is not None:
        idle = local["idle"]
        calls = " + ".join(f"{v / idle['polls']:g} {k}" for k, v in sorted(idle["fs_calls"].items()))
        lines.append(f"| local disk | {idle['fs_calls_per_poll']:g} filesystem calls ({calls}) | "
                     f"{idle['fs_calls_per_poll'] * per_day:,.0f} | — | {_cpu_cell(result['cpu'].get('local'))} |")
    s3 = result["storage"].get("s3")
    if s3 is not None:
        idle, day = s3["idle"], s3["day"]
        kinds = " + ".join(f"{v:g} {k}" for k, v in idle["kinds_per_poll"].items())
        lines.append(f"| S3 (moto, loopback) | {idle['http_per_poll']:g} HTTP requests ({kinds}) | "
                     f"{day['requests_per_day']:,.0f} | ${day['usd_per_day']:.3f} (${day['usd_per_30_days']:.2f} / "
                     f"30 days) | {_cpu_cell(result['cpu'].get('s3'))} |")
    if "none" in result["cpu"]:
        lines.append(f"| no poller (the floor) | — | — | — | {_cpu_cell(result['cpu']['none'])} |")
    prices = result["price_per_1000_usd"]
    lines.append("")
    lines.append(f"Rank 0's poller reads the run directory every `poll_interval_s` ({interval:g} s, default) while "
                 "nothing is asked; every other rank makes no storage requests for it, whatever the world size "
                 f"(only rank 0 starts it: `{result['rank0_only']}`). Priced at AWS S3 Standard us-east-1: "
                 f"HEAD/GET ${prices['HEAD']} and LIST ${prices['LIST']} per 1,000 requests. CPU: a fresh process "
                 "whose main thread sleeps, mean over the window (90 % bootstrap interval of per-poll samples). "
                 "`python -m benchmarks.poller_cost --mode full`.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = section_parser(__doc__)
    p.add_argument("--child", choices=("none", "local", "s3"), help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.run_dir, args.port, args.log)
        return 0
    report(run(args.mode), table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
