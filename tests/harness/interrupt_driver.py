"""The driver process the interrupt tests and the interrupt benchmark signal: a local Ray (or the
cluster at ``RAY_ADDRESS``), a TorchTrainer with 2 CPU workers, ``rdc.fit(trainer)``. Run as a process:

    python tests/harness/interrupt_driver.py STORAGE NAME OUT READY_FILE [dynamic_checkpoint JSON] [steps] [extra JSON]

The workers run one of three workloads (from ``ray_workloads``, sent by value: they need not import
this folder):

  tests     ``train_fn``, the default: rank 0 creates READY_FILE at step 3 and does ``extra["actions"]``
            (``{step: [...]}``, see ``actions.py``); ``extra["model"] = "fsdp"`` shards the model
            with FSDP2
  lightning ``lightning_workloads.train_fn`` (``extra["workload"] = "lightning"``): a Lightning Trainer
            with the Lightning callback; READY_FILE and ``actions`` as for ``tests``
  progress  ``progress_train_fn`` (``extra["workload"] = "progress"``, the benchmark's): rank 0 logs
            every step to ``OUT/progress.log`` and writes READY_FILE once the first scheduled
            checkpoint is committed and ``extra["ready_steps"]`` (default 5) more steps have run

The other keys of ``extra``: ``plan`` (PATH: the run is stored on ``faultfs.fault_fs(PATH)``),
``placement`` (``"STRICT_SPREAD"`` puts the workers on different nodes, with ``RAY_ADDRESS`` set),
``step_time`` (seconds a step sleeps, default 0.02), ``num_cpus`` (the local Ray's, default 4),
``max_failures`` (``FailureConfig``'s, default 0) and ``plain`` (run ``trainer.fit()``, Ray's own SIGINT
handling, instead of ``rdc.fit(trainer)``).
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402
import ray_by_value  # noqa: E402
from ray.train import FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

import faultfs  # noqa: E402
import ray_dyncheck as rdc  # noqa: E402
import ray_workloads  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    storage, name, out, ready = sys.argv[1:5]
    dc = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 100_000
    extra = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    os.makedirs(out, exist_ok=True)
    ray_by_value.register()  # the controller and workers get faultfs's class too
    config = {"steps": steps, "step_time": extra.get("step_time", 0.02), "dynamic_checkpoint": dc, "out": out}
    if extra.get("workload") == "lightning":
        import lightning_workloads

        train_fn = lightning_workloads.train_fn
        config.update(actions={"3": [f"ready:{ready}"], **extra.get("actions", {})}, model=extra.get("model"))
    elif extra.get("workload", "tests") == "progress":
        train_fn = ray_workloads.progress_train_fn
        config.update(ready=ready, ready_steps=extra.get("ready_steps", 5))
    else:
        train_fn = ray_workloads.train_fn
        config.update(actions={"3": [f"ready:{ready}"], **extra.get("actions", {})}, model=extra.get("model"))
    fs = faultfs.fault_fs(extra["plan"]) if "plan" in extra else None
    if os.environ.get("RAY_ADDRESS"):  # a job under `ray job submit`, or a test's cluster: join it
        ray.init()
    else:
        ray.init(num_cpus=extra.get("num_cpus", 4), include_dashboard=False)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, placement_strategy=extra.get("placement", "PACK")),
        run_config=RunConfig(name=name, storage_path=storage, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=extra.get("max_failures", 0))),
    )
    print(f"driver {os.getpid()}: {'trainer.fit()' if extra.get('plain') else 'rdc.fit(trainer)'}", flush=True)
    result = trainer.fit() if extra.get("plain") else rdc.fit(trainer)
    print(f"fit returned; latest checkpoint: {result.checkpoint.path if result.checkpoint else None}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
