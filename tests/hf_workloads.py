"""The Hugging Face ``Trainer`` run the HF tests start in real TorchTrainer workers (CPU, gloo).

Sent to workers by value (see test_hf), so workers need not import the tests folder. The model is a
tiny Llama built from a config (nothing is downloaded); its embeddings are tied, as in many small
models.
"""

from __future__ import annotations

import json
import os
import time

import torch

import ray_dyncheck as rdc


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


class Sequences(torch.utils.data.Dataset):
    """Deterministic token sequences: a resumed run sees what an uninterrupted one would have."""

    def __init__(self, n: int = 64, length: int = 12) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_actions_callback(config: dict, run_dir: str, rank: int):
    from transformers import TrainerCallback

    class Actions(TrainerCallback):
        """What a user does from outside, done by rank 0 at known steps; records what every rank saw."""

        def __init__(self) -> None:
            self.record: dict = {"rank": rank, "steps": []}

        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            self.record["begin_step"] = state.global_step
            self.record["begin_lr"] = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None

        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(config.get("step_time", 0.0))
            self.record["steps"].append([state.global_step, bool(control.should_save),
                                         bool(control.should_training_stop)])
            if rank == 0:
                for action in config.get("actions", {}).get(str(state.global_step), []):
                    act(run_dir, action)

        def on_train_end(self, args, state, control, **kwargs):
            self.record["final_step"] = state.global_step

    return Actions()


def act(run_dir: str, action: str) -> None:
    trigger = os.path.join(run_dir, "dyncheck.save")
    if action == "touch":
        open(trigger, "a").close()
        wait_until(lambda: not os.path.exists(trigger), "the poller to claim the trigger")
    elif action.startswith("request:"):
        body = json.loads(action.split(":", 1)[1])
        folder = os.path.join(run_dir, ".dyncheck", "requests")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{body['id']}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(body, f)
        os.rename(path + ".tmp", path)
        wait_until(lambda: not os.path.exists(path), "the poller to claim the request")
    elif action.startswith("ready:"):  # tell the test process that training is under way
        open(action.split(":", 1)[1], "a").close()
    else:
        raise ValueError(action)


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def train_fn(config: dict) -> None:
    import ray.train
    from transformers import Trainer, TrainingArguments

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    run_dir = ctx.get_storage().experiment_fs_path
    args = TrainingArguments(
        # Shared by both ranks (one node), or one per rank, as node-local disks on several nodes are.
        output_dir=os.path.join(config["out"], f"hf-rank{rank}" if config.get("output_dir_per_rank") else "hf"),
        max_steps=config["steps"],
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        save_strategy=config.get("save_strategy", "steps"),
        save_steps=config.get("save_steps", 10),
        logging_steps=5,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        save_only_model=config.get("save_only_model", False),
    )
    actions = make_actions_callback(config, run_dir, rank)
    callbacks = [rdc.DynamicCheckpointCallback(config["dynamic_checkpoint"]), actions]
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=rdc.hf_resume_path())
    out = config["out"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(actions.record, f)
    if rank == 0:
        torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, os.path.join(out, "final.pt"))


def gloo_worker(rank: int, world_size: int, port: int, run_dir: str, out: str) -> None:
    """HF Trainer under plain torch.distributed (no Ray) with LocalBackend: what torchrun users get."""
    from datetime import timedelta

    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    args = TrainingArguments(output_dir=os.path.join(out, "hf"), max_steps=4, per_device_train_batch_size=4,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             ddp_find_unused_parameters=False)
    actions = make_actions_callback({"actions": {"1": ["touch"]}}, run_dir, rank)
    callback = rdc.DynamicCheckpointCallback({"check_interval": 2, "poll_interval_s": 0.05},
                                             backend=rdc.LocalBackend(run_dir))
    import logging

    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ray_dyncheck").addHandler(handler)
    Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), callbacks=[callback, actions]).train()
    actions.record["errors"] = errors
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(actions.record | {"saves": [s["step"] for s in callback.saves]}, f)
    dist.destroy_process_group()
