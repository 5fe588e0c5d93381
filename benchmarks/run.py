"""Every benchmark in one command: a Markdown table per section and one JSON file.

    python -m benchmarks.run              # full: about 40 minutes on 2 cores
    python -m benchmarks.run --quick      # about 15 minutes (P1 at 3 step times and 3 world sizes)
    python -m benchmarks.run --smoke      # seconds: checks the JSON's shape, not the numbers (run by the tests)
    python -m benchmarks.run --only checks save --json results.json

Sections (each also runs alone: ``python -m benchmarks.<section> --mode quick``):

  checks       P1: check overhead and reaction vs no hook and the peer designs; 2/4/8 ranks (benchmarks.checks)
  latency      P2: request -> decided -> committed, local disk and S3 on loopback (benchmarks.latency)
  save         P3: training blocked by a full save vs torch.save vs an in-memory copy (benchmarks.save_blocking)
  interrupt    P4: signal -> weights committed / driver exit vs a plain Ctrl+C (benchmarks.interrupt; Ray)
  poller       storage requests per poll and per day, and the poller's CPU (benchmarks.poller_cost)
  memory       peak RSS with vs without the hook; extra bytes during a save (benchmarks.memory)
  recovery     steps lost and time to the first step after a crash, memory snapshots vs storage; their
               steady cost at auto (benchmarks.recovery; a 4-node local Ray cluster)

Every comparison is a ratio or a difference measured within the same run, with a spread (these
machines are shared and noisy); latencies are seconds, with their spread. The JSON records the
versions and the machine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Any

from benchmarks._common import machine, write_json

SECTIONS = {
    "checks": "benchmarks.checks",
    "latency": "benchmarks.latency",
    "save": "benchmarks.save_blocking",
    "interrupt": "benchmarks.interrupt",
    "poller": "benchmarks.poller_cost",
    "memory": "benchmarks.memory",
    "recovery": "benchmarks.recovery",
}
TITLES = {
    "checks": "P1: check overhead and reaction",
    "latency": "P2: request -> decided -> committed",
    "save": "P3: training blocked by a full save",
    "interrupt": "P4: graceful interrupt",
    "poller": "Rank 0's poller: storage requests and CPU",
    "memory": "Memory",
    "recovery": "Recovery: memory snapshots vs storage",
}
# Keys every section's result has (what --smoke checks).
SHAPE = {"mode": str, "seconds": float, "result": dict}


def check_shape(results: dict[str, Any]) -> list[str]:
    """What is missing or mistyped in a results dict (empty when it has the documented shape)."""
    problems = []
    for key in ("machine", "mode", "sections"):
        if key not in results:
            problems.append(f"missing {key!r}")
    for name, section in results.get("sections", {}).items():
        for key, typ in SHAPE.items():
            if not isinstance(section.get(key), typ):
                problems.append(f"sections.{name}.{key}: expected {typ.__name__}, got {section.get(key)!r:.60}")
    return problems


def run_section(name: str, mode: str) -> dict[str, Any]:
    module = importlib.import_module(SECTIONS[name])
    t0 = time.perf_counter()
    result = module.run(mode)
    return {"mode": mode, "seconds": time.perf_counter() - t0, "result": result, "table": module.table(result)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", const="quick", dest="mode", help="about 15 minutes on 2 cores")
    g.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                   help="seconds; checks the result's shape, not its numbers")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    mode = args.mode or "full"
    results: dict[str, Any] = {"machine": machine(), "mode": mode, "sections": {}}
    for name in args.only:
        print(f"## {TITLES[name]}", flush=True)
        section = run_section(name, mode)
        results["sections"][name] = section
        print("\n".join(section["table"]), f"\n({section['seconds']:.0f} s)\n", flush=True)
    if args.json:
        write_json(args.json, results)
    problems = check_shape(results)
    for problem in problems:
        print(f"benchmarks: result shape: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
