"""The training function the Ray tests run in real TorchTrainer workers (CPU, gloo).

Sent to workers by value (see conftest), so workers need not import the tests folder.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn as nn

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
    with rdc.DynamicCheckpoint(config["dynamic_checkpoint"], model=model, optimizer=opt,
                               lr_scheduler=sched) as dc:
        info = dc.restore()
        start = dc.global_step
        reads_requests = dc._core.poller is not None  # only rank 0 polls the request channel
        if rank == 0:  # every (re)start of the group, in order
            with open(os.path.join(out, "starts.log"), "a") as f:
                f.write(f"{start}\n")
        while dc.global_step < config["steps"]:
            if rank == 0:
                for action in config.get("actions", {}).get(str(dc.global_step), []):
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


def act(run_dir: str, action: str, out: str = "") -> None:
    """What a user does from outside, done by rank 0 at a known step (real files in the run dir).

    ``once:<name>:<action>`` acts only the first time: a restarted group replays the steps since its
    checkpoint, and a fault must not be injected again.
    """
    trigger = os.path.join(run_dir, "dyncheck.save")
    if action.startswith("once:"):
        _, name, action = action.split(":", 2)
        marker = os.path.join(out, f"once-{name}")
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    # A real touch: creates the file or gives it a new modification time (a trigger claimed by its
    # version, on a store where it cannot be moved atomically, stays where it is).
    if action == "touch":
        Path(trigger).touch()
    elif action.startswith("touch_at:"):  # a trigger_file_path elsewhere
        path = action.split(":", 1)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).touch()
    elif action == "mkdir_trigger":
        os.makedirs(trigger)
    elif action.startswith("request:"):
        body = json.loads(action.split(":", 1)[1])
        folder = os.path.join(run_dir, ".dyncheck", "requests")
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{body['id']}.tmp")
        with open(tmp, "w") as f:
            json.dump(body, f)
        os.rename(tmp, os.path.join(folder, f"{body['id']}.json"))
    elif action.startswith("ready:"):  # tell a test process that training is under way
        open(action.split(":", 1)[1], "a").close()
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action.startswith("park_after:"):  # once a checkpoint with that reason is committed: wait to be killed
        reason, log, marker = action.split(":", 1)[1], os.path.join(out, "commits.log"), os.path.join(out, "parked")
        if not os.path.exists(marker) and os.path.exists(log) and any(
                json.loads(line)["reason"] == reason for line in open(log)):
            open(marker, "w").close()
            time.sleep(120)
    elif action.startswith("wait_file:"):  # until the test creates that file (at most a minute)
        path, deadline = action.split(":", 1)[1], time.time() + 60
        while time.time() < deadline and not os.path.exists(path):
            time.sleep(0.05)
    elif action.startswith("wait_claimed"):  # until rank 0's poller has claimed it (wait_claimed:<id>)
        folder = os.path.join(run_dir, ".dyncheck", "claimed")
        rid = action.partition(":")[2]
        deadline = time.time() + 30
        while time.time() < deadline and not (os.path.isdir(folder) and any(
                n.startswith(rid) and not n.startswith(".") for n in os.listdir(folder))):
            time.sleep(0.05)
    elif action.startswith("wait_any_receipt:"):  # until a receipt whose id starts so is written
        folder, prefix = os.path.join(run_dir, ".dyncheck", "receipts"), action.partition(":")[2]
        deadline = time.time() + 60
        while time.time() < deadline and not (os.path.isdir(folder) and any(
                n.startswith(prefix) for n in os.listdir(folder))):
            time.sleep(0.05)
    elif action.startswith("wait_receipt:"):  # until the request's receipt is written (committed)
        path = os.path.join(run_dir, ".dyncheck", "receipts", f"{action.partition(':')[2]}.json")
        deadline = time.time() + 60
        while time.time() < deadline and not os.path.exists(path):
            time.sleep(0.05)
    elif action.startswith(("fault:", "fault_rank1:")):  # faults for this process (or rank 1's) only
        pid = os.getpid() if action.startswith("fault:") else int(open(os.path.join(out, "pid1")).read())
        rules = [dict(r, pid=pid) for r in json.loads(action.split(":", 1)[1])]
        plan = os.path.join(out, "plan.json")
        with open(f"{plan}.tmp", "w") as f:
            json.dump(rules, f)
        os.replace(f"{plan}.tmp", plan)
    elif action.startswith("tmpdir:"):
        import tempfile

        tempfile.tempdir = action.split(":", 1)[1] or None
    elif action == "kill_rank1":
        os.kill(int(open(os.path.join(out, "pid1")).read()), signal.SIGKILL)
    elif action == "kill_self":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise ValueError(action)
