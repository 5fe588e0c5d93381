"""P4: how long a graceful interrupt takes, next to Ray's own abort, on real processes and a real SIGINT.

Each trial starts ``tests/harness/interrupt_driver.py`` (its ``progress`` workload) as its own process
(and session): a local Ray, a TorchTrainer with 2 CPU workers (gloo, DDP), a small MLP, ~20 ms steps,
``rdc.DynamicCheckpoint`` in the workers with a scheduled full save every ``SAVE_STEPS`` steps and
everything else at its default (``check_interval: auto``, ``poll_interval_s: 1``, ``on_interrupt:
weights``). Once world rank 0 has seen the first scheduled checkpoint committed and run 5 more steps it
writes a ready file; then SIGINT goes to the driver's process group, as Ctrl+C in a terminal does. Two
variants, interleaved trial by trial (ours, plain, ours, plain, ...):

  ours   the driver runs ``rdc.fit(trainer)``: a weights-only save, then a clean stop
  plain  the driver runs ``trainer.fit()``: Ray's own SIGINT handler aborts the run

Measured from the moment the signal is sent (``time.time()`` / ``time.monotonic()`` here):

  committed  signal -> the interrupt's receipt is written (its ``time``): rank 0 writes it only once Ray
             has registered the checkpoint, so this is signal -> weights checkpoint committed (ours)
  saved      signal -> the checkpoint's own ``time`` metadata (reported to Ray after the host copy)
  exit       signal -> the driver process has exited (``Popen.wait``), Ray shut down included
  lost       steps run before the signal and in no committed checkpoint (rank 0's progress log against
             ``rdc.run_status``); ``since schedule`` counts committed checkpoints that are not scheduled
             ones: ours should have exactly the interrupt's, plain none

A driver that has not exited ``EXIT_DEADLINE_S`` after the signal is killed (its session, by pid) and
the trial says so; so are processes of its session still alive ``LINGER_S`` after it exited. Medians
with min and max; ``exit_ratio`` is median(ours exit) / median(plain exit). A trial starts Ray
(~17 s on a 2-core machine) and trains until the first scheduled save, so: ``smoke`` runs nothing,
``quick`` one trial of each, ``full`` three of each.

    python -m benchmarks.interrupt [--mode quick] [--json PATH]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from typing import Any

from benchmarks import HARNESS
from benchmarks._common import MODES, machine, median, report, section_parser

DRIVER = os.path.join(HARNESS, "interrupt_driver.py")
VARIANTS = ("ours", "plain")
TRIALS = {"smoke": 0, "quick": 1, "full": 3}
SAVE_STEPS = 250  # ~6 s of 20 ms steps: the next scheduled save comes well after either variant has stopped
READY_TIMEOUT_S = 300.0
EXIT_DEADLINE_S = 180.0  # above rdc.fit's interrupt_grace_s (120 s) plus its shutdown
LINGER_S = 30.0
METRICS = ("committed_s", "saved_s", "exit_s", "lost_steps")


def _unix(stamp: Any) -> float | None:
    """Seconds since the epoch from a receipt's or metadata's ISO time (``Z`` or ``+00:00``)."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _session(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (the driver's, which started Ray's processes)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # after ")": state, ppid, pgrp, session
            pids.append(int(name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _step_at(progress: str, t: float) -> int | None:
    """The last step rank 0 finished at or before unix time ``t``."""
    step = None
    try:
        with open(progress) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and float(parts[1]) <= t:
                    step = int(parts[0])
    except OSError:
        return None
    return step


def trial(variant: str, root: str) -> dict[str, Any]:
    """One driver process, one SIGINT; what it took and what survived."""
    import ray_dyncheck as rdc

    storage, out, ready = os.path.join(root, "results"), os.path.join(root, "out"), os.path.join(root, "ready")
    log_path = os.path.join(root, "driver.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TRAIN_ENABLE_PRINT_PATCH="0")
    dc = {"save_steps": SAVE_STEPS}
    extra = {"plain": variant == "plain", "workload": "progress", "num_cpus": 2}
    row: dict[str, Any] = {"variant": variant, "killed": False, "lingering_killed": 0}
    t_start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, DRIVER, storage, "run", out, ready, json.dumps(dc), "100000", json.dumps(extra)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.exists(ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                row["error"] = "the driver never started training" + (
                    f" (exit {proc.returncode})" if proc.returncode is not None else "")
                return row
            time.sleep(0.05)
        row["start_to_ready_s"] = time.monotonic() - t_start
        t_sig, t_sig_mono = time.time(), time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as Ctrl+C in a terminal
        try:
            row["exit_code"] = proc.wait(timeout=EXIT_DEADLINE_S)
            row["exit_s"] = time.monotonic() - t_sig_mono
        except subprocess.TimeoutExpired:
            row["killed"] = True
            row["exit_s"] = None
    finally:
        if proc.poll() is None:
            _kill([proc.pid, *_session(proc.pid)])
            proc.wait()
        linger = time.monotonic() + LINGER_S
        while _session(proc.pid) and time.monotonic() < linger:
            time.sleep(0.2)
        left = _session(proc.pid)
        row["lingering_killed"] = len(left)
        _kill(left)
        with open(log_path, errors="replace") as f:
            text = f.read()
        row["log_tail"] = text[-3000:] if "error" in row or row["killed"] else None
    try:
        status = rdc.run_status(os.path.join(storage, "run"))
    except (OSError, rdc.RunNotFoundError) as exc:
        row["error"] = f"cannot read the run: {type(exc).__name__}: {exc}"
        row["log_tail"] = text[-3000:]
        return row
    interrupt = [r for r in status["receipts"] if str(r.get("id", "")).startswith("interrupt-")]
    receipt = interrupt[0] if interrupt else None
    committed = [c for c in status["checkpoints"] if c["state"] == "committed"]
    row["checkpoints"] = [{k: c[k] for k in ("step", "kind", "reason", "state")} for c in status["checkpoints"]]
    row["since_schedule"] = [{k: c[k] for k in ("step", "kind", "reason")} for c in committed
                             if c["reason"] != "schedule"]
    row["receipt"] = None if receipt is None else {k: receipt.get(k) for k in ("status", "kind", "step", "error")}
    t_commit = _unix(receipt.get("time")) if receipt and receipt.get("status") == "ok" else None
    row["committed_s"] = None if t_commit is None else t_commit - t_sig
    saved = [c for c in status["checkpoints"] if c["reason"] == "interrupt"]
    t_saved = _unix(saved[0]["time"]) if saved else None
    row["saved_s"] = None if t_saved is None else t_saved - t_sig
    step = _step_at(os.path.join(out, "progress.log"), t_sig)
    newest = max((c["step"] for c in committed if c["step"] is not None), default=0)
    row["step_at_signal"], row["newest_committed_step"] = step, newest
    row["lost_steps"] = None if step is None else max(0, step - newest)
    found = re.search(r"stopped after the interrupt in ([0-9.]+) s", text)
    row["driver_says_stopped_s"] = float(found.group(1)) if found else None
    return row


def _stats(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(trials: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        rows = trials[variant]
        summary[variant] = {m: _stats([r[m] for r in rows if isinstance(r.get(m), (int, float))]) for m in METRICS}
        summary[variant]["killed"] = sum(1 for r in rows if r.get("killed"))
        summary[variant]["failed"] = sum(1 for r in rows if "error" in r)
        summary[variant]["exit_codes"] = sorted({r["exit_code"] for r in rows if r.get("exit_code") is not None})
        summary[variant]["since_schedule"] = [[(c["kind"], c["reason"]) for c in r.get("since_schedule", [])]
                                              for r in rows]
    ours, plain = summary["ours"]["exit_s"]["median"], summary["plain"]["exit_s"]["median"]
    summary["exit_ratio"] = ours / plain if ours is not None and plain else None
    return summary


def run(mode: str) -> dict[str, Any]:
    """``smoke``: nothing started, the same keys, empty; ``quick``: 1 trial each; ``full``: 3 each."""
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; one of {', '.join(MODES)}")
    trials: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    result: dict[str, Any] = {"mode": mode, "save_steps": SAVE_STEPS, "trials": trials}
    if mode == "smoke":
        return {**result, "skipped": "starts Ray; run --quick", "summary": {}, "machine": {}}
    result["machine"] = machine()
    t0 = time.monotonic()
    for i in range(TRIALS[mode]):
        for variant in VARIANTS:
            root = tempfile.mkdtemp(prefix=f"dyncheck-bench-int-{variant}-")
            try:
                row = trial(variant, root)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            trials[variant].append(row)
            print(_line(i, row), flush=True)
    result["summary"] = summarize(trials)
    result["elapsed_s"] = time.monotonic() - t0
    return result


def _s(x: Any) -> str:
    return f"{x:.2f} s" if isinstance(x, (int, float)) else "-"


def _line(i: int, row: dict[str, Any]) -> str:
    if "error" in row:
        return f"trial {i + 1} {row['variant']:5}: {row['error']}"
    return (f"trial {i + 1} {row['variant']:5}: committed {_s(row.get('committed_s'))}, exit {_s(row.get('exit_s'))}"
            f"{' (killed)' if row['killed'] else ''} (code {row.get('exit_code')}), step {row.get('step_at_signal')}, "
            f"lost {row.get('lost_steps')} steps, since schedule {row.get('since_schedule')}")


def _status(code: int) -> str:
    """``Popen.returncode`` as a shell shows it: -2 (killed by SIGINT) is 130."""
    return f"{128 - code} (killed by {signal.Signals(-code).name})" if code < 0 else str(code)


def _cell(st: dict[str, Any], unit: str = " s", digits: int = 2) -> str:
    if not st or st.get("median") is None:
        return "-"
    if st["n"] == 1:
        return f"{st['median']:.{digits}f}{unit}"
    return f"{st['median']:.{digits}f}{unit} ({st['min']:.{digits}f}–{st['max']:.{digits}f})"


def table(result: dict[str, Any]) -> list[str]:
    """Markdown lines for the Performance page's interrupt table (docs/performance.md)."""
    if result.get("skipped") or not result.get("summary"):
        return [f"Graceful interrupt: skipped ({result.get('skipped', 'no trials')})."]
    s = result["summary"]
    n = max(s[v]["exit_s"]["n"] for v in VARIANTS)
    names = {"ours": "`rdc.fit(trainer)` (weights save, clean stop)", "plain": "`trainer.fit()` (Ray's abort)"}
    lines = [
        "| driver | signal → weights committed | signal → driver exit | exit status | "
        "committed checkpoints after the last scheduled one | steps lost |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in VARIANTS:
        st = s[v]
        kept = sorted({", ".join(f"{k} ({r})" for k, r in ck) or "none" for ck in st["since_schedule"]})
        flags = "".join(f", {st[k]} {k}" for k in ("killed", "failed") if st[k])
        committed = _cell(st["committed_s"]) if st["committed_s"]["n"] else "no save"
        lines.append(f"| {names[v]} | {committed} | {_cell(st['exit_s'])}{flags} | "
                     f"{', '.join(_status(c) for c in st['exit_codes']) or '-'} | {'; '.join(kept) or '-'} | "
                     f"{_cell(st['lost_steps'], '', 0)} |")
    ratio = s.get("exit_ratio")
    lines += ["", f"Medians (min–max) of {n} trial(s) each, interleaved; 2 CPU workers, ~20 ms steps, a scheduled "
              f"save every {result['save_steps']} steps; SIGINT to the driver's process group. "
              + (f"Ours exits in {ratio:.2f}× the time of Ray's own abort." if ratio is not None else "")]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = section_parser(__doc__)
    args = p.parse_args(argv)
    report(run(args.mode), table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
