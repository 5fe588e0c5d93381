"""Nothing of ours outlives its use, on every path: the threads (``dyncheck-*``), the gloo side groups
and the temporary directories are gone after a failed report, after a ``Trainer.train()`` that
raises, at interpreter exit, and once a downloaded resume checkpoint has been read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

import ray_dyncheck as rdc
from hf_workloads import Sequences, make_actions_callback, make_raise_callback, ours, settled, tiny_llama


class ReportFails(rdc.LocalBackend):
    """A backend whose report raises (Ray's report when its controller is gone), after the caller made
    the checkpoint's directory."""

    def report(self, metrics, directory, *, name, metadata, on_done, written=None):
        self.directory = directory
        raise RuntimeError("the controller is gone")


@pytest.fixture
def tmpdir_of_our_own(tmp_path, monkeypatch):
    """A fresh, empty temporary directory for this test (``tempfile`` and child processes)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


def hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, disable_tqdm=True, **kw)


@pytest.mark.parametrize("save_mode", ["sync", "async"])
def test_a_failed_report_leaves_no_checkpoint_directory(tmp_path, tmpdir_of_our_own, save_mode):
    baseline = ours()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    backend = ReportFails(str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="the controller is gone"):
        with rdc.DynamicCheckpoint({"save_mode": save_mode, "poll_interval_s": 0.05}, model=model,
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1), backend=backend) as dc:
            dc.step()
            dc.save()
    assert backend.directory.startswith(str(tmpdir_of_our_own))
    assert settled(baseline) == baseline
    assert dc.saves[0]["step"] == 1


def test_hf_failed_report_leaves_no_staging_directory(tmp_path, tmpdir_of_our_own):
    from transformers import Trainer

    baseline = ours()
    backend = ReportFails(str(tmp_path / "run"))
    callback = rdc.DynamicCheckpointCallback({"poll_interval_s": 0.05}, backend=backend)
    trainer = Trainer(model=tiny_llama(), args=hf_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=Sequences(), callbacks=[callback])
    with pytest.raises(RuntimeError, match="the controller is gone"):
        trainer.train()
    staging = tmp_path / "hf" / ".dyncheck-staging"
    assert backend.directory.startswith(str(staging))
    assert list(staging.iterdir()) == []
    callback.close(clean=False)
    assert settled(baseline) == baseline


def test_hf_train_that_raises_leaves_nothing_behind_on_two_ranks(tmp_path):
    """Two gloo ranks, a real HF Trainer each: a train() that raises after a committed save leaves
    the poller, the commit and store threads and the side group behind until the next train() in
    that thread (which releases them), or until the ``with`` blocks end."""
    from gloo_workers import run_ranks
    from hf_workloads import leaks_worker

    run_dir, out = tmp_path / "run", tmp_path / "out"
    rdc.LocalBackend(str(run_dir))  # the run-start marker, before the trigger is touched
    time.sleep(0.05)
    out.mkdir()
    run_ranks(leaks_worker, 2, str(run_dir), str(out))
    for rank in (0, 1):
        record = json.loads((out / f"rank{rank}.json").read_text())
        baseline = record["baseline"]
        assert (baseline["threads"], baseline["groups"], baseline["tmp"]) == ([], 1, []), rank
        assert [k for k in record if k.endswith("_error")] == [], record
        assert record["next_train_raised"] == record["with_raised"] == "boom at step 4"
        # Left behind by the train() that raised (HF calls no callback then) ...
        left = record["next_train_left"]
        assert "dyncheck-store_0" in left["threads"] and left["groups"] == 2, (rank, left)
        if rank == 0:
            assert {"dyncheck-poller", "dyncheck-commits"} <= set(left["threads"]), left
        # ... and released by the next one (which ended normally), or by the with blocks.
        assert record["next_train"] == baseline, (rank, record["next_train"])
        assert record["with"] == baseline, (rank, record["with"])


def hook_worker(rank: int, world_size: int, port: int, run_dir: str, out: str) -> None:
    """The torch hook on a real gloo rank, left by an exception after a save: what it holds then."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    tempfile.tempdir = os.path.join(out, f"tmp{rank}")
    os.makedirs(tempfile.tempdir)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    baseline = ours()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    try:
        with rdc.DynamicCheckpoint({"poll_interval_s": 0.05}, model=model, backend=rdc.LocalBackend(run_dir)) as dc:
            dc.step()
            dc.save()
            inside = ours()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"baseline": baseline, "inside": inside, "after": settled(baseline),
                   "saved": [s["path"] for s in dc.saves]}, f)
    dist.destroy_process_group()


def test_the_hook_left_by_an_exception_leaves_nothing_behind_on_two_ranks(tmp_path):
    """Its poller, commit, writer and store threads, its side group and the writers' group, and the
    save's temporary directory."""
    from gloo_workers import run_ranks

    out = tmp_path / "out"
    out.mkdir()
    run_ranks(hook_worker, 2, str(tmp_path / "run"), str(out))
    for rank in (0, 1):
        record = json.loads((out / f"rank{rank}.json").read_text())
        assert record["inside"]["groups"] == 3, record  # the default group, the core's, the writers'
        assert (record["baseline"]["groups"], record["baseline"]["threads"], record["baseline"]["tmp"]) == (1, [], [])
        assert record["after"] == record["baseline"], (rank, record)
    assert json.loads((out / "rank0.json").read_text())["saved"][0] is not None


def test_leftovers_are_released_at_interpreter_exit(tmp_path, tmpdir_of_our_own):
    """A script whose train() raises and that never calls close(): at exit the threads are stopped
    and the resume download it never used is removed (checked by an exit handler that runs last)."""
    script = textwrap.dedent(f"""
        import atexit, json, os, tempfile, threading
        out = {str(tmp_path / "at_exit.json")!r}

        def seen():  # registered first: runs after every handler ray_dyncheck registers
            names = sorted(t.name for t in threading.enumerate() if t.name.startswith("dyncheck-"))
            with open(out, "w") as f:
                json.dump({{"threads": names, "tmp": sorted(n for n in os.listdir(tempfile.gettempdir())
                                                         if n.startswith("dyncheck"))}}, f)

        atexit.register(seen)
        import pyarrow.fs as pafs
        import ray_dyncheck as rdc
        from transformers import Trainer, TrainingArguments
        from hf_workloads import Sequences, make_raise_callback, tiny_llama

        run = {str(tmp_path / "run")!r}
        # Not the local filesystem: hf_resume_path downloads the checkpoint.
        remote = rdc.LocalBackend("run", filesystem=pafs.SubTreeFileSystem({str(tmp_path)!r}, pafs.LocalFileSystem()))

        def train(callback, steps, path=None, boom=None):
            args = TrainingArguments(output_dir={str(tmp_path / "hf")!r}, max_steps=steps, save_strategy="steps",
                                     save_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                     disable_tqdm=True)
            callbacks = [callback] + ([make_raise_callback(boom)] if boom else [])
            Trainer(model=tiny_llama(), args=args, train_dataset=Sequences(), callbacks=callbacks).train(
                resume_from_checkpoint=path)

        train(rdc.DynamicCheckpointCallback({{"poll_interval_s": 0.05}}, backend=rdc.LocalBackend(run)), 2)
        try:  # saves at step 4 (the commit thread starts), raises at step 5
            train(rdc.DynamicCheckpointCallback({{"poll_interval_s": 0.05}}, backend=rdc.LocalBackend(run)), 6,
                  rdc.hf_resume_path(backend=remote), boom=5)
        except RuntimeError:
            pass
        rdc.hf_resume_path(backend=remote)  # downloaded, never used
    """)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads((tmp_path / "at_exit.json").read_text())
    assert seen == {"threads": [], "tmp": []}, (seen, done.stderr[-3000:])


def test_the_resume_download_is_removed_once_trainer_has_read_it(tmp_path, tmpdir_of_our_own):
    """Kept until HF has read it (its RNG states are read after ``on_train_begin``, where the callback
    releases what a train() that raised left), then removed."""
    from transformers import Trainer, TrainerCallback

    run = str(tmp_path / "run")
    callback = rdc.DynamicCheckpointCallback({"poll_interval_s": 0.05}, backend=rdc.LocalBackend(run))
    # Saves at step 2 and raises at step 3 once that is committed: the callback's core is left open.
    with pytest.raises(RuntimeError, match="boom at step 3"):
        Trainer(model=tiny_llama(), args=hf_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                train_dataset=Sequences(), callbacks=[
                    callback, make_actions_callback({"actions": {"3": ["committed:1"]}}, run, rank=0),
                    make_raise_callback(3)]).train()
    # On a filesystem that is not the local one the checkpoint is downloaded into a temporary directory.
    remote = rdc.LocalBackend("run", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    path = rdc.hf_resume_path(backend=remote)
    assert path is not None and path.startswith(str(tmpdir_of_our_own))

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after the callback's own
            self.rng_there = os.path.isfile(os.path.join(path, "rng_state.pth"))

    seen, recorder = Seen(), make_actions_callback({}, run, rank=0)
    Trainer(model=tiny_llama(), args=hf_args(tmp_path, max_steps=4), train_dataset=Sequences(),
            callbacks=[callback, recorder, seen]).train(resume_from_checkpoint=path)
    assert seen.rng_there
    assert recorder.record["begin_step"] == 2 and recorder.record["final_step"] == 4
    assert ours()["tmp"] == []


def test_the_resume_download_is_removed_when_train_raises(tmp_path, tmpdir_of_our_own):
    from transformers import Trainer

    run = str(tmp_path / "run")
    with rdc.LocalBackend(run) as backend:
        Trainer(model=tiny_llama(), args=hf_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                train_dataset=Sequences(),
                callbacks=[rdc.DynamicCheckpointCallback({"poll_interval_s": 0.05}, backend=backend)]).train()
    remote = rdc.LocalBackend("run", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    with rdc.LocalBackend(run) as backend, rdc.DynamicCheckpointCallback({"poll_interval_s": 0.05},
                                                                         backend=backend) as callback:
        path = rdc.hf_resume_path(backend=remote)
        assert path is not None and os.path.isdir(path)
        # The model does not fit the checkpoint: Trainer raises before its first step.
        from transformers import LlamaConfig, LlamaForCausalLM

        other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
        with pytest.raises(RuntimeError):
            Trainer(model=other, args=hf_args(tmp_path, max_steps=4), train_dataset=Sequences(),
                    callbacks=[callback]).train(resume_from_checkpoint=path)
    assert ours()["tmp"] == []


def test_closing_the_hook_ends_the_local_backends_store_thread(tmp_path):
    baseline = ours()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    backend = rdc.LocalBackend(str(tmp_path / "run"))
    with rdc.DynamicCheckpoint({"poll_interval_s": 0.05}, model=model, backend=backend) as dc:
        dc.step()
        dc.save()
    assert dc.saves[0]["path"] is not None
    assert settled(baseline) == baseline
    # A closed LocalBackend can be used again: its store thread starts again, and ends with it.
    with rdc.DynamicCheckpoint({"poll_interval_s": 0.05}, model=model, backend=backend) as dc:
        dc.step()
        dc.save()
    assert dc.saves[0]["path"] is not None
    assert settled(baseline) == baseline
    with backend:
        assert len(list(backend.checkpoints())) == 2
