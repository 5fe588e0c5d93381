"""Worker functions for the multi-process gloo tests (real process groups, no Ray).

Spawned with torch.multiprocessing; each rank writes what it saw to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import ray_dyncheck as rdc


def run_ranks(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` fresh processes; raise on failure."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(fn, args=(world_size, port, *args), nprocs=world_size, start_method="spawn",
                       join=True)


def _init(rank: int, world_size: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))


def agreement_worker(rank: int, world_size: int, port: int, run_dir: str, out: str, cfg: dict,
                     actions: dict) -> None:
    """Train a tiny model with the hook; rank 0 performs ``actions[step]`` (real files) first."""
    import logging

    logging.basicConfig(level=logging.INFO)
    _init(rank, world_size, port)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    if world_size > 1:  # ranks step in lockstep, as in real data-parallel training
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps, step_time = cfg.pop("steps", 60), cfg.pop("step_time", 0.005)
    dc = rdc.DynamicCheckpoint(cfg, model=model, optimizer=opt, backend=rdc.LocalBackend(run_dir))
    checks, t0 = [], time.time()
    for step in range(steps):
        if rank == 0:
            for action in actions.get(str(step), []):
                _act(run_dir, action)
        loss = model(torch.ones(2, 4)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(step_time)
        decision = dc.step(metrics={"loss": loss.detach()})
        if decision is not None:
            checks.append([dc.global_step, decision.save, decision.kind, decision.stop,
                           decision.next_interval])
        if dc.should_stop:
            break
    dc.close()
    saves = [{k: v for k, v in s.items() if k != "requests"} | {"requests": s["requests"]} for s in dc.saves]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"checks": checks, "final_step": dc.global_step, "saves": saves,
                   "seconds": time.time() - t0}, f)
    dist.destroy_process_group()


def _act(run_dir: str, action: str) -> None:
    if action == "touch":
        open(os.path.join(run_dir, "dyncheck.save"), "a").close()
    elif action == "break_requests":
        os.makedirs(os.path.join(run_dir, ".dyncheck"), exist_ok=True)
        with open(os.path.join(run_dir, ".dyncheck", "requests"), "w") as f:
            f.write("a file where the request folder should be")
    elif action.startswith("request:"):
        body = json.loads(action.split(":", 1)[1])
        folder = os.path.join(run_dir, ".dyncheck", "requests")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{body['id']}.json"), "w") as f:
            json.dump(body, f)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    else:
        raise ValueError(action)
