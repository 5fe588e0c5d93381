"""PyTorch Lightning in Ray Train's TorchTrainer, with on-demand checkpoints from one callback.

Run it (a local, embedded Ray; 2 CPU workers; about a minute; nothing is downloaded):

    python examples/train_lightning.py                  # trains, touches the trigger midway, saves once
    python examples/train_lightning.py                  # run again: resumes at the same batch

While it trains you can ask for a checkpoint yourself from another terminal:

    touch /tmp/ray_dyncheck_lightning/lightning_quickstart/dyncheck.save

and Ctrl+C saves the weights (Lightning's `save_checkpoint(..., weights_only=True)`, with the LR schedule
beside it) before it stops (exit status 130); press it twice to stop at once. Every checkpoint is Lightning's
own `checkpoint.ckpt`, reported to Ray with its kind, step, reason and request id; the training data loader
is stateful, so a resume continues at the batch where the checkpoint was taken, mid-epoch.

Options:
    --config PATH         YAML with a `dynamic_checkpoint:` block (default: examples/config.yaml)
    --storage-path P      RunConfig.storage_path: a local path or a URI such as s3://bucket/prefix
    --name NAME           RunConfig.name; the run directory is <storage-path>/<name>/
    --steps N             Trainer max_steps (a resumed run continues to N)
    --num-workers N       Ray Train workers (CPU and gloo; with --use-gpu one GPU each and NCCL)
    --use-gpu             train on GPUs (a cluster with GPU nodes, e.g. cluster.yaml)
    --step-time S         extra seconds of sleep per step, to make the demo watchable
    --no-demo-trigger     do not touch the trigger file midway (trigger it yourself)
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import ray_dyncheck as rdc

HERE = os.path.dirname(os.path.abspath(__file__))


class NumberedBatches:
    """Batches of a noisy linear target, the same on every run; stateful (``state_dict`` /
    ``load_state_dict``), which is what lets Lightning resume mid-epoch at the same batch. Lightning fetches
    one batch ahead, so the state counts the batches training *used* (the module's ``training_step`` counts
    them), not those this iterator produced."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size
        self.start = self.used = 0

    def __len__(self) -> int:
        return self.n - self.start

    def __iter__(self):
        start, self.start = self.start, 0
        self.used = start
        for i in range(start, self.n):
            g = torch.Generator().manual_seed(i * self.world_size + self.rank)
            x = torch.randn(32, 16, generator=g)
            yield x, x @ torch.linspace(-1, 1, 16).unsqueeze(1) + 0.1 * torch.randn(32, 1, generator=g)

    def state_dict(self) -> dict:
        return {"used": self.used}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state["used"])


def train_loop_per_worker(config: dict) -> None:
    import lightning.pytorch as pl
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from ray_dyncheck.lightning import DynamicCheckpointCallback, resume_path

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    loader = NumberedBatches(config["steps"], rank, ctx.get_world_size())

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

        def training_step(self, batch, batch_idx):
            loader.used += 1
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["steps"])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Demo(pl.Callback):
        """Progress lines, slower steps for watching, and the user who touches the trigger midway."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(config["step_time"])
            step = trainer.global_step
            if rank == 0 and step % 50 == 0:
                print(f"step {step}: loss {float(outputs['loss']):.4f}", flush=True)
            if rank == 0 and config["demo_trigger"] and step == config["steps"] // 2:
                demo_touch(step)

    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=config["steps"], max_epochs=1, devices="auto", accelerator="auto",
        strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()],
        # Replaces Ray's RayTrainReportCallback: it reports Lightning's checkpoints itself, with metadata.
        callbacks=[DynamicCheckpointCallback(config["dynamic_checkpoint"]), Demo()],
        use_distributed_sampler=False,  # NumberedBatches gives each rank its own batches
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = prepare_trainer(trainer)
    ckpt = resume_path()  # None on a fresh run
    if rank == 0 and ckpt is not None:
        print(f"resuming from {ckpt}", flush=True)
    trainer.fit(Regression(), train_dataloaders=loader, ckpt_path=ckpt, weights_only=True)


def demo_touch(step: int) -> None:
    """The demo's stand-in for you running `touch <run dir>/dyncheck.save` in another terminal."""
    storage = ray.train.get_context().get_storage()
    path = f"{storage.experiment_fs_path}/dyncheck.save"
    print(f"[demo] step {step}: touching {path}", flush=True)
    with storage.storage_filesystem.open_output_stream(path):
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "config.yaml"))
    p.add_argument("--storage-path", default="/tmp/ray_dyncheck_lightning")
    p.add_argument("--name", default="lightning_quickstart")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--step-time", type=float, default=0.02)
    p.add_argument("--no-demo-trigger", action="store_true")
    p.add_argument("--use-gpu", action="store_true")
    args = p.parse_args()

    dc_config = rdc.DynamicCheckpointConfig.from_yaml(args.config)
    # Ray Train's print patch tees every print() of a worker into its logger: each line would show twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: join that cluster
        ray.init()
    else:  # a local, embedded Ray (never a stale one), with its dashboard (Ray Train's State API calls)
        ray.init(address="local", num_cpus=max(2, args.num_workers))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"steps": args.steps, "step_time": args.step_time, "demo_trigger": not args.no_demo_trigger,
                           "dynamic_checkpoint": dc_config.to_dict()},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
        run_config=RunConfig(name=args.name, storage_path=args.storage_path),
    )
    result = rdc.fit(trainer)  # instead of trainer.fit(): Ctrl+C saves the weights, then stops cleanly
    ray.shutdown()
    for ckpt, _metrics in sorted(result.best_checkpoints, key=lambda c: c[0].get_metadata().get("step", 0)):
        meta = ckpt.get_metadata()
        print(f"checkpoint step={meta.get('step')} kind={meta.get('kind')} reason={meta.get('reason')} "
              f"request_id={meta.get('request_id')}: {ckpt.path}")
    if result.checkpoint is None:
        print("no checkpoint was reported")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
