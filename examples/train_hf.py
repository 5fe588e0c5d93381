"""Hugging Face Trainer in Ray Train's TorchTrainer, with on-demand checkpoints from one callback.

Run it (a local, embedded Ray; 2 CPU workers; about a minute; nothing is downloaded):

    python examples/train_hf.py                         # trains, touches the trigger midway, saves once
    python examples/train_hf.py                         # run again: resumes from the newest checkpoint

While it trains you can ask for a checkpoint yourself from another terminal:

    touch /tmp/ray_dyncheck_hf/hf_quickstart/dyncheck.save

and Ctrl+C saves the weights (HF's `save_only_model` for that one save) before it stops (exit status
130); press it twice to stop at once. HF's own schedule (`--save-steps`) keeps saving too: every
checkpoint, scheduled or asked for, is reported to Ray with its kind, step, reason and request id.

Options:
    --config PATH         YAML with a `dynamic_checkpoint:` block (default: examples/config.yaml)
    --storage-path P      RunConfig.storage_path: a local path or a URI such as s3://bucket/prefix
    --name NAME           RunConfig.name; the run directory is <storage-path>/<name>/
    --steps N             Trainer max_steps (a resumed run continues to N)
    --save-steps N        HF's scheduled saves (save_strategy="steps")
    --num-workers N       Ray Train workers (CPU and gloo; with --use-gpu one GPU each and NCCL)
    --use-gpu             train on GPUs (a cluster with GPU nodes, e.g. cluster.yaml)
    --step-time S         extra seconds of sleep per step, to make the demo watchable
    --no-demo-trigger     do not touch the trigger file midway (trigger it yourself)
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import ray_dyncheck as rdc

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_causal_lm():
    """A 2-layer Llama built from a config (no hub download). Its input and output embeddings are tied,
    as in many small models; the checkpoint keeps them tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))


class ArithmeticSequences(torch.utils.data.Dataset):
    """Token sequences start, start+k, start+2k, ... (mod 64): generated here, learnable by a tiny model."""

    def __init__(self, n: int = 512, length: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, 64, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(length)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_loop_per_worker(config: dict) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rank = ray.train.get_context().get_world_rank()

    class Demo(TrainerCallback):
        """Slows steps down for watching, and plays the user who touches the trigger midway."""

        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(config["step_time"])
            if rank == 0 and config["demo_trigger"] and state.global_step == config["steps"] // 2:
                demo_touch(state.global_step)

    # HF's local scratch; the run's checkpoints live in Ray's storage. The callback waits for its
    # uploads when training ends, so the directory can go away right after.
    with tempfile.TemporaryDirectory(prefix="hf-output-") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=config["steps"],
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=10,
            save_strategy="steps",
            save_steps=config["save_steps"],
            save_total_limit=2,
            logging_steps=50,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            ddp_find_unused_parameters=False,
        )
        trainer = Trainer(
            model=tiny_causal_lm(),
            args=args,
            train_dataset=ArithmeticSequences(),
            # Replaces Ray's RayTrainReportCallback: it reports HF's checkpoints itself, with metadata.
            callbacks=[rdc.DynamicCheckpointCallback(config["dynamic_checkpoint"]), Demo()],
        )
        resume = rdc.hf_resume_path()  # None on a fresh run
        if rank == 0 and resume is not None:
            print(f"resuming from {resume}", flush=True)
        trainer.train(resume_from_checkpoint=resume)


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
    p.add_argument("--storage-path", default="/tmp/ray_dyncheck_hf")
    p.add_argument("--name", default="hf_quickstart")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--step-time", type=float, default=0.02)
    p.add_argument("--no-demo-trigger", action="store_true")
    p.add_argument("--use-gpu", action="store_true")
    args = p.parse_args()

    dc_config = rdc.DynamicCheckpointConfig.from_yaml(args.config)
    # Ray Train's print patch tees every print() of a worker into its logger: each line would show twice.
    # Workers of a local Ray inherit this; under `ray job submit` set it in --runtime-env-json.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`: join that cluster
        ray.init()
    else:  # a local, embedded Ray (never a stale one), with its dashboard: Ray Train's placement-group
        # cleaner asks the State API (served by the dashboard) every second and warns each time it cannot
        ray.init(address="local", num_cpus=max(2, args.num_workers))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"steps": args.steps, "save_steps": args.save_steps, "step_time": args.step_time,
                           "demo_trigger": not args.no_demo_trigger, "dynamic_checkpoint": dc_config.to_dict()},
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
