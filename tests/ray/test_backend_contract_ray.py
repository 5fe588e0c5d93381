"""The Ray backend keeps the Backend contract, inside a real Ray Train worker (the same steps as
LocalBackend's in tests/unit/test_backend_contract.py)."""

from __future__ import annotations

import json
import os
import sys

from backend_contract import check_backend  # a global: sent to the worker by value, with this module


def contract_fn(config):
    from ray_dyncheck._backends.ray import RayBackend

    seen = check_backend(RayBackend())
    with open(config["out"], "w") as f:
        json.dump(seen, f)


def test_ray_backend_keeps_the_contract(ray_local, tmp_path):
    import backend_contract
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(backend_contract)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # contract_fn: workers cannot import tests/
    out = tmp_path / "seen.json"
    result = TorchTrainer(contract_fn, train_loop_config={"out": str(out)},
                          scaling_config=ScalingConfig(num_workers=1),
                          run_config=RunConfig(name="contract", storage_path=str(tmp_path / "results"))).fit()
    assert result.error is None
    seen = json.loads(out.read_text())
    assert seen["type"] == "RayBackend" and seen["listed"] == 1
    assert os.path.basename(seen["path"]) == "checkpoint_00000003_full_contract1"
    assert [os.path.basename(c.path) for c, _ in result.best_checkpoints] == [os.path.basename(seen["path"])]
