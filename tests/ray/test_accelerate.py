"""A plain loop written with Hugging Face Accelerate inside Ray's TorchTrainer (2 CPU workers: Accelerate's
``MULTI_CPU``, DDP over gloo), checkpointed by the plain hook on what ``accelerator.prepare`` returned: a
trigger saves, and the same run resumes from it to bitwise the same weights as without the stop."""

from __future__ import annotations

import json

import torch

from ray_workloads import accelerate_train_fn


def make_trainer(storage, out, **config):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {"steps": 10, "out": str(out), "dynamic_checkpoint": {"check_interval": 2, "poll_interval_s": 0.05},
              **config}
    return TorchTrainer(accelerate_train_fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=2),
                        run_config=RunConfig(name="run", storage_path=str(storage)))


def test_the_hook_checkpoints_an_accelerate_loop_and_resumes_it(ray_local, tmp_path):
    storage = tmp_path / "results"
    # Touched after step 3 (claimed at once): the check at step 4 saves; the run ends at step 6. The second
    # fit of the same run resumes from step 4 and trains to 10.
    make_trainer(storage, tmp_path / "a", steps=6,
                 actions={"3": ["touch_until_claimed"]}).fit()
    first = [json.load(open(tmp_path / "a" / f"rank{r}.json")) for r in range(2)]
    assert {r["distributed_type"] for r in first} == {"DistributedType.MULTI_CPU"}
    assert first[0]["saves"] == [[4, "full", "trigger"]]
    make_trainer(storage, tmp_path / "b").fit()
    second = [json.load(open(tmp_path / "b" / f"rank{r}.json")) for r in range(2)]
    assert [r["start"] for r in second] == [4, 4] and second[0]["final_step"] == 10

    make_trainer(tmp_path / "straight", tmp_path / "c").fit()  # the same 10 steps, never stopped
    straight = torch.load(tmp_path / "c" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "bitwise the uninterrupted run's weights"
    assert json.load(open(tmp_path / "c" / "rank0.json"))["lr"] == second[0]["lr"]
