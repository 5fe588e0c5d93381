"""Lightning in Ray's TorchTrainer: how long each checkpoint blocks training with Ray's
``RayTrainReportCallback`` (save, synchronous report of a copy, barrier; at epoch ends) vs ray_dyncheck's
``DynamicCheckpointCallback`` (save, hard links, asynchronous upload; ``save_steps`` at the same steps), and
what the callback costs per step at ``check_interval: auto`` when nothing is saved.

All variants run in the same Ray instance, alternating round by round, so the machine's noise hits each.
Blocked time is measured from the outside: a timer callback before and one after the reporting callback.

    python benchmarks/lightning_report_blocking.py                 # 10 M parameters, 3 saves per run, 2 rounds
    python benchmarks/lightning_report_blocking.py --hidden 2048   # 17 M parameters
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def _model(hidden: int, layers: int = 6) -> torch.nn.Sequential:
    mods: list[torch.nn.Module] = [torch.nn.Linear(64, hidden), torch.nn.ReLU()]
    for _ in range(layers - 2):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(hidden, 1))


def train_fn(config: dict) -> None:
    import lightning.pytorch as pl
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    from ray_dyncheck.lightning import DynamicCheckpointCallback

    variant = config["variant"]
    rank = ray.train.get_context().get_world_rank()
    blocked: list[float] = []
    steps: list[float] = []

    class Before(pl.Callback):
        def on_train_batch_end(self, *args):
            self.t = time.perf_counter()

        on_train_epoch_end = on_train_batch_end

    class After(pl.Callback):
        def __init__(self, before: Before, hook: str) -> None:
            self.before, self.hook = before, hook

        def on_train_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            if self.hook == "batch" and trainer.global_step % config["every"] == 0:
                blocked.append(time.perf_counter() - self.before.t)

        def on_train_epoch_end(self, trainer, pl_module):
            if self.hook == "epoch":
                blocked.append(time.perf_counter() - self.before.t)

        def on_train_end(self, trainer, pl_module):
            steps.append((time.perf_counter() - self.t0) / trainer.global_step)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model(config["hidden"])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    before = Before()
    if variant == "ray":
        reporting: list[pl.Callback] = [RayTrainReportCallback()]
        hook = "epoch"
    elif variant == "dyncheck":
        reporting = [DynamicCheckpointCallback({"check_interval": "auto", "save_steps": config["every"]})]
        hook = "batch"
    elif variant == "auto":
        reporting = [DynamicCheckpointCallback({"check_interval": "auto"})]
        hook = "none"
    else:
        reporting, hook = [], "none"
    g = torch.Generator().manual_seed(rank)
    n = config["batch"] * config["every"]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 64, generator=g),
                                                                      torch.randn(n, 1, generator=g)),
                                       batch_size=config["batch"])
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=config["epochs"], accelerator="cpu", devices="auto", strategy=RayDDPStrategy(),
                         plugins=[RayLightningEnvironment()], callbacks=[before, *reporting, After(before, hook)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    prepare_trainer(trainer).fit(Module(), train_dataloaders=data)
    if rank == 0:
        with open(config["result"], "w") as f:
            json.dump({"blocked": blocked, "step_s": steps}, f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--overhead-steps", type=int, default=300)
    args = p.parse_args()
    params = sum(x.numel() for x in _model(args.hidden).parameters())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    blocked: dict[str, list[float]] = {"ray": [], "dyncheck": []}
    step_s: dict[str, list[float]] = {"none": [], "auto": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("ray", "dyncheck", "none", "auto") if r % 2 == 0 else ("auto", "none", "dyncheck", "ray")
            for variant in order:
                result = os.path.join(tmp, f"{variant}{r}.json")
                saving = variant in blocked
                # Saving runs: epochs of 5 batches (Ray reports at each epoch's end; ours every 5 steps).
                # Overhead runs: one epoch of --overhead-steps batches of a small model, nothing saved.
                config = {"variant": variant, "result": result, "hidden": args.hidden if saving else 64,
                          "batch": 16, "every": 5 if saving else args.overhead_steps,
                          "epochs": args.saves if saving else 1}
                TorchTrainer(train_fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=2),
                             run_config=RunConfig(name=f"{variant}{r}", storage_path=os.path.join(tmp, "results"))
                             ).fit()
                with open(result) as f:
                    got = json.load(f)
                if saving:
                    blocked[variant] += got["blocked"]
                else:
                    step_s[variant] += got["step_s"]
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in blocked.items()}
    print(f"hidden={args.hidden} ({params / 1e6:.0f} M parameters, fp32, AdamW): a checkpoint blocks training for "
          f"(median of {len(blocked['ray'])} saves, rank 0):")
    print(f"  RayTrainReportCallback    {med['ray']:.3f} s")
    print(f"  DynamicCheckpointCallback {med['dyncheck']:.3f} s   ({med['ray'] / med['dyncheck']:.1f}x less)")
    none, auto = statistics.median(step_s["none"]), statistics.median(step_s["auto"])
    print(f"per step, no saves ({args.overhead_steps} steps of a small model): without a callback {none * 1e3:.2f} ms, "
          f"with DynamicCheckpointCallback at auto {auto * 1e3:.2f} ms ({(auto / none - 1) * 100:+.2f} %)")
    print(json.dumps({"blocked": blocked, "step_s": step_s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
