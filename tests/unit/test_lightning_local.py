"""The Lightning callback without Ray, in this process (LocalBackend, one rank): the save mid-epoch, a resume
at the same batch, a weights-only resume with a fresh optimizer, a failed write that every rank learns of."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ray_dyncheck as rdc
from lightning_workloads import Batches, Tiny, make_actions_callback, pl

pytestmark = [
    # Lightning's advice for a real run, deliberate here: a tiny loader in the main process, a small step count.
    pytest.mark.filterwarnings("ignore:The '(train|val)_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval"),
    # One module for the runs with validation and without (these have none).
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]


class LearningRates(pl.Callback):
    """The optimizer's learning rate at the start of each optimizer step after the first."""

    def __init__(self, into):
        self.into = into

    def on_train_start(self, trainer, pl_module):
        self.into.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.into.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit(run_dir, steps=12, ckpt=None, dc=None, actions=None, callbacks=(), val=None, **kw):
    from ray_dyncheck.lightning import DynamicCheckpointCallback

    torch.manual_seed(0)
    loader = Batches(20)
    model = Tiny(loader=loader)
    callback = DynamicCheckpointCallback(dc or {"check_interval": 4, "poll_interval_s": 0.05},
                                         backend=rdc.LocalBackend(str(run_dir)))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=kw.pop("limit_val_batches", 0),
                         callbacks=[callback, make_actions_callback({"actions": actions or {}}, str(run_dir), 0),
                                    *callbacks],
                         **kw)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=val, ckpt_path=ckpt,
                weights_only=True if ckpt else None)
    return model, callback, trainer


def checkpoints(run_dir):
    return sorted(p for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))


def resume(run_dir):
    from ray_dyncheck.lightning import resume_path

    return resume_path(backend=rdc.LocalBackend(str(run_dir)))


def test_trigger_saves_mid_epoch_and_resume_continues_at_the_same_batch(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base, callback, _ = fit(run_dir, actions={"1": ["touch_until_claimed"]})
    assert [(s["step"], s["kind"], s["reason"]) for s in callback.saves] == [(4, "full", "trigger")]
    [path] = checkpoints(run_dir)
    manifest = json.loads((path / "dyncheck.json").read_text())
    assert (manifest["layout"], manifest["step"], set(manifest["files"])) == ("lightning", 4, {"checkpoint.ckpt"})
    ckpt = resume(run_dir)
    assert ckpt == str(path / "checkpoint.ckpt")
    torch.manual_seed(1)  # the resume restores what matters
    again, _, trainer = fit(run_dir, ckpt=ckpt)
    assert again.seen == base.seen[4:] == list(range(4, 12))
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 12
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), again.state_dict().values()))


def test_a_weights_only_checkpoint_resumes_at_its_step_with_the_lr_schedule_and_a_fresh_optimizer(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model, callback, trainer = fit(run_dir, actions={"1": ['request_until_claimed:{"id": "w", "kind": "weights", '
                                                           '"stop": true}']})
    assert trainer.global_step == 4 and [(s["step"], s["kind"]) for s in callback.saves] == [(4, "weights")]
    [path] = checkpoints(run_dir)
    assert set(json.loads((path / "dyncheck.json").read_text())["files"]) == {"checkpoint.ckpt", "resume_state.pt"}
    with pytest.raises(KeyError, match="contains only the model"):  # what Lightning does with it alone
        fit(tmp_path / "other", ckpt=str(path / "checkpoint.ckpt"))
    ckpt = resume(run_dir)
    assert "resuming Trainer from weights-only checkpoint" in caplog.text and "optimizer starts fresh" in caplog.text
    assert ckpt != str(path / "checkpoint.ckpt"), "a completed copy, the stored checkpoint untouched"
    lrs = []
    resumed, _, trainer = fit(run_dir, ckpt=ckpt, steps=9, callbacks=[LearningRates(lrs)])
    assert resumed.seen == [4, 5, 6, 7, 8]
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 9, "the LR schedule went on from step 4"
    # StepLR(3, 0.5) from 0.05, as in a run that never stopped: a scheduler's state holds no learning rate,
    # so the optimizer's hyperparameters came back too (its moments did not).
    assert lrs == [0.025, 0.025, 0.0125, 0.0125, 0.0125, 0.00625]
    assert not os.path.exists(os.path.dirname(ckpt)), "the completed copy goes once training has read it"


def test_a_failed_write_is_an_error_receipt_and_training_goes_on(tmp_path):
    from lightning.pytorch.plugins import TorchCheckpointIO

    class Broken(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            raise OSError(28, "No space left on device")

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _, callback, trainer = fit(run_dir, actions={"1": ["touch_until_claimed"]}, plugins=[Broken()])
    assert trainer.global_step == 12
    assert callback.saves[0]["error"] and "No space left on device" in callback.saves[0]["error"]
    assert checkpoints(run_dir) == []
    [receipt] = (run_dir / ".dyncheck" / "receipts").glob("*.json")
    assert json.loads(receipt.read_text())["status"] == "error"


def test_save_steps_is_a_schedule_of_full_saves(tmp_path):
    """The block's ``save_steps`` replaces the epoch-end saves of Ray's callback: full saves every N optimizer
    steps (here with gradient accumulation: 2 batches a step), one per step even when a check agrees on a save
    at the same step."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _, callback, trainer = fit(run_dir, steps=8, dc={"check_interval": 3, "save_steps": 4, "poll_interval_s": 0.05},
                               actions={"2": ["touch_until_claimed"]}, accumulate_grad_batches=2)
    assert trainer.global_step == 8
    assert [(s["step"], s["kind"], s["reason"]) for s in callback.saves] == [
        (3, "full", "trigger"), (4, "full", "schedule"), (8, "full", "schedule")]
    assert [json.loads((p / "dyncheck.json").read_text())["step"] for p in checkpoints(run_dir)] == [3, 4, 8]



def test_validation_checks_only_at_optimizer_step_ends_and_not_on_a_clock(tmp_path):
    """A request during validation is served at its end, unless that validation began mid-accumulation (the
    gradients so far would be in no checkpoint) or validation runs on a clock (each rank on its own: the
    ranks would not be there together); the regular checks serve it then."""
    from lightning_workloads import Batches as Val

    def run(name, **kw):
        run_dir = tmp_path / name
        run_dir.mkdir()
        _, callback, _ = fit(run_dir, steps=8, dc={"check_interval": 6, "poll_interval_s": 0.05},
                             val=Val(2), limit_val_batches=2, num_sanity_val_steps=0, **kw)
        return [(s["step"], s["reason"]) for s in callback.saves]

    touch = {"1": ["touch_until_claimed"]}
    # Validation after every 4 batches, one optimizer step a batch: at step 4 (an optimizer step's end).
    assert run("aligned", val_check_interval=4, actions=touch) == [(4, "trigger")]
    # Two batches a step, validation after every 3 batches: at steps 1.5 and 3, the first mid-accumulation.
    assert run("accumulating", val_check_interval=3, accumulate_grad_batches=2, actions=touch) == [(3, "trigger")]
    # On a clock: the regular check at step 6 serves it.
    assert run("clock", val_check_interval="00:00:00:00", actions=touch) == [(6, "trigger")]
