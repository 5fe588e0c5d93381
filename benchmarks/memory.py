"""Peak memory of a worker process with vs without the hook, and what a save holds on top.

Each variant runs in a fresh process (world size 1, CPU, no Ray): an MLP whose fp32 parameters +
AdamW moments take about ``size`` MB (as ``benchmarks.save_blocking._state``) trains N steps:

  none        no hook (``ray_dyncheck`` imported all the same: in a Ray worker pyarrow is loaded anyway)
  hook        ``DynamicCheckpoint({"check_interval": "auto"}, ...)`` on ``LocalBackend(tmp)``, no save
  save async  the hook, and one full save in the middle (``save_mode: async``, the default)
  save sync   the same with ``save_mode: sync``

Peak RSS is the process's high-water mark, ``VmHWM`` in ``/proc/self/status`` (in bytes in the JSON). Not
``ru_maxrss``: on Linux a child's ``ru_maxrss`` starts at its parent's peak (the kernel carries the
old address space's high-water mark across ``exec``), so a large benchmark parent would hide the
child's own; ``ru_maxrss`` is recorded too. The extra bytes over ``none`` are paired by round
(variants in shuffled order, two processes at a time), as medians with 90 % bootstrap intervals, and
as a multiple of the state's bytes: an async save holds one host copy of the state until it is
written, plus whatever serialising it for the files takes.

    python -m benchmarks.memory [--mode smoke|quick|full] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks._common import MODES, bootstrap_ci, machine, median, report, section_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("none", "hook", "save_async", "save_sync")
LABELS = {"none": "no hook", "hook": "hook, no save", "save_async": "hook + one save (async, default)",
          "save_sync": "hook + one save (sync)"}
# (state MB, rounds) per mode. Each child spends ~5 s importing torch: smoke runs one, quick six.
PLAN: dict[str, dict[str, Any]] = {
    "smoke": {"sizes": [(10, 1)], "steps": 6, "variants": ("save_async",)},
    "quick": {"sizes": [(100, 2)], "steps": 20, "variants": ("none", "hook", "save_async")},
    "full": {"sizes": [(100, 3), (400, 2)], "steps": 20, "variants": VARIANTS},
}


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``-1`` where there is no ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _child(variant: str, size_mb: float, steps: int) -> dict[str, Any]:
    """In a fresh process: train ``steps`` steps as ``variant`` says; memory figures in bytes."""
    rss = {"start": _status("VmRSS")}
    import torch

    torch.set_num_threads(1)
    rss["torch"] = _status("VmRSS")
    import ray_dyncheck as rdc

    rss["ray_dyncheck"] = _status("VmRSS")
    torch.manual_seed(0)
    # As benchmarks.save_blocking._state: Linear(1024, 1024) layers, fp32, AdamW moments made by one step.
    width = 1024
    layers = max(1, int(size_mb * 1e6 / 12) // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad()
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                       if isinstance(v, torch.Tensor))
    rss["state"] = _status("VmRSS")
    hwm_before = _status("VmHWM")
    root = tempfile.mkdtemp(prefix="dyncheck-bench-memory-")
    dc = None
    if variant != "none":
        config = {"check_interval": "auto", "save_mode": "sync" if variant == "save_sync" else "async"}
        backend = rdc.LocalBackend(os.path.join(root, "run"))
        dc = rdc.DynamicCheckpoint(config, model=model, optimizer=opt, backend=backend)
    x = torch.randn(8, width)
    t0 = time.perf_counter()
    try:
        for i in range(steps):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if dc is not None:
                dc.step()
                if variant.startswith("save") and i == steps // 2:
                    rss["before_save"] = _status("VmRSS")
                    dc.save("full")
                    rss["after_save_call"] = _status("VmRSS")
        if dc is not None:
            dc.close()
            saved = [s for s in dc.saves if s.get("path")]
            if variant.startswith("save") and not saved:
                raise RuntimeError(f"the save did not commit: {dc.saves}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"variant": variant, "size_mb": size_mb, "state_bytes": state_bytes, "steps": steps,
            "loop_s": time.perf_counter() - t0, "peak_rss": _status("VmHWM"), "peak_before_loop": hwm_before,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss": rss}


def _spawn(variant: str, size_mb: float, steps: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", variant, "--size-mb", str(size_mb),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("result ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"memory child {variant} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(line[len("result "):])
    return result


def _spread(xs: list[float]) -> dict[str, float]:
    lo, hi = bootstrap_ci(xs)
    return {"median": median(xs), "lo": lo, "hi": hi, "n": len(xs)}


def run(mode: str) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    plan = PLAN[mode]
    t_start = time.perf_counter()
    variants: tuple[str, ...] = plan["variants"]
    result: dict[str, Any] = {"mode": mode, "machine": machine(), "steps": plan["steps"], "variants": list(variants),
                              "sizes": []}
    rng = random.Random(0)
    for size, rounds in plan["sizes"]:
        jobs = []
        for r in range(rounds):
            order = list(variants)
            rng.shuffle(order)
            jobs += [(r, v) for v in order]
        with ThreadPoolExecutor(2) as pool:  # two processes at a time: a peak is per process
            futures = [(r, pool.submit(_spawn, v, size, plan["steps"])) for r, v in jobs]
            runs = [(r, f.result()) for r, f in futures]
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r, child in runs:
            by_round.setdefault(r, {})[child["variant"]] = child
        state = median([float(c["state_bytes"]) for _, c in runs])
        row: dict[str, Any] = {"size_mb": size, "state_bytes": state, "runs": [c for _, c in runs], "variants": {}}
        for v in variants:
            peaks = [float(rd[v]["peak_rss"]) for rd in by_round.values()]
            entry: dict[str, Any] = {"peak_rss": _spread(peaks)}
            if v != "none" and "none" in variants:
                extra = [float(rd[v]["peak_rss"] - rd["none"]["peak_rss"]) for rd in by_round.values()]
                entry["extra"] = _spread(extra)
                entry["extra_x_state"] = _spread([e / state for e in extra])
            held = [float(rd[v]["rss"]["after_save_call"] - rd[v]["rss"]["before_save"])
                    for rd in by_round.values() if "after_save_call" in rd[v]["rss"]]
            if held:
                entry["held_after_save_call"] = _spread(held)
            row["variants"][v] = entry
        imports = [float(c["rss"]["ray_dyncheck"] - c["rss"]["torch"]) for _, c in runs]
        row["import_ray_dyncheck"] = _spread(imports)
        result["sizes"].append(row)
    result["seconds"] = time.perf_counter() - t_start
    return result


def _mb(d: dict[str, float], x: float = 1e6, digits: int = 0) -> str:
    if d["median"] != d["median"]:
        return "n/a"
    text = f"{d['median'] / x:+.{digits}f}" if x == 1e6 else f"{d['median']:.2f}×"
    if d["lo"] == d["lo"]:
        text += f" ({d['lo'] / x:+.{digits}f} … {d['hi'] / x:+.{digits}f})" if x == 1e6 else \
            f" ({d['lo']:.2f} … {d['hi']:.2f})"
    return text


def table(result: dict[str, Any]) -> list[str]:
    lines = ["| state | variant | peak RSS, MB | extra over no hook, MB | extra / state |",
             "| --- | --- | --- | --- | --- |"]
    for row in result["sizes"]:
        for v in result["variants"]:
            e = row["variants"][v]
            extra = _mb(e["extra"]) if "extra" in e else "—"
            times = _mb(e["extra_x_state"], x=1.0) if "extra_x_state" in e else "—"
            peak = e["peak_rss"]
            spread = f" ({peak['lo'] / 1e6:.0f} … {peak['hi'] / 1e6:.0f})" if peak["lo"] == peak["lo"] else ""
            lines.append(f"| {row['state_bytes'] / 1e6:.0f} MB | {LABELS[v]} | {peak['median'] / 1e6:.0f}{spread} "
                         f"| {extra} | {times} |")
    rounds = "/".join(str(max(e["peak_rss"]["n"] for e in r["variants"].values())) for r in result["sizes"])
    imp = result["sizes"][0]["import_ray_dyncheck"]["median"] / 1e6 if result["sizes"] else float("nan")
    lines.append("")
    lines.append(f"Peak RSS (VmHWM) of a fresh process training {result['steps']} steps (CPU, world size 1; the state "
                 "is fp32 parameters + AdamW moments); medians of "
                 f"{rounds} shuffled rounds (90 % bootstrap intervals; extra bytes paired by round; the spread of "
                 "the no-hook rows is the noise of identical runs). "
                 "An async save holds its host copy of the state until it is written, while the next steps run"
                 + ("; a sync save copies and writes between two steps, when their gradients are freed. "
                    if "save_sync" in result["variants"] else ". ") +
                 f"`import ray_dyncheck` itself (pyarrow, DCP) adds {imp:.0f} MB, in every row. "
                 "`python -m benchmarks.memory --mode full`.")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = section_parser(__doc__)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--size-mb", type=float, default=100.0, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("result " + json.dumps(_child(args.child, args.size_mb, args.steps)), flush=True)
        return 0
    report(run(args.mode), table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
