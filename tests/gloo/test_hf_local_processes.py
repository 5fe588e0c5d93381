"""The HF callback without Ray in real processes: the optional-extra import rule in a fresh interpreter,
and two gloo ranks (LocalBackend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import ray_dyncheck as rdc


def test_import_without_transformers_works_and_the_callback_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "import ray_dyncheck as rdc\n"
        "from ray_dyncheck import *\n"
        "assert rdc.DynamicCheckpoint\n"
        "try:\n"
        "    rdc.DynamicCheckpointCallback\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DynamicCheckpointCallback needs the Hugging Face extra: "
                                 "pip install 'ray_dyncheck[transformers]' (transformers and accelerate)")


def test_two_ranks_without_ray_keep_every_rank_state_and_resume_from_the_newest_complete_one(tmp_path):
    from gloo_workers import run_ranks
    from hf_workloads import gloo_worker

    run_dir, out = tmp_path / "run", tmp_path / "out"
    rdc.LocalBackend(str(run_dir))  # the run-start marker, before the trigger is touched
    time.sleep(0.05)
    run_ranks(gloo_worker, 2, str(run_dir), str(out))
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    first = r0["first"]
    assert first["steps"] == r1["first"]["steps"] and first["saves"] == [2, 4] and first["final_step"] == 4
    full, weights = sorted((p for p in run_dir.iterdir() if p.name.startswith("checkpoint_")), key=lambda p: p.name)
    assert (full.name.split("_")[2], weights.name.split("_")[2]) == ("full", "weights")
    # LocalBackend stores rank 0's directory only: with a shared output_dir it holds every rank's file.
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "model.safetensors"} <= set(os.listdir(full))
    # A weights-only save (HF's save_only_model writes no RNG state) keeps every rank's RNG state, and
    # its manifest lists each of them.
    manifest = json.loads((weights / "dyncheck.json").read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "model.safetensors"} <= set(manifest["files"])
    assert "optimizer.pt" not in manifest["files"] and manifest["kind"] == "weights"
    # The user's TrainingArguments are theirs again after each save (changed for HF's save only).
    for r in (r0, r1):
        assert r["first"]["save_only_model_on_save"] == [False, False]
        assert r["first"]["save_only_model"] is False and r["first"]["save_only_model_at_end"] is False

    # Resumed from the weights checkpoint at step 4, the same one on every rank: the LR schedule is
    # where it was (linear over 6 steps from 5e-5; a fresh one would start at 5e-5).
    assert [r["weights"]["resumed_from"] for r in (r0, r1)] == [str(weights)] * 2
    assert [r["weights"]["begin_step"] for r in (r0, r1)] == [4, 4]
    assert r0["weights"]["begin_lr"] == r1["weights"]["begin_lr"] == pytest.approx(5e-5 * 2 / 6)
    assert r0["weights"]["final_step"] == 6

    # With rank 1's RNG file deleted from it, resume skips it (the manifest lists it) for the full one.
    assert [r["damaged"]["resumed_from"] for r in (r0, r1)] == [str(full)] * 2
    assert [r["damaged"]["begin_step"] for r in (r0, r1)] == [2, 2]
    assert r0["errors"] == [f"dyncheck: skipping checkpoint {weights}: checkpoint {weights} is incomplete: "
                            "rng_state_1.pth is missing or truncated"]
    assert r1["errors"] == [], "no rank waits for an upload that never comes"

    # A rank that cannot get the checkpoint rank 0 chose: no rank resumes, each says why, identically.
    assert r0["unreachable"] == r1["unreachable"]
    assert r0["unreachable"].startswith(f"resuming from {full} failed on 1 rank(s): rank 1: FileNotFoundError: ")



def test_hf_fsdp_sharded_layout_every_ranks_shard_resume_and_export(tmp_path):
    """HF's FSDP ``SHARDED_STATE_DICT`` folder (``pytorch_model_fsdp_0/__<rank>_0.distcp``, written by DCP from
    an FSDP2-sharded model on 2 gloo ranks) in ``checkpoint-N``: the manifest lists every rank's shard,
    ``hf_resume_path`` checks the DCP folder and hands it to both ranks, and ``ray-dyncheck export``
    consolidates it into the model's weights. HF itself does not run FSDP on CPU: see the worker's docstring."""
    import safetensors.torch
    import torch

    from gloo_workers import run_ranks
    from hf_workloads import fsdp_layout_worker

    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    out.mkdir()
    run_ranks(fsdp_layout_worker, 2, str(run_dir), str(out))
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["saves"] == [2]
    [ckpt] = [p for p in run_dir.iterdir() if p.name.startswith("checkpoint_")]
    files = json.load(open(ckpt / "dyncheck.json"))["files"]
    assert {"pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp",
            "pytorch_model_fsdp_0/.metadata"} <= set(files) and "model.safetensors" not in files
    assert ranks[0]["resumed"] == ranks[1]["resumed"] == str(ckpt)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(ranks[1]["listing"])
    exported = tmp_path / "export"
    assert rdc.export_checkpoint(str(ckpt), str(exported))[0] == "model.safetensors"
    weights = safetensors.torch.load_file(exported / "model.safetensors")
    expected = torch.load(out / "weights-2.pt", weights_only=True)
    assert weights.keys() <= expected.keys() and len(weights) >= len(expected) - 1  # a tied weight once
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
