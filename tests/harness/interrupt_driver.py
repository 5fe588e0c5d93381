"""A driver script for the interrupt tests: local Ray, TorchTrainer, ``rdc.fit``. Run as a process.

    python tests/interrupt_driver.py STORAGE NAME OUT READY_FILE [dynamic_checkpoint JSON] [steps] [extra JSON]

``extra``: ``{"plan": PATH}`` stores the run on ``faultfs.fault_fs(PATH)``; ``{"actions": {step: [...]}}``
adds rank 0's actions (see ``ray_workloads.act``); ``{"model": "fsdp"}`` shards the model with FSDP2;
``{"placement": "STRICT_SPREAD"}`` puts the workers on different nodes (with ``RAY_ADDRESS`` set).
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

import faultfs  # noqa: E402
import ray_dyncheck as rdc  # noqa: E402
import ray_workloads  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    storage, name, out, ready = sys.argv[1:5]
    dc = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 100_000
    extra = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    ray.cloudpickle.register_pickle_by_value(ray_workloads)
    ray.cloudpickle.register_pickle_by_value(faultfs)  # the controller and workers get the class too
    actions = {"3": [f"ready:{ready}"], **extra.get("actions", {})}
    fs = faultfs.fault_fs(extra["plan"]) if "plan" in extra else None
    if os.environ.get("RAY_ADDRESS"):  # a job under `ray job submit`: join its cluster
        ray.init()
    else:
        ray.init(num_cpus=4, include_dashboard=False)
    trainer = TorchTrainer(
        ray_workloads.train_fn,
        train_loop_config={"steps": steps, "step_time": 0.02, "dynamic_checkpoint": dc, "out": out,
                           "actions": actions, "model": extra.get("model")},
        scaling_config=ScalingConfig(num_workers=2, placement_strategy=extra.get("placement", "PACK")),
        run_config=RunConfig(name=name, storage_path=storage, storage_filesystem=fs),
    )
    result = rdc.fit(trainer)
    print(f"fit returned; latest checkpoint: {result.checkpoint.path if result.checkpoint else None}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
