"""The driver process ``benchmarks/interrupt.py`` signals: local Ray, a TorchTrainer with 2 CPU workers.

    python benchmarks/interrupt_driver.py STORAGE NAME OUT READY_FILE [dynamic_checkpoint JSON] [steps] [extra JSON]

The same shape of arguments as ``tests/interrupt_driver.py``, with no dependency on the tests. Each worker
trains a small MLP (DDP, gloo) with ~20 ms steps under ``rdc.DynamicCheckpoint``. World rank 0 appends
``step unix_time`` to ``OUT/progress.log`` after every step and writes READY_FILE once the first
scheduled checkpoint (``save_steps``) is committed and ``extra["ready_steps"]`` (default 5) more steps
have run, or after those steps when nothing is scheduled. ``extra["plain"]``: run ``trainer.fit()``
(Ray's own SIGINT handling) instead of ``rdc.fit(trainer)``; the workers are the same.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


def train_fn(config: dict[str, Any]) -> None:
    """Every worker: train until ``config["steps"]`` or until the hook says stop. Sent to the workers by
    value (this file runs as ``__main__``), so they need not import the benchmarks folder."""
    import ray.train
    import torch
    import torch.nn as nn
    from ray.train.torch import prepare_model

    import ray_dyncheck as rdc

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


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    storage, name, out, ready = sys.argv[1:5]
    dc = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 100_000
    extra = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    os.makedirs(out, exist_ok=True)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import ray_dyncheck as rdc

    ray.init(num_cpus=2, include_dashboard=False)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"steps": steps, "step_time": extra.get("step_time", 0.02), "dynamic_checkpoint": dc,
                           "out": out, "ready": ready, "ready_steps": extra.get("ready_steps", 5)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    print(f"driver {os.getpid()}: {'trainer.fit()' if extra.get('plain') else 'rdc.fit(trainer)'}", flush=True)
    result = trainer.fit() if extra.get("plain") else rdc.fit(trainer)
    print(f"fit returned; latest checkpoint: {result.checkpoint.path if result.checkpoint else None}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
