"""What asking Ray about preemption costs per check, next to the check itself, measured in one run.

Inside a real TorchTrainer (2 CPU workers, gloo), every worker times, in interleaved rounds:

  notice     what the hook does at each check on rank 0: read this worker's copy of Ray's preemption
             notice (``RayBackend.preemption()``; the other ranks do nothing)
  agree      the check's one collective (``Agreement.agree``: one all_reduce on the gloo side group)
  ray call   ``ray.train.get_preemption_info()``, Ray's public call: a collective through Ray's
             synchronisation actor on every rank

Medians of ``--rounds`` x ``--calls`` calls; ratios to ``agree``.

    python -m benchmarks.preemption_check [--calls 200] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

from benchmarks._common import ray_run


def _per_call_s(fn: Any, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def train_fn(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from ray_dyncheck._backends.ray import RayBackend
    from ray_dyncheck._core.agree import Agreement, Decision

    backend = RayBackend()
    agreement = Agreement(timeout_s=120)
    rank = backend.rank
    rows: dict[str, list[float]] = {"notice": [], "agree": [], "ray call": []}
    decision = Decision(next_interval=1)
    for _ in range(config["rounds"]):
        rows["notice"].append(_per_call_s(backend.preemption if rank == 0 else (lambda: None), config["calls"]))
        dist.barrier()
        rows["agree"].append(_per_call_s(lambda: agreement.agree(decision), config["calls"]))
        rows["ray call"].append(_per_call_s(ray.train.get_preemption_info, max(1, config["calls"] // 10)))
    agreement.close()
    if rank == 0:  # one machine: the driver reads it from the same disk
        with open(config["out"], "w") as f:
            json.dump({k: statistics.median(v) for k, v in rows.items()}, f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    rows = ray_run(train_fn, {"calls": args.calls, "rounds": args.rounds}, num_workers=2, num_cpus=2)
    base = rows["agree"]
    print(f"per check, rank 0, 2 workers, {platform.processor() or platform.machine()}, "
          f"median of {args.rounds} rounds:")
    print(f"{'':10} {'seconds':>12} {'x agree':>10}")
    for name, seconds in rows.items():
        print(f"{name:10} {seconds:12.3e} {seconds / base:10.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "calls": args.calls, "rounds": args.rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
