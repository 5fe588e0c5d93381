"""Hugging Face ``Trainer`` in real Ray TorchTrainer workers (2 CPU workers, gloo) with
``DynamicCheckpointCallback``: trigger, schedule, weights-only interrupt, resume."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from hf_workloads import train_fn

STEPS = 20
HF_FILES = {".metadata.json", "config.json", "dyncheck.json", "generation_config.json", "model.safetensors",
            "trainer_state.json", "training_args.bin"}
FULL_FILES = HF_FILES | {"optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"}
# HF's save_only_model writes no RNG state; the callback adds every rank's.
WEIGHTS_FILES = HF_FILES | {"scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"}


def make_trainer(storage, name, out, *, steps=STEPS, dc=None, actions=None, step_time=0.0, **extra):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {"steps": steps, "out": str(out), "step_time": step_time, "actions": actions or {},
              "dynamic_checkpoint": dc or {"check_interval": 5, "poll_interval_s": 0.05}, **extra}
    return TorchTrainer(train_fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=2),
                        run_config=RunConfig(name=name, storage_path=str(storage)))


def records(out):
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


def reported(result):
    """(step, metadata, path) of every checkpoint Ray holds for the run, oldest first."""
    out = [(c.get_metadata()["step"], c.get_metadata(), c.path) for c, _ in result.best_checkpoints]
    return sorted(out, key=lambda t: t[0])


def receipts(run_dir):
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / ".dyncheck" / "receipts").glob("*.json")}


def saved_steps(record):
    return [s for s, should_save, _ in record["steps"] if should_save]


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory):
    """An uninterrupted 20-step run with two touches, a weights request and HF's own schedule (every 10)."""
    tmp = tmp_path_factory.mktemp("baseline")
    actions = {"2": ["touch_until_claimed"], "6": ["touch_until_claimed"],
               "12": ['request_until_claimed:{"id": "w-1", "kind": "weights"}']}
    result = make_trainer(tmp / "results", "baseline", tmp / "out", actions=actions).fit()
    return tmp, result


def test_trigger_request_and_schedule(baseline):
    tmp, result = baseline
    run_dir = tmp / "results" / "baseline"
    r0, r1 = records(tmp / "out")
    assert r0["steps"] == r1["steps"], "both ranks saw the same decisions at every step"
    # Touched after steps 2 and 6 (claimed at once): saved at the next check, 3 and 4 steps later.
    # Step 10 is both HF's scheduled save and the second trigger: one save.
    assert saved_steps(r0) == [5, 10, 15, 20]
    ckpts = reported(result)
    assert [s for s, _, _ in ckpts] == [5, 10, 15, 20], "exactly one checkpoint per save"
    (_, m5, p5), (_, m10, p10), (_, m15, p15), (_, m20, p20) = ckpts
    assert [(m["kind"], m["reason"]) for m in (m5, m10, m15, m20)] == [
        ("full", "trigger"), ("full", "trigger"), ("weights", "request"), ("full", "schedule")]
    assert (m15["request_id"], m20["request_id"]) == ("w-1", None)
    for path in (p5, p10, p20):
        assert set(os.listdir(path)) == FULL_FILES, path
    # The weights-only save switched save_only_model on for that save only: step 20 is full again.
    assert set(os.listdir(p15)) == WEIGHTS_FILES
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(json.load(open(os.path.join(p15, "dyncheck.json")))["files"])
    for r in (r0, r1):  # the user's args, as they set them, whenever they can look
        assert r["save_only_model_on_save"] == [False] * 4 and r["save_only_model_at_end"] is False
        assert "save_only_model_while_training" not in r
    for step, path in ((5, p5), (10, p10), (15, p15), (20, p20)):
        assert json.load(open(os.path.join(path, "trainer_state.json")))["global_step"] == step
        assert json.load(open(os.path.join(path, "dyncheck.json")))["layout"] == "transformers"
    opt = torch.load(os.path.join(p10, "optimizer.pt"), weights_only=True)
    assert opt["state"], "optimizer moments are in the full checkpoint"
    assert torch.load(os.path.join(p10, "scheduler.pt"), weights_only=True)["last_epoch"] == 10
    rec = receipts(run_dir)
    assert rec[m5["request_id"]]["checkpoint"] == p5 and rec[m10["request_id"]]["checkpoint"] == p10
    assert (rec["w-1"]["status"], rec["w-1"]["kind"], rec["w-1"]["step"]) == ("ok", "weights", 15)
    assert len(rec) == 3
    staging = tmp / "out" / "hf" / ".dyncheck-staging"
    assert list(staging.iterdir()) == [], "Ray removed every staged directory after its upload"


def test_stop_request_then_resume_matches_the_uninterrupted_run(baseline, tmp_path):
    base_tmp, _ = baseline
    storage = tmp_path / "results"
    stop = {"6": ['request_until_claimed:{"id": "pause", "kind": "full", "stop": true}']}
    # Each rank writes HF's files into its own output_dir, as on several nodes with local disks: rank 1
    # holds only its rng_state_1.pth and reports it itself.
    result = make_trainer(storage, "resumed", tmp_path / "a", actions=stop, output_dir_per_rank=True).fit()
    first = records(tmp_path / "a")
    # Claimed after step 6, honoured at the check at step 10, which is also HF's scheduled save: one save.
    assert first[0]["final_step"] == first[1]["final_step"] == 10
    [(step, meta, path)] = reported(result)
    assert (step, meta["kind"], meta["reason"]) == (10, "full", "request")
    assert os.listdir(tmp_path / "a" / "hf-rank1" / "checkpoint-10") == ["rng_state_1.pth"]
    assert set(os.listdir(path)) == FULL_FILES

    result = make_trainer(storage, "resumed", tmp_path / "b").fit()
    second = records(tmp_path / "b")
    assert [r["begin_step"] for r in second] == [10, 10]
    assert second[0]["final_step"] == STEPS
    a = torch.load(base_tmp / "out" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_interrupt_saves_weights_that_from_pretrained_loads_and_resume_skips_an_incomplete_one(ray_local, tmp_path):
    import ray_dyncheck as rdc

    storage, ready = tmp_path / "results", tmp_path / "ready"
    actions = {"1": ['request_until_claimed:{"id": "w-5", "kind": "weights"}'], "6": [f"ready:{ready}"]}
    trainer = make_trainer(storage, "intr", tmp_path / "a", steps=200, step_time=0.05, actions=actions,
                           save_strategy="no")

    def interrupt():
        deadline = time.monotonic() + 240
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl+C does to the driver

    threading.Thread(target=interrupt, daemon=True).start()
    result = rdc.fit(trainer, raise_on_interrupt=False)
    first = records(tmp_path / "a")
    (early, early_meta, early_path), (step, meta, path) = reported(result)
    assert (early, early_meta["kind"], early_meta["reason"]) == (5, "weights", "request")
    assert (meta["kind"], meta["reason"]) == ("weights", "interrupt")
    assert 6 < step < 200 and first[0]["final_step"] == first[1]["final_step"] == step
    for p in (early_path, path):
        assert set(os.listdir(p)) == WEIGHTS_FILES
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(json.load(open(os.path.join(p, "dyncheck.json")))["files"])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "still tied"
    assert not torch.equal(model.model.embed_tokens.weight, _initial_embeddings()), "trained weights"

    os.remove(os.path.join(path, "rng_state_1.pth"))  # as if rank 1's share had been lost
    result = make_trainer(storage, "intr", tmp_path / "b", steps=200, save_strategy="no").fit()
    second = records(tmp_path / "b")
    # The newest checkpoint lacks a file its manifest lists: every rank resumes from the one before.
    assert [r["begin_step"] for r in second] == [5, 5]
    # The LR schedule continues where it was (linear, 2 warm-up steps), although the optimizer is fresh.
    assert second[0]["begin_lr"] == second[1]["begin_lr"] == pytest.approx(5e-3 * (200 - 5) / (200 - 2))
    assert second[0]["final_step"] == 200


def _initial_embeddings():
    from hf_workloads import tiny_llama

    return tiny_llama().model.embed_tokens.weight.detach()
