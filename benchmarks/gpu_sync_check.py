"""GPU check: the hook never synchronises the GPU on a step that does not save.

Needs one CUDA GPU; no Ray. Runs a model on the GPU in a plain NCCL world of size 1, with the hook
checking every step and CUDA tensors passed as ``metrics``:

  phase 1: 300 steps under ``torch.cuda.set_sync_debug_mode("error")`` (any implicit host-device
           sync raises), the trigger never present;
  phase 2: the trigger is touched; sync debugging is relaxed (saving copies weights to the host,
           which must sync: one wait, into pinned buffers) and the step that saves is recorded;
  phase 3: strict mode again for 100 steps, while the asynchronous save is still written and stored
           in the background (it works on the host copy only); then the checkpoint must be committed
           and restore into a fresh model.

    python benchmarks/gpu_sync_check.py            # prints PASS/FAIL lines and exits 0 on success
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import ray_dyncheck as rdc


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    run_dir = tempfile.mkdtemp(prefix="dyncheck-gpu-")
    dc = rdc.DynamicCheckpoint({"check_interval": 1, "poll_interval_s": 0.05}, model=model, optimizer=opt,
                               backend=rdc.LocalBackend(run_dir))
    x = torch.randn(64, 512, device=dev)

    def train_step() -> torch.Tensor:
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(5):  # warm-up outside the check: cuBLAS/allocator set-up may sync
        train_step()
    torch.cuda.synchronize()

    ok = True
    torch.cuda.set_sync_debug_mode("error")
    try:
        t0 = time.perf_counter()
        for _ in range(300):
            loss = train_step()
            d = dc.step(metrics={"loss": loss, "scale": torch.ones((), device=dev)})
            assert d is not None and not d.save
        print(f"PASS phase 1: 300 steps, a check every step, CUDA metrics, no GPU sync "
              f"({(time.perf_counter() - t0) * 1e3 / 300:.2f} ms/step)")
    except RuntimeError as exc:
        ok = False
        print(f"FAIL phase 1: the hook synchronised the GPU on a non-saving step: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode(0)

    open(os.path.join(run_dir, "dyncheck.save"), "a").close()
    saved_at = None
    deadline = time.time() + 30
    while saved_at is None and time.time() < deadline:
        d = dc.step(metrics={"loss": train_step()})
        if d is not None and d.save:
            saved_at = dc.global_step
    in_flight = dc._core.in_flight
    print(f"{'PASS' if saved_at else 'FAIL'} phase 2: trigger -> save at step {saved_at}, training blocked "
          f"{dc._pipeline.last_blocked_s * 1e3:.1f} ms; still writing in the background: {in_flight}")
    ok = ok and saved_at is not None

    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(100):
            dc.step(metrics={"loss": train_step()})
        print("PASS phase 3: 100 more steps after the save (its write in the background), no GPU sync")
    except RuntimeError as exc:
        ok = False
        print(f"FAIL phase 3: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    dc._core.wait_stored()
    ckpts = [n for n in os.listdir(run_dir) if n.startswith("checkpoint_")]
    if len(ckpts) != 1 or not os.path.exists(os.path.join(run_dir, ckpts[0], ".dyncheck-committed")):
        ok = False
        print(f"FAIL: expected one committed checkpoint, got {ckpts}")

    fresh = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).to(dev)
    info = rdc.DynamicCheckpoint({"enabled": False}, model=fresh, backend=rdc.LocalBackend(run_dir)).restore()
    print(f"{'PASS' if info and info.step == saved_at else 'FAIL'} restore: {info}")
    ok = ok and info is not None and info.step == saved_at
    dc.close()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
