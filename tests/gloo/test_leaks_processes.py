"""Nothing of ours outlives its use, in real processes: two gloo ranks whose training raises, and an
interpreter that exits without close()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import torch
from drivers import HARNESS

import ray_dyncheck as rdc
from hf_workloads import ours, settled


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
    tests = HARNESS
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads((tmp_path / "at_exit.json").read_text())
    assert seen == {"threads": [], "tmp": []}, (seen, done.stderr[-3000:])

