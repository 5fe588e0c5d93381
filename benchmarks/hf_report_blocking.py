"""How long each HF save blocks training in ``on_save``: Ray's ``RayTrainReportCallback`` (copy the
checkpoint, synchronous report) vs ``DynamicCheckpointCallback`` (hard links, asynchronous upload).

Both run in the same Ray instance, on the same model and schedule, alternating, so the machine's
noise hits both. HF's own write of ``checkpoint-N`` is the same for both and not counted.

    python benchmarks/hf_report_blocking.py                 # 19 M parameters, 3 saves per run, 2 rounds
    python benchmarks/hf_report_blocking.py --hidden 1024   # 59 M parameters
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


def _config(hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)


def _params(hidden: int) -> int:
    from transformers import LlamaForCausalLM

    return sum(p.numel() for p in LlamaForCausalLM(_config(hidden)).parameters())


def train_fn(config: dict) -> None:
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    import ray_dyncheck as rdc

    rank = ray.train.get_context().get_world_rank()
    reporter = (RayTrainReportCallback() if config["variant"] == "ray"
                else rdc.DynamicCheckpointCallback({"check_interval": 1_000_000}))
    seconds: list[float] = []
    inner = reporter.on_save

    def timed_on_save(*args, **kwargs):
        t0 = time.perf_counter()
        inner(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)

    reporter.on_save = timed_on_save  # type: ignore[method-assign]
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(config["hidden"]))
    ids = torch.randint(0, 8192, (256, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=config["saves"] * 5, save_strategy="steps", save_steps=5,
                                 per_device_train_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True,
                                 ddp_find_unused_parameters=False, save_total_limit=2)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[reporter]).train()
    if rank == 0:
        with open(config["result"], "w") as f:
            json.dump(seconds, f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[float]] = {"ray": [], "dyncheck": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in (("ray", "dyncheck") if r % 2 == 0 else ("dyncheck", "ray")):
                result = os.path.join(tmp, f"{variant}{r}.json")
                TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=2),
                             train_loop_config={"variant": variant, "hidden": args.hidden, "saves": args.saves,
                                                "result": result},
                             run_config=RunConfig(name=f"{variant}{r}", storage_path=os.path.join(tmp, "results"))
                             ).fit()
                with open(result) as f:
                    results[variant] += json.load(f)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"hidden={args.hidden} ({_params(args.hidden) / 1e6:.0f} M parameters, fp32, AdamW): on_save blocks "
          f"training for (median of {len(results['ray'])} saves, rank 0):")
    print(f"  RayTrainReportCallback    {med['ray']:.3f} s")
    print(f"  DynamicCheckpointCallback {med['dyncheck']:.3f} s   ({med['ray'] / med['dyncheck']:.0f}x less)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
