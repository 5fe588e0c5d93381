"""Worker functions for the multi-process gloo tests (real process groups, no Ray).

Spawned with torch.multiprocessing; each rank writes what it saw to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from actions import act

import ray_dyncheck as rdc
from ray_dyncheck._backends.base import Notice


def run_ranks(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` fresh processes; raise on failure."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_then_exit, args=(fn, world_size, port, *args), nprocs=world_size, start_method="spawn",
                       join=True)


def _then_exit(rank: int, fn, *args) -> None:
    """Run one rank, then end its process at once (its results are written, its groups destroyed). Without
    this, torch's C++ teardown at interpreter exit aborted rank 0 now and then ("terminate called without an
    active exception", no Python frame left, after the worker's last line): about 1 in 40 runs of an FSDP2
    worker on a loaded machine, never before the work was done. A failure inside ``fn`` still raises."""
    import sys

    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world_size: int, port: int) -> None:
    # A crash (SIGABRT/SIGSEGV) in a rank prints every thread's Python stack to the test's output.
    faulthandler.enable(all_threads=True)
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
    notices = cfg.pop("preempt", {})  # {step: seconds to the deadline}: what Ray's watcher would mark
    backend = PreemptedBackend(run_dir)
    dc = rdc.DynamicCheckpoint(cfg, model=model, optimizer=opt, backend=backend)
    checks, t0 = [], time.time()
    for step in range(steps):
        if rank == 0:
            for action in actions.get(str(step), []):
                act(run_dir, action)
            if str(step) in notices:
                backend.notice = Notice(deadline=time.time() + notices[str(step)], ranks=(1,), nodes=(f"n{step}",))
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


class PreemptedBackend(rdc.LocalBackend):
    """LocalBackend with the optional ``preemption()`` a Ray worker has: the notice set by the test."""

    notice: Notice | None = None

    def preemption(self) -> Notice | None:
        return self.notice


class _State:
    """A user's extra_state whose state_dict fails (``raise``) or holds a type ``torch.load(weights_only=True)``
    refuses (``unsafe``) while ``mode`` is set."""

    def __init__(self, mode: str | None) -> None:
        self.mode, self.n = mode, 0

    def state_dict(self) -> dict:
        if self.mode == "raise":
            raise RuntimeError("data loader state unavailable")
        return {"n": self.n, **({"bad": object()} if self.mode == "unsafe" else {})}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def fault_cases_worker(rank: int, world_size: int, port: int, cases: list) -> None:
    """:func:`fault_case` for each ``(run_dir, plan, out, options)`` in turn, in one process group (one
    process start for all of them). A case that raises records its error and the next one runs."""
    import logging
    import traceback

    logging.basicConfig(level=logging.INFO)
    _init(rank, world_size, port)
    for run_dir, plan, out, options in cases:
        try:
            fault_case(rank, run_dir, plan, out, options)
        except Exception:
            with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
                json.dump({"error": traceback.format_exc()}, f)
            dist.barrier()
    dist.destroy_process_group()


def fault_case(rank: int, run_dir: str, plan: str, out: str, case: dict) -> None:
    """Train with the hook on a fault-injecting filesystem; rank 0 asks for saves while the faults are
    on (step 3), clears them (``clear_at``), then asks again (``later_at``)."""
    import tempfile

    from faultfs import fault_fs, set_plan

    tempfile.tempdir = None
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = _State(case.get("state_mode") if rank == case.get("state_rank") else None)
    if rank == 0 and case.get("bad_tmpdir"):
        tempfile.tempdir = os.path.join(out, "no-such-dir")
    steps, clear_at, later_at = case.get("steps", 70), case.get("clear_at", 20), case.get("later_at", 25)
    cfg = {"check_interval": 5, "poll_interval_s": 0.05, "collective_timeout_s": 30}
    dc = rdc.DynamicCheckpoint(cfg, model=model, optimizer=opt, extra_state={"data": state},
                               backend=rdc.LocalBackend(run_dir, filesystem=fault_fs(plan)))
    for step in range(steps):
        if rank == 0 and step == 3:
            act(run_dir, "touch")
            act(run_dir, 'request:{"id": "r1", "kind": "weights"}')
        if step == clear_at:
            state.mode = None
            if rank == 0:
                set_plan(plan, [])
                tempfile.tempdir = None
        if rank == 0 and step == later_at:
            act(run_dir, 'request:{"id": "later"}')
            # Until the poller has claimed it (a fault may have held the poller): then the next check
            # serves it, whatever the machine's speed.
            deadline = time.time() + 30
            while os.path.exists(os.path.join(run_dir, ".dyncheck", "requests", "later.json")) and \
                    time.time() < deadline:
                time.sleep(0.02)
        loss = model(torch.ones(2, 4)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.02)
        dc.step()
    dc.close()
    tempfile.tempdir = None
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"final_step": dc.global_step, "saves": dc.saves}, f)


def restore_worker(rank: int, world_size: int, port: int, run_dir: str, plan: str, out: str) -> None:
    """Save once, then restore on every rank through the fault-injecting filesystem."""
    from faultfs import fault_fs

    _init(rank, world_size, port)
    model = torch.nn.Linear(4, 1)
    backend = rdc.LocalBackend(run_dir, filesystem=fault_fs(plan))
    with rdc.DynamicCheckpoint({"enabled": False, "collective_timeout_s": 30}, model=model, backend=backend) as dc:
        dc.save()
    record: dict = {}
    dc2 = rdc.DynamicCheckpoint({"enabled": False, "collective_timeout_s": 30}, model=model, backend=backend)
    try:
        record["restored"] = dc2.restore().step
    except rdc.CheckpointRestoreError as exc:
        record["error"] = str(exc)
    dc2.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def _fsdp_model(world_size: int, shard: bool = True) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    if shard and world_size > 1:
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    return model


def fsdp_model_and_optimizer():
    """The FSDP test model unsharded (world size 1) and an AdamW over it."""
    model = _fsdp_model(1, shard=False)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _full_weights(model: torch.nn.Module) -> dict[str, list]:
    """Every parameter gathered (a collective for DTensors), as lists for JSON."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().reshape(-1).tolist()
    return out


def fsdp_worker(rank: int, world_size: int, port: int, run_dir: str, out: str, case: dict) -> None:
    """FSDP2 (``fully_shard``) over gloo with the hook and ``LocalBackend``.

    ``case``: ``steps``; ``restore`` (resume first); ``shard`` (False: a plain model, no FSDP);
    ``save_at`` (manual full saves); ``touch_at`` (rank 0 touches the trigger); ``plan`` (a faultfs
    plan file for the run directory); ``kind``/``layout`` of what to compare. Every rank records
    the full weights after each step in ``rank<r>.json``, and the steps a save was in flight.
    """
    import logging

    logging.basicConfig(level=logging.INFO)
    _init(rank, world_size, port)
    model = _fsdp_model(world_size, case.get("shard", True))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    backend_kw = {}
    if case.get("plan"):
        from faultfs import fault_fs

        backend_kw["filesystem"] = fault_fs(case["plan"])
    cfg = {"check_interval": case.get("check_interval", 2), "poll_interval_s": 0.05,
           "collective_timeout_s": 60, "save_mode": case.get("save_mode", "async")}
    dc = rdc.DynamicCheckpoint(cfg, model=model, optimizer=opt, lr_scheduler=sched,
                               backend=rdc.LocalBackend(run_dir, **backend_kw))
    record: dict = {"weights": {}, "in_flight": [], "decisions": []}
    info = dc.restore() if case.get("restore") else None
    if info is not None:
        record["restored"] = [info.step, info.kind, info.loaded_optimizer]
        record["weights"][str(info.step)] = _full_weights(model)
    while dc.global_step < case.get("steps", 10):
        step = dc.global_step
        if rank == 0 and step in case.get("touch_at", []):
            act(run_dir, "touch")
            deadline = time.time() + 30  # until claimed: the next check serves it, whatever the speed
            while os.path.exists(os.path.join(run_dir, "dyncheck.save")) and time.time() < deadline:
                time.sleep(0.02)
        if rank == 0 and str(step) in case.get("request_at", {}):
            body = case["request_at"][str(step)]
            act(run_dir, "request:" + json.dumps(body))
            pending = os.path.join(run_dir, ".dyncheck", "requests", f"{body['id']}.json")
            deadline = time.time() + 30
            while os.path.exists(pending) and time.time() < deadline:
                time.sleep(0.02)
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(4, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        time.sleep(case.get("step_time", 0.0))
        decision = dc.step(metrics={"loss": loss.detach()})
        if decision is not None and decision.save:
            record["decisions"].append(dc.global_step)
        if dc.global_step in case.get("save_at", []):
            dc.save(case.get("kind", "full"))
        if dc.in_flight:
            record["in_flight"].append(dc.global_step)
        record["weights"][str(dc.global_step)] = _full_weights(model)
        if dc.should_stop:
            break
    dc.close()
    record["saves"] = dc.saves
    record["blocked_s"] = dc.last_blocked_s
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def fsdp_prepare_fault_worker(rank: int, world_size: int, port: int, run_dir: str, out: str) -> None:
    """FSDP2 over gloo: rank 1 fails to create its ``dcp/`` folder once (before DCP's first
    collective), so the first save fails; the second must work and restore. Every rank records how
    long each save took and what rank 0 saw; rank 0 also each save's error."""
    import logging

    logging.basicConfig(level=logging.INFO)
    _init(rank, world_size, port)
    makedirs = os.makedirs
    failures = [1] if rank == 1 else []

    def failing_makedirs(name, *args, **kwargs):  # this process only: rank 1's disk "full" once
        if failures and os.path.basename(os.fspath(name).rstrip("/")) == "dcp":
            failures.pop()
            raise OSError(28, "No space left on device (injected)", os.fspath(name))
        return makedirs(name, *args, **kwargs)

    os.makedirs = failing_makedirs
    model = _fsdp_model(world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    cfg = {"enabled": False, "collective_timeout_s": 20, "save_mode": "sync"}
    record: dict = {"seconds": []}
    with rdc.DynamicCheckpoint(cfg, model=model, optimizer=opt, backend=rdc.LocalBackend(run_dir)) as dc:
        for step in (1, 2):
            loss = model(torch.ones(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            dc.global_step = step
            t0 = time.monotonic()
            dc.save("full")
            record["seconds"].append(time.monotonic() - t0)
        record["saves"] = [{"step": s["step"], "error": s["error"]} for s in dc.saves]
    record["weights"] = _full_weights(model)
    fresh = _fsdp_model(world_size)
    with rdc.DynamicCheckpoint(cfg, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=0.01),
                               backend=rdc.LocalBackend(run_dir)) as dc2:
        info = dc2.restore(timeout_s=20)
        record["restored"] = None if info is None else [info.step, info.kind, info.loaded_optimizer]
    record["restored_weights"] = _full_weights(fresh)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
