"""Memory snapshots of a model on a CUDA GPU (one process, no Ray, an in-process store): the snapshot goes
through pinned host buffers kept from one snapshot to the next, and a resume from it is exact; a step that
takes no snapshot never synchronises the GPU. Skipped without a GPU (a CPU has no device copy to check);
the timings are ``python -m benchmarks.gpu_snapshot``'s."""

from __future__ import annotations

import time

import pytest
import torch

import ray_dyncheck as rdc
from ray_dyncheck._state.memory import DictStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: memory snapshots copy CUDA tensors through kept pinned buffers"),
]


def _make(tmp_path, store):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dc = rdc.DynamicCheckpoint({"enabled": False, "memory_snapshots": 4}, model=model, optimizer=opt,
                               backend=rdc.LocalBackend(str(tmp_path / "run"), memory=store))
    return dc, model, opt


def _train(dc, model, opt, until, strict=False):
    while dc.global_step < until:
        g = torch.Generator(device="cuda").manual_seed(dc.global_step)
        x = torch.randn(32, 256, device="cuda", generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        due = (dc.global_step + 1) % 4 == 0
        if strict and not due:
            torch.cuda.set_sync_debug_mode("error")  # any implicit host-device sync raises
        try:
            dc.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_a_gpu_snapshot_resumes_exactly_and_other_steps_never_sync(tmp_path):
    store = DictStore()
    dc, model, opt = _make(tmp_path, store)
    _train(dc, model, opt, 8, strict=True)
    deadline = time.time() + 60
    while dc.memory_snapshot_step != 8:
        assert time.time() < deadline
        time.sleep(0.01)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    _train(dc, model, opt, 10)
    dc.close()
    dc2, model2, _ = _make(tmp_path, store)
    info = dc2.restore()
    dc2.close()
    assert info.step == 8 and info.path.startswith("memory")
    assert all(torch.equal(model2.state_dict()[k], expected[k]) for k in expected)
