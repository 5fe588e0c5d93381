"""Nothing of ours outlives its use, on every path: the threads (``dyncheck-*``) and the temporary
directories are gone after a failed report, after a closed hook, and once a downloaded resume
checkpoint has been read (in this process; the gloo ranks and interpreter exit are in
``gloo/test_leaks_processes.py``)."""

from __future__ import annotations

import os

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


def test_closing_the_hook_ends_the_local_backends_store_thread(tmp_path, tmpdir_of_our_own):
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
