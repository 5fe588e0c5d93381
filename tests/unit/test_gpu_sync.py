"""The hook never synchronises the GPU on a step that does not save. One CUDA GPU, no Ray: a model on
the GPU in a plain NCCL world of size 1 (in this process), the hook checking every step, CUDA tensors
passed as ``metrics``:

  phase 1: 300 steps under ``torch.cuda.set_sync_debug_mode("error")`` (any implicit host-device sync
           raises), the trigger never present;
  phase 2: the trigger is touched; sync debugging is relaxed (saving copies weights to the host, which
           must sync: one wait, into pinned buffers) and the step that saves is recorded;
  phase 3: strict mode again for 100 steps, while the asynchronous save is still written and stored in
           the background (it works on the host copy only); then the checkpoint must be committed and
           restore into a fresh model.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import ray_dyncheck as rdc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: checks that a step that does not save never synchronises the GPU"),
]


def _model(dev: torch.device) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).to(dev)


@pytest.fixture
def nccl_world():
    """A plain NCCL world of size 1 in this process, destroyed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    torch.cuda.set_device(0)
    try:
        yield torch.device("cuda", 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_a_step_that_does_not_save_never_synchronises_the_gpu(nccl_world, tmp_path):
    dev = nccl_world
    model = _model(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    run_dir = str(tmp_path / "run")
    dc = rdc.DynamicCheckpoint({"check_interval": 1, "poll_interval_s": 0.05}, model=model, optimizer=opt,
                               backend=rdc.LocalBackend(run_dir))
    x = torch.randn(64, 512, device=dev)

    def train_step() -> torch.Tensor:
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    try:
        for _ in range(5):  # warm-up outside the check: cuBLAS/allocator set-up may sync
            train_step()
        torch.cuda.synchronize()

        torch.cuda.set_sync_debug_mode("error")
        try:
            t0 = time.perf_counter()
            for _ in range(300):
                loss = train_step()
                d = dc.step(metrics={"loss": loss, "scale": torch.ones((), device=dev)})
                assert d is not None and not d.save
            print(f"phase 1: 300 steps, a check every step, CUDA metrics, no GPU sync "
                  f"({(time.perf_counter() - t0) * 1e3 / 300:.2f} ms/step)")
        except RuntimeError as exc:
            pytest.fail(f"phase 1: the hook synchronised the GPU on a non-saving step: {exc}")
        finally:
            torch.cuda.set_sync_debug_mode(0)

        open(os.path.join(run_dir, "dyncheck.save"), "a").close()
        saved_at = None
        deadline = time.time() + 30
        while saved_at is None and time.time() < deadline:
            d = dc.step(metrics={"loss": train_step()})
            if d is not None and d.save:
                saved_at = dc.global_step
        print(f"phase 2: trigger -> save at step {saved_at}, training blocked {dc.last_blocked_s * 1e3:.1f} ms; "
              f"still writing in the background: {dc.in_flight}")
        assert saved_at is not None, "phase 2: the trigger was never saved"

        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(100):
                dc.step(metrics={"loss": train_step()})
        except RuntimeError as exc:
            pytest.fail(f"phase 3: the hook synchronised the GPU while its save was written: {exc}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        dc.wait_stored()
        ckpts = [n for n in os.listdir(run_dir) if n.startswith("checkpoint_")]
        assert len(ckpts) == 1 and os.path.exists(os.path.join(run_dir, ckpts[0], ".dyncheck-committed")), \
            f"expected one committed checkpoint, got {ckpts}"

        fresh = _model(dev)
        info = rdc.DynamicCheckpoint({"enabled": False}, model=fresh, backend=rdc.LocalBackend(run_dir)).restore()
        assert info is not None and info.step == saved_at, info
    finally:
        dc.close()
