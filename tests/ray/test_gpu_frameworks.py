"""The sharded layouts that need GPUs, end to end in Ray's TorchTrainer (2 GPU workers, NCCL): HF ``Trainer`` under
FSDP2 (``SHARDED_STATE_DICT``) and under DeepSpeed ZeRO-3 with the HF callback; Lightning's ``RayFSDPStrategy``
(FSDP1) with the Lightning callback; a loop with Accelerate's FSDP2 plugin and the hook. On CPU workers Accelerate
ignores the FSDP plugin, DeepSpeed wants an accelerator through Accelerate, and Lightning's FSDP1 refuses the CPU,
so these are skipped here, with that reason; they have not yet run on GPUs; the same layouts' files are tested on
CPU (``tests/gloo/``, ``tests/unit/``).

On a machine with 2 GPUs (about 3 minutes; DeepSpeed's case only where ``deepspeed`` imports):

    python -m pytest -m gpu -p no:cacheprovider tests/ray/test_gpu_frameworks.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA GPUs: HF FSDP2 / DeepSpeed ZeRO-3 and Lightning FSDP1 shard over NCCL, "
                              "one GPU per Ray worker; on CPU workers Accelerate and Lightning do not run them"),
]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray
    import ray_by_value

    ray_by_value.register()
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def fit(train_fn, storage, name, out, **config):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {"out": str(out), "gpu": True, "dynamic_checkpoint": {"check_interval": 5, "poll_interval_s": 0.05},
              "steps": 10, **config}
    return TorchTrainer(train_fn, train_loop_config=config,
                        scaling_config=ScalingConfig(num_workers=2, use_gpu=True),
                        run_config=RunConfig(name=name, storage_path=str(storage),
                                             checkpoint_config=CheckpointConfig(num_to_keep=None))).fit()


def reported(result):
    return sorted(((c.get_metadata()["step"], c.get_metadata(), c.path) for c, _ in result.best_checkpoints),
                  key=lambda t: t[0])


ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}


@pytest.mark.parametrize("layout", ["fsdp2", "zero3"])
def test_hf_sharded_trigger_weights_request_resume_and_export(ray_gpu, tmp_path, layout):
    """A trigger after step 2 saves at 5; a weights request after step 6 saves at 10 as a full checkpoint (a
    sharded layout has no weights-only save); every rank's shard is in the manifest; the run resumes from step
    10; ``ray-dyncheck export`` (FSDP2) or HF's gathered weights (ZeRO-3) load with ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    import ray_dyncheck as rdc
    from hf_workloads import train_fn

    if layout == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    sharding = {"fsdp": True} if layout == "fsdp2" else {"deepspeed": ZERO3}
    storage = tmp_path / "results"
    actions = {"2": ["touch_until_claimed"], "6": ['request_until_claimed:{"id": "w", "kind": "weights"}']}
    result = fit(train_fn, storage, "run", tmp_path / "a", steps=10, save_strategy="no", actions=actions, **sharding)
    ckpts = reported(result)
    assert [(s, m["kind"], m["reason"]) for s, m, _ in ckpts] == [(5, "full", "trigger"), (10, "full", "request")]
    files = set(json.load(open(os.path.join(ckpts[1][2], "dyncheck.json")))["files"])
    if layout == "fsdp2":
        assert {"pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"} <= files
    else:
        assert any("zero_pp_rank_0_" in f for f in files) and any("zero_pp_rank_1_" in f for f in files)
    fit(train_fn, storage, "run", tmp_path / "b", steps=12, save_strategy="no", **sharding)
    assert [json.load(open(tmp_path / "b" / f"rank{r}.json"))["begin_step"] for r in range(2)] == [10, 10]
    if layout == "fsdp2":
        out = tmp_path / "export"
        rdc.export_checkpoint(ckpts[1][2], str(out))
        AutoModelForCausalLM.from_pretrained(str(out))
    else:
        AutoModelForCausalLM.from_pretrained(ckpts[1][2])


def test_lightning_fsdp1_trigger_and_resume(ray_gpu, tmp_path):
    """``RayFSDPStrategy``: a trigger saves mid-epoch; the same run resumes from it at that step."""
    from lightning_workloads import train_fn

    storage = tmp_path / "results"
    result = fit(train_fn, storage, "run", tmp_path / "a", steps=8, model="fsdp1",
                 actions={"2": ["touch_until_claimed"]})
    assert [(s, m["kind"]) for s, m, _ in reported(result)] == [(5, "full")]
    fit(train_fn, storage, "run", tmp_path / "b", steps=8, model="fsdp1")
    assert json.load(open(tmp_path / "b" / "rank0.json"))["begin_step"] == 5


def test_accelerate_fsdp2_loop_with_the_hook_trigger_and_resume_bitwise(ray_gpu, tmp_path):
    """Accelerate's FSDP2 plugin shards the model ``accelerator.prepare`` returns; the hook saves it through
    DCP; the run resumes from the trigger's checkpoint to the weights of a run that never stopped."""
    from ray_workloads import accelerate_train_fn

    fit(accelerate_train_fn, tmp_path / "results", "run", tmp_path / "a", steps=6, fsdp2=True,
        actions={"3": ["touch_until_claimed"]}, dynamic_checkpoint={"check_interval": 2, "poll_interval_s": 0.05})
    assert json.load(open(tmp_path / "a" / "rank0.json"))["saves"] == [[4, "full", "trigger"]]
    fit(accelerate_train_fn, tmp_path / "results", "run", tmp_path / "b", steps=10, fsdp2=True)
    fit(accelerate_train_fn, tmp_path / "straight", "run", tmp_path / "c", steps=10, fsdp2=True)
    a = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "c" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)
