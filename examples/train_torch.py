"""Quickstart: on-demand checkpoints for a PyTorch loop in Ray Train's TorchTrainer.

Run it (a local, embedded Ray; 2 CPU workers; about a minute):

    python examples/train_torch.py                      # trains, touches the trigger midway, saves once
    python examples/train_torch.py                      # run again: resumes from that checkpoint

While it trains you can ask for a checkpoint yourself from another terminal:

    touch /tmp/ray_dyncheck_quickstart/quickstart/dyncheck.save

and Ctrl+C saves the weights before it stops (exit status 130); press it twice to stop at once.

Options:
    --config PATH         YAML with a `dynamic_checkpoint:` block (default: examples/config.yaml)
    --storage-path P      RunConfig.storage_path: a local path or a URI such as s3://bucket/prefix
    --name NAME           RunConfig.name; the run directory is <storage-path>/<name>/
    --steps N             total optimizer steps (a resumed run continues to N)
    --num-workers N       Ray Train workers (CPU and gloo; with --use-gpu one GPU each and NCCL)
    --use-gpu             train on GPUs (a cluster with GPU nodes, e.g. cluster.yaml)
    --step-time S         extra seconds of sleep per step, to make the demo watchable
    --no-demo-trigger     do not touch the trigger file midway (trigger it yourself)
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import ray
import torch
import torch.nn as nn
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

import ray_dyncheck as rdc

HERE = os.path.dirname(os.path.abspath(__file__))


def batch_for(step: int, rank: int, world: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic data indexed by step and rank, so a resumed run sees what it would have seen."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randn(size, 16, generator=g)
    y = x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(size, 1, generator=g)
    return x, y


def train_loop_per_worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    device = ray.train.torch.get_device()  # the CPU, or this worker's GPU with --use-gpu
    model = prepare_model(nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Dropout(0.1), nn.Linear(64, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)

    with rdc.DynamicCheckpoint(config["dynamic_checkpoint"], model=model, optimizer=optimizer,
                               lr_scheduler=scheduler) as dc:
        resumed = dc.restore()
        if rank == 0 and resumed is not None:
            print(f"resumed from {resumed.path} at step {resumed.step}", flush=True)
        demo_step = (dc.global_step + config["steps"]) // 2 if config["demo_trigger"] else None
        t_last, step_last = time.perf_counter(), dc.global_step
        while dc.global_step < config["steps"]:
            x, y = (t.to(device) for t in batch_for(dc.global_step, rank, world))
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            time.sleep(config["step_time"])
            if dc.global_step == demo_step and rank == 0:
                demo_touch(dc.global_step)
            dc.step(metrics={"loss": loss.detach()})
            now = time.perf_counter()
            if rank == 0 and now - t_last >= 5.0:  # progress every few seconds (a .item() sync: rank 0 only)
                print(f"step {dc.global_step}/{config['steps']}  loss {loss.item():.4f}  "
                      f"{(dc.global_step - step_last) / (now - t_last):.1f} steps/s", flush=True)
                t_last, step_last = now, dc.global_step
            if dc.should_stop:
                break


def demo_touch(step: int) -> None:
    """The demo's stand-in for you running `touch <run dir>/dyncheck.save` in another terminal.

    Done from rank 0 through the run's own filesystem, so it works for local paths and URIs alike.
    """
    storage = ray.train.get_context().get_storage()
    path = f"{storage.experiment_fs_path}/dyncheck.save"
    print(f"[demo] step {step}: touching {path}", flush=True)
    with storage.storage_filesystem.open_output_stream(path):
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "config.yaml"))
    p.add_argument("--storage-path", default="/tmp/ray_dyncheck_quickstart")
    p.add_argument("--name", default="quickstart")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--step-time", type=float, default=0.02)
    p.add_argument("--no-demo-trigger", action="store_true")
    p.add_argument("--use-gpu", action="store_true")
    args = p.parse_args()

    dc_config = rdc.DynamicCheckpointConfig.from_yaml(args.config)
    # Ray Train's print patch tees every print() of a worker into its logger: each line would show twice.
    # Workers of a local Ray inherit this; under `ray job submit` set it in --runtime-env-json.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: join that cluster
        ray.init()
    else:  # a local, embedded Ray: address="local" starts a new one even if a stale `ray start` left
        # its address file behind (ray.init() alone would try to join that dead cluster). With its
        # dashboard: Ray Train's placement-group cleaner asks the State API (served by the dashboard)
        # every second whether the controller lives, and without one logs a warning each time.
        ray.init(address="local", num_cpus=max(2, args.num_workers))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"steps": args.steps, "step_time": args.step_time,
                           "demo_trigger": not args.no_demo_trigger,
                           "dynamic_checkpoint": dc_config.to_dict()},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
        run_config=RunConfig(name=args.name, storage_path=args.storage_path),
    )
    # Instead of trainer.fit(): Ctrl+C (or SIGTERM) now saves the weights, then stops cleanly.
    result = rdc.fit(trainer)
    ray.shutdown()
    ckpt = result.checkpoint
    if ckpt is None:
        print("no checkpoint was reported")
        return 0
    meta = ckpt.get_metadata()
    print(f"latest checkpoint: {ckpt.path}")
    print(f"metadata: kind={meta.get('kind')} step={meta.get('step')} reason={meta.get('reason')} "
          f"request_id={meta.get('request_id')} time={meta.get('time')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
