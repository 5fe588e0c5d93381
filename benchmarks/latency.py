"""How long a request takes to become a committed checkpoint: request -> claimed -> decided -> committed.

One process (world size 1, no Ray) trains a tiny MLP in steps of about 20 ms (a sleep) with a
``DynamicCheckpoint({"check_interval": "auto"})`` on ``LocalBackend``, its run directory (a) in a
temporary directory of the local disk and (b) in a bucket of the S3 server on loopback (moto). The
config is otherwise the default: rank 0's poller reads the run directory every ``poll_interval_s``
(1 s). Another thread asks for a checkpoint at a random moment (a random pause after the previous
receipt), alternately by touching the trigger ``<run>/dyncheck.save`` and by
``rdc.request_save(run)``, and the times are taken in the same process:

  claimed    the poller claimed the request (the backend's ``metrics.request`` event)
  decided    the training thread entered the ``dc.step()`` whose check decided to save
  committed  the checkpoint was committed (commit marker written; ``metrics.committed``)
  receipt    the final receipt ``<run>/.dyncheck/receipts/<id>.json`` was written (read back from the
             receipts folder: the file's modification time, or the receipt's own ``time``, taken
             just before its write, when that is later, as on an object store that keeps whole seconds)

each from the moment the requesting call started. Also the steps from the request to the decision
and how long that save blocked training. Medians with 90 % bootstrap intervals over the requests.

    python -m benchmarks.latency [--mode smoke|quick|full] [--json PATH]
"""

from __future__ import annotations

import json
import logging
import posixpath
import random
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
import torch
from s3_local import s3_server, s3fs

import ray_dyncheck as rdc
from benchmarks._common import MODES, bootstrap_ci, machine, median, report, section_parser
from ray_dyncheck._backends.metrics import Metrics

STEP_S = 0.020
STAGES = ("claimed", "decided", "committed", "receipt")
TRIALS = {"smoke": 1, "quick": 6, "full": 16}


class _Clock(Metrics):
    """Wall-clock times of the hook's own events (claims, commits) on rank 0."""

    def __init__(self) -> None:
        self.claimed: list[tuple[float, str]] = []
        self.committed_at: list[float] = []
        self.commit_seen = threading.Event()

    def request(self, source: str) -> None:
        self.claimed.append((time.time(), source))

    def committed(self, kind: str, reason: str, seconds: float) -> None:
        self.committed_at.append(time.time())
        self.commit_seen.set()


class _TimedBackend(rdc.LocalBackend):
    """``LocalBackend`` with a ``metrics`` attribute (an optional part of the Backend protocol)."""

    def __init__(self, run_dir: str, filesystem: pafs.FileSystem | None = None) -> None:
        super().__init__(run_dir, filesystem=filesystem)
        self.metrics = _Clock()


def _first_after(times: list[float], t: float) -> float | None:
    return next((x for x in times if x >= t), None)


def _receipt_files(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            if i.type == pafs.FileType.File and i.base_name.endswith(".json") and not i.base_name.startswith(".")]


def _wait_for_receipt(fs: pafs.FileSystem, folder: str, known: int, committed: threading.Event,
                      timeout: float) -> bool:
    """Until the receipts folder holds more than ``known`` receipts: read every 250 ms, every 10 ms once
    the hook has committed a checkpoint (its receipts follow at once)."""
    deadline = time.monotonic() + timeout
    while len(_receipt_files(fs, folder)) <= known:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01 if committed.is_set() else 0.25)
    return True


def _receipts(fs: pafs.FileSystem, folder: str) -> list[tuple[float, dict[str, Any]]]:
    """Every receipt in the folder, oldest first: when it was written (its file's modification time, or
    its own ``time`` when later: an object store keeps whole seconds) and its body."""
    out = []
    for info in _receipt_files(fs, folder):
        with fs.open_input_stream(info.path) as f:
            body = json.loads(f.read())
        made = datetime.strptime(body["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
        out.append((max(made, (info.mtime_ns or 0) / 1e9), body))
    return sorted(out, key=lambda r: r[0])


def _trials(fs: pafs.FileSystem, run_dir: str, n: int, seed: int) -> dict[str, Any]:
    """Train while ``n`` requests are made one after another; every time in seconds from the request."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(16, 32)
    backend = _TimedBackend(run_dir, filesystem=fs)
    dc = rdc.DynamicCheckpoint({"check_interval": "auto"}, model=model, optimizer=opt, backend=backend)
    folder = posixpath.join(run_dir, ".dyncheck", "receipts")
    decisions: list[tuple[float, int, float]] = []  # (step() entered, step, blocked s)
    trials: list[dict[str, Any]] = []
    errors: list[str] = []
    done = threading.Event()
    rng = random.Random(seed)

    def requester() -> None:
        try:
            for i in range(n):
                time.sleep(rng.uniform(0.2, 1.2))  # a random phase against the poller
                source = "trigger" if i % 2 == 0 else "request"
                known = len(_receipt_files(fs, folder))
                backend.metrics.commit_seen.clear()
                step0, t0 = dc.global_step, time.time()
                if source == "trigger":
                    with fs.open_output_stream(posixpath.join(run_dir, "dyncheck.save")):
                        pass
                else:
                    rdc.request_save(run_dir, filesystem=fs)
                t_written = time.time()
                if not _wait_for_receipt(fs, folder, known, backend.metrics.commit_seen, 60):
                    errors.append(f"trial {i}: no receipt within 60 s")
                    return
                trials.append({"source": source, "t0": t0, "step0": step0, "write_s": t_written - t0})
        except Exception as exc:  # reported, never hangs the training loop
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            done.set()

    thread = threading.Thread(target=requester, name="bench-requester", daemon=True)
    t_loop, step_loop = time.perf_counter(), dc.global_step
    try:
        thread.start()
        while not done.is_set():
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            time.sleep(STEP_S)
            t_enter = time.time()
            decision = dc.step()
            if decision is not None and decision.save:
                decisions.append((t_enter, dc.global_step, dc.last_blocked_s))
        interval = dc.check_interval
        step_s = (time.perf_counter() - t_loop) / max(1, dc.global_step - step_loop)
        thread.join(5)
    finally:
        dc.close()
    clock = backend.metrics
    receipts = _receipts(fs, folder)
    rows = []
    for trial in trials:
        t0 = trial["t0"]
        claimed = next((t for t, _ in clock.claimed if t >= t0), None)
        decided = next((d for d in decisions if d[0] >= t0), None)
        committed = _first_after(clock.committed_at, t0)
        receipt = next((r for r in receipts if r[0] >= t0), None)
        if None in (claimed, decided, committed, receipt):
            errors.append(f"incomplete trial: {trial}")
            continue
        assert claimed is not None and decided is not None and committed is not None and receipt is not None
        rows.append({"source": trial["source"], "claimed": claimed - t0, "decided": decided[0] - t0,
                     "committed": committed - t0, "receipt": receipt[0] - t0, "steps": decided[1] - trial["step0"],
                     "blocked_s": decided[2], "write_s": trial["write_s"], "status": receipt[1].get("status")})
    out: dict[str, Any] = {"trials": rows, "errors": errors, "check_interval_settled": interval,
                           "poll_interval_s": dc.config.poll_interval_s, "step_s": step_s}
    for stage in STAGES + ("steps", "blocked_s"):
        xs = [float(r[stage]) for r in rows]
        lo, hi = bootstrap_ci(xs)
        out[stage] = {"median": median(xs), "lo": lo, "hi": hi, "min": min(xs, default=float("nan")),
                      "max": max(xs, default=float("nan")), "n": len(xs)}
    for source in ("trigger", "request"):
        xs = [r["committed"] for r in rows if r["source"] == source]
        out[f"committed_{source}"] = {"median": median(xs), "n": len(xs)}
    out["all_ok"] = bool(rows) and all(r["status"] == "ok" for r in rows)
    return out


def run(mode: str) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n = TRIALS[mode]
    log = logging.getLogger("ray_dyncheck")
    level = log.level
    log.setLevel(logging.WARNING)  # our per-save INFO lines would drown the table
    t_start = time.perf_counter()
    result: dict[str, Any] = {"mode": mode, "machine": machine(), "step_s": STEP_S, "backends": {}}
    try:
        root = tempfile.mkdtemp(prefix="dyncheck-bench-latency-")
        try:
            result["backends"]["local"] = _trials(pafs.LocalFileSystem(), posixpath.join(root, "run"), n, seed=1)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if mode != "smoke":
            with s3_server() as (port, _):
                result["backends"]["s3"] = _trials(s3fs(port), "bucket/latency-run", n, seed=2)
    finally:
        log.setLevel(level)
    result["seconds"] = time.perf_counter() - t_start
    return result


def _cell(d: dict[str, float], digits: int = 2) -> str:
    if d["median"] != d["median"]:
        return "n/a"
    text = f"{d['median']:.{digits}f}"
    if d["lo"] == d["lo"]:
        text += f" ({d['lo']:.{digits}f} … {d['hi']:.{digits}f})"
    return text


def table(result: dict[str, Any]) -> list[str]:
    names = {"local": "local disk", "s3": "S3 (moto, loopback)"}
    lines = ["| run directory | request → claimed | → decided | → committed | → receipt written | steps to decision "
             "| requests |", "| --- | --- | --- | --- | --- | --- | --- |"]
    first: dict[str, Any] = {}
    for key, r in result["backends"].items():
        first = first or r
        cells = [_cell(r[s]) + " s" for s in STAGES]
        lines.append(f"| {names.get(key, key)} | " + " | ".join(cells) +
                     f" | {r['steps']['median']:.0f} | {r['claimed']['n']} |")
    lines.append("")
    every = first["check_interval_settled"]
    lines.append(f"Seconds from the request (touching `dyncheck.save` and `rdc.request_save`, alternately, at random "
                 f"moments) to each stage; one process, {first['step_s'] * 1e3:.0f} ms steps, `check_interval: auto` "
                 f"(settled on {every} steps, {every * first['step_s']:.2f} s), `poll_interval_s: "
                 f"{first['poll_interval_s']:g}` (default); medians with 90 % bootstrap intervals. Claiming waits for "
                 "the next poll, deciding for the next check; committing adds the background write and store of a "
                 "tiny model. `python -m benchmarks.latency --mode full`.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = section_parser(__doc__)
    args = p.parse_args(argv)
    result = run(args.mode)
    report(result, table, args.json)
    for key, r in result["backends"].items():
        if r["errors"] or not r["all_ok"]:
            print(f"{key}: errors {r['errors']}, all receipts ok: {r['all_ok']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
