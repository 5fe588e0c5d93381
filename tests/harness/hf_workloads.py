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
from actions import act

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

        def on_step_begin(self, args, state, control, **kwargs):
            if args.save_only_model:  # the user's value is False in these runs
                self.record.setdefault("save_only_model_while_training", []).append(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            # After DynamicCheckpointCallback's on_save: the user's value, also after a weights-only save.
            self.record.setdefault("save_only_model_on_save", []).append(args.save_only_model)

        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(config.get("step_time", 0.0))
            self.record["steps"].append([state.global_step, bool(control.should_save),
                                         bool(control.should_training_stop)])
            if rank == 0:
                for action in config.get("actions", {}).get(str(state.global_step), []):
                    act(run_dir, action)

        def on_prediction_step(self, args, state, control, **kwargs):
            # An evaluation inside train(): rank 0 does eval_actions at the first batch of the first one (a
            # list) or of the one after that step (a dict); every batch is slow.
            if rank == 0 and not self.record.get("evaluating"):
                self.record["evaluating"] = True
                self.record.setdefault("evaluated_at", []).append(state.global_step)
                planned = config.get("eval_actions", [])
                if isinstance(planned, dict):
                    todo = planned.get(str(state.global_step), [])
                else:
                    todo = planned if len(self.record["evaluated_at"]) == 1 else []
                for action in todo:
                    act(run_dir, action)
            time.sleep(config.get("eval_batch_time", 0.0))

        def on_evaluate(self, args, state, control, **kwargs):
            self.record["evaluating"] = False

        def on_train_end(self, args, state, control, **kwargs):
            self.record["final_step"] = state.global_step
            self.record["save_only_model_at_end"] = args.save_only_model

    return Actions()


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
        use_cpu=not config.get("gpu"),
        seed=0,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        save_only_model=config.get("save_only_model", False),
        # The GPU test's sharded layouts (HF runs neither on CPU workers): FSDP2 with the sharded state dict,
        # or a DeepSpeed config.
        **({"fsdp": "full_shard", "fsdp_config": {"version": 2, "state_dict_type": "SHARDED_STATE_DICT",
                                                   "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
           if config.get("fsdp") else {}),
        **({"deepspeed": config["deepspeed"]} if config.get("deepspeed") else {}),
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
    """HF Trainer under plain torch.distributed (no Ray) with LocalBackend: what torchrun users get.

    Three trainings of up to 6 steps, one run directory. ``first``: a touch after step 1 (a full save
    at 2), a weights request with stop after step 2 (a weights save at 4, then it stops). ``weights``:
    resumes with ``hf_resume_path`` (the weights checkpoint). ``damaged``: rank 0 deletes rank 1's RNG
    file from that checkpoint first, so ``hf_resume_path`` must choose the full one. Then rank 1 looks
    for the checkpoints through a filesystem that does not hold them.
    """
    import logging
    from datetime import timedelta

    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ray_dyncheck").addHandler(handler)

    def train(phase: str, actions: dict, resume: bool) -> dict:
        args = TrainingArguments(output_dir=os.path.join(out, phase), max_steps=6, per_device_train_batch_size=4,
                                 save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                                 ddp_find_unused_parameters=False)
        backend = rdc.LocalBackend(run_dir)
        path = rdc.hf_resume_path(backend=backend) if resume else None
        recorder = make_actions_callback({"actions": actions}, run_dir, rank)
        callback = rdc.DynamicCheckpointCallback({"check_interval": 2, "poll_interval_s": 0.05}, backend=backend)
        Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), callbacks=[callback, recorder]).train(
            resume_from_checkpoint=path)
        return recorder.record | {"saves": [s["step"] for s in callback.saves], "resumed_from": path,
                                  "save_only_model": args.save_only_model}

    # The weights request waits (at step 3) until the full save from step 2 is committed: one still in
    # flight at the check of step 4 would answer it (a full save covers a weights stop).
    first = {"1": ["touch_until_claimed"], "2": ['request_until_claimed:{"id": "w", "kind": "weights", "stop": true}'],
             "3": ["committed:1"]}
    records = {"first": train("first", first, resume=False)}
    records["weights"] = train("weights", {}, resume=True)
    if rank == 0:
        newest = next(rdc.LocalBackend(run_dir).checkpoints())
        os.remove(os.path.join(newest, "rng_state_1.pth"))
    dist.barrier()
    records["damaged"] = train("damaged", {}, resume=True)
    records["errors"] = list(errors)
    # Rank 1 cannot reach the checkpoint rank 0 chose (as a node that does not see rank 0's disk):
    # every rank raises, with the same message.
    if rank == 0:
        backend = rdc.LocalBackend(run_dir)
    else:
        import pyarrow.fs as pafs

        elsewhere = pafs.SubTreeFileSystem(os.path.join(out, "elsewhere"), pafs.LocalFileSystem())
        backend = rdc.LocalBackend(run_dir, filesystem=elsewhere)
    try:
        records["unreachable"] = rdc.hf_resume_path(backend=backend)
    except rdc.CheckpointRestoreError as exc:
        records["unreachable"] = str(exc)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    dist.destroy_process_group()


def fsdp_layout_worker(rank: int, world_size: int, port: int, run_dir: str, out: str) -> None:
    """HF Trainer on two gloo ranks (LocalBackend) whose ``checkpoint-N`` holds what HF writes under FSDP with
    ``SHARDED_STATE_DICT``: a ``pytorch_model_fsdp_0/`` DCP folder with every rank's shard (written here by DCP
    from an FSDP2-sharded copy of the model, as Accelerate writes it: ``{"model": state_dict}``) and no
    ``model.safetensors``. HF itself cannot run FSDP on CPU workers (Accelerate turns it on for accelerator
    devices only): the files are the same library's, the callback's code paths are the real ones. Then both
    ranks resume through ``hf_resume_path``."""
    import copy
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from transformers import Trainer, TrainerCallback, TrainingArguments

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))

    class FsdpFolder(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "pytorch_model_fsdp_0")
            sharded = fully_shard(copy.deepcopy(model))
            dcp.save({"model": sharded.state_dict()}, checkpoint_id=folder)
            dist.barrier()
            if rank == 0:
                os.remove(os.path.join(os.path.dirname(folder), "model.safetensors"))
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                torch.save(weights, os.path.join(out, f"weights-{state.global_step}.pt"))

    args = TrainingArguments(output_dir=os.path.join(out, "hf"), max_steps=4, per_device_train_batch_size=4,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             ddp_find_unused_parameters=False)
    backend = rdc.LocalBackend(run_dir)
    callback = rdc.DynamicCheckpointCallback({"check_interval": 2, "poll_interval_s": 0.05}, backend=backend)
    recorder = make_actions_callback({"actions": {"1": ["touch_until_claimed"]}}, run_dir, rank)
    Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(),
            callbacks=[FsdpFolder(), callback, recorder]).train()
    resumed = rdc.hf_resume_path(backend=rdc.LocalBackend(run_dir))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"saves": [s["step"] for s in callback.saves], "resumed": resumed,
                   "listing": sorted(os.listdir(os.path.join(resumed, "pytorch_model_fsdp_0")))}, f)
    dist.destroy_process_group()


def ours() -> dict:
    """What of ours this process holds: ``dyncheck-*`` threads, process groups, ``dyncheck-*`` entries
    of the temporary directory (torch puts its own caches there too)."""
    import tempfile
    import threading

    import torch.distributed as dist

    groups = len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0
    return {"threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("dyncheck-")),
            "groups": groups,
            "tmp": sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith("dyncheck"))}


def settled(baseline: dict, timeout: float = 5.0) -> dict:
    """:func:`ours` once it is back to ``baseline`` (a stopped thread may take a moment to end), or as
    it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    now = ours()
    while now != baseline and time.monotonic() < deadline:
        time.sleep(0.02)
        now = ours()
    return now


def make_raise_callback(step: int):
    """Raises out of ``Trainer.train()`` at the end of ``step`` (after every other callback)."""
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError(f"boom at step {step}")

    return Boom()


def leaks_worker(rank: int, world_size: int, port: int, run_dir: str, out: str) -> None:
    """HF ``Trainer.train()`` that raises at step 4, after a save at step 2 whose commit rank 0 waited
    for (so the poller, the commit and store threads and the side group all exist), on real gloo
    ranks. ``with``: the backend and the callback are context managers. ``next_train``: neither is;
    a new training in the same thread releases what the one that raised left. Records :func:`ours`
    at each point (and any error) in ``<out>/rank<r>.json``."""
    import tempfile
    from datetime import timedelta

    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    tempfile.tempdir = os.path.join(out, f"tmp{rank}")
    os.makedirs(tempfile.tempdir)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    config = {"check_interval": 2, "poll_interval_s": 0.05}
    record: dict = {"baseline": ours()}

    def trainer(phase: str, callback, steps: int = 6, actions: dict | None = None, boom: int | None = None):
        args = TrainingArguments(output_dir=os.path.join(out, phase), max_steps=steps, per_device_train_batch_size=4,
                                 save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                                 ddp_find_unused_parameters=False)
        callbacks = [callback, make_actions_callback({"actions": actions or {}}, run_dir, rank)]
        if boom is not None:
            callbacks.append(make_raise_callback(boom))
        return Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), callbacks=callbacks)

    def phase(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:
            record[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        dist.barrier()

    def next_train() -> None:
        callback = rdc.DynamicCheckpointCallback(config, backend=rdc.LocalBackend(run_dir))
        try:
            trainer("raised", callback, actions={"1": ["touch_until_claimed"], "3": ["committed:1"]}, boom=4).train()
        except RuntimeError as exc:
            record["next_train_raised"] = str(exc)
        record["next_train_left"] = ours()
        again = rdc.DynamicCheckpointCallback(config, backend=rdc.LocalBackend(run_dir))
        trainer("again", again, steps=2).train()
        record["next_train"] = settled(record["baseline"])

    def with_blocks() -> None:
        try:
            with rdc.LocalBackend(run_dir) as backend, rdc.DynamicCheckpointCallback(config, backend=backend) as cb:
                trainer("with", cb, actions={"1": ["touch_until_claimed"], "3": ["committed:2"]}, boom=4).train()
        except RuntimeError as exc:
            record["with_raised"] = str(exc)
        record["with"] = settled(record["baseline"])

    phase("next_train", next_train)
    phase("with", with_blocks)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
