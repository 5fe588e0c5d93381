"""Lightning workloads for the tests and benchmarks: a tiny module whose optimizer and LR schedule have state,
and a stateful loader of numbered batches (so a resume can be checked batch by batch)."""

from __future__ import annotations

from typing import Any

import torch
from actions import act

try:
    import lightning.pytorch as pl
except ModuleNotFoundError:  # pragma: no cover - the pytorch_lightning smoke test
    import pytorch_lightning as pl  # type: ignore[no-redef]


class Batches:
    """``n`` numbered batches of (x, y, index) for one rank, the same on every run (seeded by the index):
    stateful, so Lightning resumes it mid-epoch. ``seen`` records the indexes of the batches trained on.

    Lightning fetches one batch ahead of the one it trains on, so the state is the number of batches the
    training step *used* (counted by :class:`Tiny`), not the number this iterator produced."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, dim: int = 8) -> None:
        self.n, self.rank, self.world_size, self.dim = n, rank, world_size, dim
        self.start = 0
        self.consumed = 0
        """Batches of this epoch the training step used (set by :class:`Tiny`)."""

    def __len__(self) -> int:
        return self.n - self.start if self.start else self.n

    def __iter__(self) -> Any:
        start, self.start = self.start, 0
        self.consumed = start
        for i in range(start, self.n):
            index = i * self.world_size + self.rank
            g = torch.Generator().manual_seed(index)
            x = torch.randn(4, self.dim, generator=g)
            yield x, x.sum(dim=1, keepdim=True) * 0.5, torch.tensor(index)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = int(state["consumed"])


class Tiny(pl.LightningModule):
    """A linear model with SGD + momentum and a step LR schedule: a resume that lost either differs."""

    def __init__(self, dim: int = 8, lr: float = 0.05, loader: Batches | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.lr = lr
        self.loader = loader
        self.seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        self.seen.append(int(index))
        if self.loader is not None:
            self.loader.consumed += 1
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, batch_size=x.shape[0])
        return loss

    fail_save: tuple[int, int] | None = None
    """``(rank, step)``: a hook of the user's that raises while that rank saves at that step."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.fail_save is not None and (self.global_rank, self.trainer.global_step) == tuple(self.fail_save):
            raise OSError(28, "No space left on device (injected)")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss, sync_dist=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                                                    "interval": "step"}}


class Sharded(Tiny):
    """:class:`Tiny` sharded with FSDP2 in ``configure_model`` (``RayModelParallelStrategy``)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def make_actions_callback(config: dict, run_dir: str, rank: int) -> Any:
    """What a user does from outside, done by rank 0 at known optimizer steps (``actions``: ``{step: [...]}``)
    and at a validation loop's first batch (``val_actions``); records every rank's steps."""
    import time

    class Actions(pl.Callback):
        def __init__(self) -> None:
            self.record: dict = {"rank": rank, "steps": []}
            self.last = -1

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.record["begin_step"] = self.last = trainer.global_step
            self.record["begin_lr"] = trainer.optimizers[0].param_groups[0]["lr"]

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            step = trainer.global_step
            if step == self.last:
                return
            self.last = step
            self.record["steps"].append(step)
            time.sleep(config.get("step_time", 0.0))
            if rank == 0:
                for action in config.get("actions", {}).get(str(step), []):
                    act(run_dir, action)

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int,
                                    dataloader_idx: int = 0) -> None:
            if trainer.sanity_checking:
                return
            if rank == 0 and idx == 0:
                self.record.setdefault("validated_at", []).append(trainer.global_step)
                for action in config.get("val_actions", []):
                    act(run_dir, action)
            time.sleep(config.get("val_batch_time", 0.0))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.record["final_step"] = trainer.global_step

    return Actions()


def train_fn(config: dict) -> None:
    """One Ray Train worker: a Lightning ``Trainer`` (``RayDDPStrategy``, or ``RayModelParallelStrategy`` with
    ``config["model"] == "fsdp"``) with the dynamic checkpoint callback, resumed with ``resume_path()``."""
    import json
    import os

    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayFSDPStrategy, RayLightningEnvironment, prepare_trainer

    from ray_dyncheck.lightning import DynamicCheckpointCallback, RayModelParallelStrategy, resume_path

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = ctx.get_storage().experiment_fs_path
    torch.manual_seed(0)
    loader = Batches(config.get("batches", 40), rank, world)
    sharded = config.get("model") == "fsdp"
    fsdp1 = config.get("model") == "fsdp1"  # Lightning's FSDPStrategy: GPUs only (the GPU test)
    model = (Sharded if sharded else Tiny)(loader=loader)
    model.fail_save = config.get("fail_save")
    actions = make_actions_callback(config, run_dir, rank)
    callback = DynamicCheckpointCallback(config["dynamic_checkpoint"])
    val = config.get("val_every")
    trainer = pl.Trainer(
        max_steps=config["steps"], accelerator="gpu" if config.get("gpu") else "cpu", devices="auto",
        strategy=RayModelParallelStrategy() if sharded else RayFSDPStrategy() if fsdp1 else RayDDPStrategy(),
        plugins=[RayLightningEnvironment()], callbacks=[callback, actions], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=0,
        val_check_interval=val, limit_val_batches=config.get("val_batches", 3) if val else 0,
        check_val_every_n_epoch=None if val else 1)
    if not sharded:
        trainer = prepare_trainer(trainer)
    ckpt = resume_path()
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=Batches(8, rank, world) if val else None,
                ckpt_path=ckpt, weights_only=True if ckpt else None)
    out = config["out"]
    os.makedirs(out, exist_ok=True)
    record = actions.record | {"seen": model.seen, "resumed_from": ckpt,
                               "saves": [s["step"] for s in callback.saves]}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in model.state_dict().items()}  # every rank: full_tensor is a collective
    if rank == 0:
        torch.save(state, os.path.join(out, "final.pt"))
