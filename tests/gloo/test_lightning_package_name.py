"""The Lightning adapter under the ``pytorch_lightning`` package name (``lightning`` not importable), as
``ray.train.lightning`` falls back to it: a ``pytorch_lightning.Trainer`` takes the callback, saves on a
trigger and resumes. A subprocess, so that blocking ``lightning`` touches nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HARNESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "harness")

SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    sys.modules["lightning"] = None  # "import lightning" raises ImportError
    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch
    import ray_dyncheck as rdc
    from ray_dyncheck.lightning import DynamicCheckpointCallback, resume_path
    from lightning_workloads import Batches, Tiny, make_actions_callback
    assert DynamicCheckpointCallback.__mro__[1] is pl.Callback
    assert "lightning" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
    run = sys.argv[1]

    def fit(ckpt=None, actions=None):
        torch.manual_seed(0)
        loader = Batches(10)
        model = Tiny(loader=loader)
        cb = DynamicCheckpointCallback({"check_interval": 2, "poll_interval_s": 0.05}, backend=rdc.LocalBackend(run))
        trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             callbacks=[cb, make_actions_callback({"actions": actions or {}}, run, 0)])
        trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt, weights_only=True)
        return model, cb

    model, cb = fit(actions={"1": ["touch_until_claimed"]})
    assert [s["step"] for s in cb.saves] == [2], cb.saves
    resumed, _ = fit(ckpt=resume_path(backend=rdc.LocalBackend(run)))
    assert resumed.seen == model.seen[2:], (resumed.seen, model.seen)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    print("ok")
""")


def test_the_callback_works_under_the_pytorch_lightning_package_name(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HARNESS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout + proc.stderr)[-4000:]


def test_the_package_imports_without_any_framework_and_the_adapter_names_its_extra():
    code = textwrap.dedent("""
        import sys
        for name in ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate", "deepspeed"):
            sys.modules[name] = None  # as if not installed
        import ray_dyncheck as rdc
        from ray_dyncheck import *
        assert rdc.DynamicCheckpoint and rdc.fit and rdc.export_checkpoint
        try:
            import ray_dyncheck.lightning
        except ImportError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ray_dyncheck.lightning needs PyTorch Lightning: pip install "
                                  "'ray_dyncheck[lightning]'")
