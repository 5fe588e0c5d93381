"""The training functions the Ray tests (and the interrupt benchmark) run in real TorchTrainer workers
(CPU, gloo).

Sent to workers by value (see ``ray_by_value.py``), so workers need not import the tests folder.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch
import torch.nn as nn
from actions import act, wait_until

import ray_dyncheck as rdc


def batch_for(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic data indexed by step and rank: a resumed run sees what it would have seen."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def train_fn(config: dict) -> None:
    import ray.train
    from ray.train.torch import prepare_model

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    storage = ctx.get_storage()
    run_dir = storage.experiment_fs_path
    out = config["out"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"pid{rank}"), "w") as f:  # for tests that kill a worker by pid
        f.write(str(os.getpid()))
    node = ray.get_runtime_context().get_node_id()
    with open(os.path.join(out, f"node{rank}"), "w") as f:  # for tests that drain a worker's node
        f.write(node)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 1))
    if config.get("model") == "fsdp" and ctx.get_world_size() > 1:  # FSDP2: every rank holds a shard
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[3]):
            fully_shard(layer)
        model = fully_shard(model)
    elif config.get("model") != "fsdp":
        model = prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    checks, logged = [], 0
    if rank == 0 and "snapshot_fault" in config:
        die_while_snapshotting(config["snapshot_fault"], out)
    with rdc.DynamicCheckpoint(config["dynamic_checkpoint"], model=model, optimizer=opt,
                               lr_scheduler=sched) as dc:
        info = dc.restore()
        start = dc.global_step
        reads_requests = dc.reads_requests  # only rank 0 polls the request channel
        if rank == 0:  # every (re)start of the group, in order
            with open(os.path.join(out, "starts.log"), "a") as f:
                f.write(f"{start}\n")
        while dc.global_step < config["steps"]:
            if rank == 0:
                for action in config.get("actions", {}).get(str(dc.global_step), []):
                    if action.startswith("wait_snapshot:"):  # until the hook's memory snapshot of that step is held
                        wanted = int(action.split(":", 1)[1])
                        wait_until(lambda n=wanted: (dc.memory_snapshot_step or 0) >= n, f"the step-{wanted} snapshot")
                    else:
                        act(run_dir, action, out)
            x, y = batch_for(dc.global_step, rank)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            time.sleep(config.get("step_time", 0.0))
            decision = dc.step(metrics={"loss": loss.detach()})
            if rank == 0 and config.get("progress") and dc.global_step % 10 == 0:
                with open(config["progress"], "a") as f:  # live progress for tests that watch
                    f.write(f"{dc.global_step} {time.time()}\n")
            if decision is not None:
                checks.append([dc.global_step, decision.save, decision.kind, decision.stop])
            while rank == 0 and logged < len(dc.saves) and "committed_at" in dc.saves[logged]:
                with open(os.path.join(out, "commits.log"), "a") as f:  # rank 0's commits, as they happen
                    s = dc.saves[logged]
                    f.write(json.dumps({k: s[k] for k in ("step", "kind", "reason", "committed_at")}) + "\n")
                logged += 1
            if dc.should_stop:
                break
    record = {"rank": rank, "start": start, "final_step": dc.global_step, "checks": checks,
              "restored": None if info is None else [info.step, info.kind], "node": node,
              "reads_requests": reads_requests}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    inner = model.module if hasattr(model, "module") else model
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()  # every rank: a collective
            for k, v in inner.state_dict().items()}
    if rank == 0:
        torch.save(full, os.path.join(out, "final.pt"))



def die_while_snapshotting(step: int, out: str) -> None:
    """Once per run (a marker in ``out``): SIGKILL this process while its memory snapshot of ``step`` is half
    made: held by its first holder, not yet by the second, never marked complete."""
    from ray_dyncheck._backends.holders import RayMemoryStore

    marker = os.path.join(out, "once-snapshot-fault")
    if os.path.exists(marker):
        return
    real_put = RayMemoryStore.put

    def put(self, at, meta, files):
        if at != step:
            return real_put(self, at, meta, files)
        open(marker, "w").close()
        import ray

        node = self._targets()[0]
        ray.get(self.holders[node].put.remote(self.key, at, dict(meta), dict(files)))  # one copy, not committed
        os.kill(os.getpid(), signal.SIGKILL)

    RayMemoryStore.put = put


def progress_train_fn(config: dict) -> None:
    """The interrupt benchmark's workload (see ``interrupt_driver.py``): every worker trains a small MLP
    (DDP, gloo) with ``config["step_time"]`` steps under ``rdc.DynamicCheckpoint`` until ``config["steps"]``
    or until the hook says stop. World rank 0 appends ``step unix_time`` to ``OUT/progress.log`` after
    every step and writes ``config["ready"]`` (JSON: step and time) once the first scheduled checkpoint
    (``save_steps``) is committed and ``config["ready_steps"]`` more steps have run, or after those steps
    when nothing is scheduled."""
    import ray.train
    from ray.train.torch import prepare_model

    rank = ray.train.get_context().get_world_rank()
    out, ready = config["out"], config["ready"]
    torch.manual_seed(0)
    model = prepare_model(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduled = config["dynamic_checkpoint"].get("save_steps") is not None
    ready_at: int | None = None
    progress = open(os.path.join(out, "progress.log"), "a", buffering=1) if rank == 0 else None
    with rdc.DynamicCheckpoint(config["dynamic_checkpoint"], model=model, optimizer=opt) as dc:
        dc.restore()
        while dc.global_step < config["steps"]:
            g = torch.Generator().manual_seed(dc.global_step * 1000 + rank)
            x = torch.randn(16, 8, generator=g)
            loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(config["step_time"])
            dc.step()
            if progress is not None:
                progress.write(f"{dc.global_step} {time.time():.6f}\n")
                if ready_at is None and (not scheduled or any(
                        s["reason"] == "schedule" and "committed_at" in s for s in dc.saves)):
                    ready_at = dc.global_step + config["ready_steps"]
                if ready_at is not None and dc.global_step == ready_at:
                    with open(f"{ready}.tmp", "w") as f:
                        json.dump({"step": dc.global_step, "time": time.time()}, f)
                    os.replace(f"{ready}.tmp", ready)
            if dc.should_stop:
                break
    if progress is not None:
        progress.write(f"stopped {dc.global_step} {time.time():.6f}\n")
        progress.close()


def accelerate_train_fn(config: dict) -> None:
    """One Ray Train worker: a plain loop written with ``accelerate.Accelerator`` (DDP on CPU workers:
    ``MULTI_CPU``), checkpointed by the plain hook on what ``accelerator.prepare`` returned."""
    import ray.train
    from accelerate import Accelerator

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    run_dir = ctx.get_storage().experiment_fs_path
    out = config["out"]
    os.makedirs(out, exist_ok=True)
    if config.get("fsdp2"):  # the GPU test: Accelerate's FSDP2 plugin (ignored on CPU workers)
        from accelerate.utils import FullyShardedDataParallelPlugin

        accelerator = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    else:
        accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    with rdc.DynamicCheckpoint(config["dynamic_checkpoint"], model=model, optimizer=opt, lr_scheduler=sched) as dc:
        dc.restore()
        start = dc.global_step
        while dc.global_step < config["steps"]:
            if rank == 0:
                for action in config.get("actions", {}).get(str(dc.global_step), []):
                    act(run_dir, action, out)
            x, y = (t.to(accelerator.device) for t in batch_for(dc.global_step, rank))
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            sched.step()
            dc.step(metrics={"loss": loss.detach()})
            if dc.should_stop:
                break
        saves = [(s["step"], s["kind"], s["reason"]) for s in dc.saves]
    record = {"rank": rank, "start": start, "final_step": dc.global_step, "saves": saves,
              "distributed_type": str(accelerator.distributed_type), "lr": sched.get_last_lr()[0]}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    state = accelerator.get_state_dict(model)  # every rank: gathers a sharded model's full weights
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, os.path.join(out, "final.pt"))
