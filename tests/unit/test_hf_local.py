"""The HF callback without Ray, in this process (LocalBackend)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

import ray_dyncheck as rdc
from hf_workloads import Sequences, make_actions_callback, tiny_llama


def local_run(tmp_path):
    """A run directory with its start marker; a trigger touched from now on is not stale."""
    run_dir = tmp_path / "run"
    backend = rdc.LocalBackend(str(run_dir))
    time.sleep(0.05)
    return run_dir, backend


def touch_at_step_1(run_dir):
    """Touches the trigger after step 1 and returns once the poller claimed it."""
    return make_actions_callback({"actions": {"1": ["touch_until_claimed"]}}, str(run_dir), rank=0)


def hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, disable_tqdm=True, **kw)


def test_trigger_saves_one_hf_checkpoint_without_ray(tmp_path, caplog):
    from transformers import Trainer

    run_dir, backend = local_run(tmp_path)

    args = hf_args(tmp_path, max_steps=6)
    callback = rdc.DynamicCheckpointCallback({"check_interval": 2, "poll_interval_s": 0.05, "save_steps": 3},
                                             backend=backend)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(),
                      callbacks=[callback, touch_at_step_1(run_dir)])
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        trainer.train()
    assert any("dynamic_checkpoint.save_steps=3 is ignored with the HF callback" in r.getMessage()
               for r in caplog.records)

    saved = sorted(p for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert [p.name.split("_")[1] for p in saved] == ["00000002"], "one save, at the first check after the touch"
    meta = json.loads((saved[0] / ".metadata.json").read_text())
    assert (meta["kind"], meta["reason"], meta["step"]) == ("full", "trigger", 2)
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "dyncheck.json"} <= set(os.listdir(saved[0]))
    receipt = json.loads((run_dir / ".dyncheck" / "receipts" / f"{meta['request_id']}.json").read_text())
    assert (receipt["status"], receipt["checkpoint"]) == ("ok", str(saved[0]))
    assert callback.saves[0]["path"] == str(saved[0])
    assert list((tmp_path / "hf" / ".dyncheck-staging").iterdir()) == []


def test_epoch_save_on_a_triggered_step_saves_once(tmp_path):
    from transformers import Trainer

    run_dir, backend = local_run(tmp_path)

    # 64 samples / batch 4 = 16 steps per epoch: the check at step 16 is also the end of epoch 1.
    args = hf_args(tmp_path, max_steps=20, save_strategy="epoch")
    callback = rdc.DynamicCheckpointCallback({"check_interval": 16, "poll_interval_s": 0.05}, backend=backend)
    Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(),
            callbacks=[callback, touch_at_step_1(run_dir)]).train()
    assert [(s["step"], s["reason"]) for s in callback.saves] == [(16, "trigger"), (20, "schedule")]
    assert len([p for p in run_dir.iterdir() if p.name.startswith("checkpoint_")]) == 2


def test_a_save_that_hf_overrules_is_asked_for_again(tmp_path):
    """save_strategy="best" re-decides should_save after each evaluation: a requested save at a step
    whose evaluation is not a new best is not lost, it happens one step later; meanwhile the user's
    save_only_model is theirs again."""
    from transformers import Trainer

    run_dir, backend = local_run(tmp_path)

    # Evaluations at 2, 4, 6: the first is a new best (a save); the loss falls, and with
    # greater_is_better the later ones are not, so HF turns should_save off at step 4.
    args = hf_args(tmp_path, max_steps=6, save_strategy="best", eval_strategy="steps", eval_steps=2,
                   metric_for_best_model="loss", greater_is_better=True)
    callback = rdc.DynamicCheckpointCallback({"check_interval": 4, "poll_interval_s": 0.05}, backend=backend)
    # Asked after step 3 (the check at the end of the evaluation after step 2 would serve it sooner), once
    # the save of step 2 is stored (one still in flight defers the request to step 8, after the end: an
    # "unserved" receipt, which is not what this test is about).
    recorder = make_actions_callback({"actions": {"3": ["committed:1",
                                                        'request_until_claimed:{"id": "w", "kind": "weights"}']}},
                                     str(run_dir), rank=0)
    Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), eval_dataset=Sequences(8),
            callbacks=[callback, recorder]).train()
    assert [(s["step"], s["kind"], s["reason"]) for s in callback.saves] == [
        (2, "full", "schedule"), (5, "weights", "request")]
    receipts = list((run_dir / ".dyncheck" / "receipts").glob("*.json"))
    assert [json.loads(p.read_text())["step"] for p in receipts] == [5]
    # save_only_model was on for HF's saves at the ends of steps 4 and 5 only, never while training.
    assert "save_only_model_while_training" not in recorder.record
    assert recorder.record["save_only_model_on_save"] == [False, False] and args.save_only_model is False
    # At world size 1 HF names the RNG file rng_state.pth; save_only_model left it out, the callback did not.
    manifest = json.loads((Path(callback.saves[1]["path"]) / "dyncheck.json").read_text())
    assert {"rng_state.pth", "scheduler.pt", "model.safetensors"} <= set(manifest["files"])
    assert "optimizer.pt" not in manifest["files"]


def test_torch_hook_refuses_an_hf_checkpoint_with_the_fix(tmp_path):
    from ray_dyncheck._state import load_checkpoint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "dyncheck.json").write_text(json.dumps({"format_version": 1, "kind": "full", "step": 4,
                                                    "layout": "transformers", "files": {}}))
    with pytest.raises(ValueError, match=r"written by DynamicCheckpointCallback .* resume it with "
                                         r"trainer.train\(resume_from_checkpoint=rdc.hf_resume_path\(\)\)"):
        load_checkpoint(str(ckpt), model=tiny_llama(), optimizer=None, lr_scheduler=None, extra_state=None, rank=0)


def test_each_rank_owns_its_rng_file_and_its_dcp_shards():
    """Under FSDP's sharded state dict every rank writes ``__<rank>_0.distcp`` into HF's folders: that
    rank reports it (a node-local output_dir works), the rest is rank 0's. (HF Trainer under
    accelerate's FSDP itself is not run here: see docs/huggingface.md.)"""
    from ray_dyncheck._state.staging import owner

    owners = {p: owner(p) for p in ("rng_state_3.pth", "pytorch_model_fsdp_0/__2_0.distcp",
                                     "optimizer_0/__1_0.distcp", "pytorch_model_fsdp_0/.metadata",
                                     "trainer_state.json", "model.safetensors", "rng_state.pth")}
    assert owners == {"rng_state_3.pth": 3, "pytorch_model_fsdp_0/__2_0.distcp": 2, "optimizer_0/__1_0.distcp": 1,
                      "pytorch_model_fsdp_0/.metadata": 0, "trainer_state.json": 0, "model.safetensors": 0,
                      "rng_state.pth": 0}


def test_each_rank_owns_its_deepspeed_zero_partition():
    """DeepSpeed's ``global_step<N>/`` (as HF's Trainer writes it under ZeRO): each data-parallel rank's model
    and optimizer partition is that rank's; the model-parallel file and ``latest`` are rank 0's."""
    from ray_dyncheck._state.staging import owner

    owners = {p: owner(p) for p in ("global_step8/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                     "global_step8/zero_pp_rank_3_mp_rank_00_model_states.pt",
                                     "global_step8/fp16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
                                     "global_step8/mp_rank_00_model_states.pt", "latest", "zero_to_fp32.py")}
    assert owners == {"global_step8/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
                      "global_step8/zero_pp_rank_3_mp_rank_00_model_states.pt": 3,
                      "global_step8/fp16_zero_pp_rank_2_mp_rank_00_optim_states.pt": 2,
                      "global_step8/mp_rank_00_model_states.pt": 0, "latest": 0, "zero_to_fp32.py": 0}


def test_a_request_during_evaluation_is_served_at_its_end(tmp_path):
    """A request claimed while an evaluation inside ``train()`` runs (4 slow batches after step 4) is checked at
    the evaluation's end, whatever the interval: HF saves it right after, at step 4, not at the next regular
    check (step 10, after the end of this 8-step run)."""
    from transformers import Trainer

    run_dir, backend = local_run(tmp_path)
    args = hf_args(tmp_path, max_steps=8, save_strategy="no", eval_strategy="steps", eval_steps=4,
                   per_device_eval_batch_size=2)
    callback = rdc.DynamicCheckpointCallback({"check_interval": 10, "poll_interval_s": 0.05}, backend=backend)
    recorder = make_actions_callback({"eval_actions": ['request_until_claimed:{"id": "e", "kind": "full"}'],
                                      "eval_batch_time": 0.1}, str(run_dir), rank=0)
    Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), eval_dataset=Sequences(8),
            callbacks=[callback, recorder]).train()
    assert recorder.record["evaluated_at"] == [4, 8]
    assert [(s["step"], s["kind"], s["reason"]) for s in callback.saves] == [(4, "full", "request")]
    [receipt] = (run_dir / ".dyncheck" / "receipts").glob("*.json")
    assert (json.loads(receipt.read_text())["status"], json.loads(receipt.read_text())["step"]) == ("ok", 4)


def test_weights_only_is_full_under_hfs_sharded_layouts():
    """Which layouts make the callback save the full state for a weights-only request. Accelerate's state is
    built here as plain objects with the fields the check reads: on CPU workers Accelerate ignores the FSDP
    plugin and DeepSpeed needs an accelerator, so a real one cannot be made (the GPU test runs them)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import StateDictType

    from ray_dyncheck._hf.sharding import sharded_layout

    def fsdp(kind):
        return SimpleNamespace(distributed_type=DistributedType.FSDP, deepspeed_plugin=None,
                               fsdp_plugin=SimpleNamespace(state_dict_type=kind))

    assert sharded_layout(fsdp(StateDictType.SHARDED_STATE_DICT)) == "fsdp"
    # HF's resume under FSDP loads pytorch_model_fsdp.bin, which save_only_model leaves out
    assert sharded_layout(fsdp(StateDictType.FULL_STATE_DICT)) == "fsdp"
    assert sharded_layout(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, fsdp_plugin=None,
                                          deepspeed_plugin=object())) == "deepspeed"
    assert sharded_layout(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, fsdp_plugin=None,
                                          deepspeed_plugin=None)) is None
    assert sharded_layout() is None  # this process: CPU (or no Accelerator yet, and none is made by asking)


def test_a_stop_during_an_evaluation_that_hf_overrules_still_saves_before_it_stops(tmp_path):
    """save_strategy="best": the interrupt's request (weights, stop) arrives during the evaluation after step 4,
    which is not a new best, so HF turns the save it was asked for off after that evaluation. Training does
    not stop without it: the next step's end asks again, HF saves at step 5, then training stops."""
    from transformers import Trainer

    run_dir, backend = local_run(tmp_path)
    args = hf_args(tmp_path, max_steps=8, save_strategy="best", eval_strategy="steps", eval_steps=2,
                   metric_for_best_model="loss", greater_is_better=True)
    callback = rdc.DynamicCheckpointCallback({"check_interval": 10, "poll_interval_s": 0.05}, backend=backend)
    recorder = make_actions_callback({"actions": {"3": ["committed:1"]}, "eval_actions": {
        "4": ['request_until_claimed:{"id": "i", "kind": "weights", "stop": true}']}}, str(run_dir), rank=0)
    Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), eval_dataset=Sequences(8),
            callbacks=[callback, recorder]).train()
    assert recorder.record["final_step"] == 5
    assert [(s["step"], s["kind"], s["reason"]) for s in callback.saves] == [
        (2, "full", "schedule"), (5, "full", "request")]  # full: under "best" HF may save its own at once
    receipt = json.loads((run_dir / ".dyncheck" / "receipts" / "i.json").read_text())
    assert (receipt["status"], receipt["step"]) == ("ok", 5)
    assert args.save_only_model is False
