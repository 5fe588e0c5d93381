"""What checking costs: step time with the hook at several check intervals, relative to no hook.

Two gloo ranks (DDP, CPU) train a small MLP with a fixed sleep per step; each variant runs in the
same processes, interleaved in rounds, so the machine's noise hits all of them alike. Reports
ratios to the hook-less baseline and, for ``auto``, the interval it settled on. No Ray.

    python benchmarks/check_overhead.py                 # ~21 ms steps
    python benchmarks/check_overhead.py --step-ms 5     # faster steps
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ray_dyncheck as rdc

# "none" twice: the spread between the two is the noise floor of this run.
VARIANTS = ["none", "none-b", "1", "10", "100", "auto"]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)
    run_dir = os.path.join(out, "run")
    hooks = {v: None if v.startswith("none") else rdc.DynamicCheckpoint(
        {"check_interval": v if v == "auto" else int(v)}, model=model, optimizer=opt,
        backend=rdc.LocalBackend(run_dir)) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(args.rounds):
        random.Random(r).shuffle(order)  # the same order on both ranks; a new one each round
        for v in order:
            hook = hooks[v]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                time.sleep(args.step_ms / 1e3)
                if hook is not None:
                    hook.step()
            times[v].append((time.perf_counter() - t0) / args.steps)
    if rank == 0:
        auto = hooks["auto"]
        result = {v: statistics.median(t) for v, t in times.items()}
        result["auto_interval"] = auto._core.interval if auto is not None else None
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    for hook in hooks.values():
        if hook is not None:
            hook.close()
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--step-ms", type=float, default=20.0, help="sleep per step, on top of compute")
    p.add_argument("--steps", type=int, default=200, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="dyncheck-bench-")
    mp.start_processes(worker, args=(2, port, args, out), nprocs=2, start_method="spawn")
    res = json.load(open(os.path.join(out, "result.json")))
    base = res["none"]
    print(f"2 gloo ranks, DDP, median step {base * 1e3:.2f} ms without the hook "
          f"({args.rounds} rounds x {args.steps} steps per variant)")
    for v in VARIANTS[1:]:
        print(f"  check_interval={v:>5}: step time x{res[v] / base:.4f} ({(res[v] / base - 1) * 100:+.2f} %)")
    print(f"  auto settled on a check every {res['auto_interval']} steps "
          f"(~{res['auto_interval'] * base * 1e3:.0f} ms between checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
