"""The save pipeline: who owns the kept host buffers while writes queue up, and a close that never
hangs on a write. Real torch, real writer threads, the hook with LocalBackend (world size 1; two gloo
ranks are in ``gloo/test_pipeline_processes.py``)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import safetensors.torch
import torch
from pipeline_workers import HeldWrites, use_pipeline

import ray_dyncheck as rdc
from ray_dyncheck._state import MODEL_FILE, read_manifest


def _writers() -> set[threading.Thread]:
    """The live writer threads of every pipeline in this process (``dyncheck-write``)."""
    return {t for t in threading.enumerate() if t.name == "dyncheck-write"}


def _hook(tmp_path, write, device="cpu", keep_all=True, **cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # collective_timeout_s: a save waits 0.1 s (half of it) for the one before it, then saves anyway.
    config = {"enabled": False, "collective_timeout_s": 0.2, **cfg}
    dc = rdc.DynamicCheckpoint(config, model=model, optimizer=opt, backend=rdc.LocalBackend(str(tmp_path / "run")))
    use_pipeline(dc, write, keep_all=keep_all)
    return dc, model, opt


def _train(dc, model, opt):
    device = next(model.parameters()).device
    loss = model(torch.ones(3, 4, device=device)).pow(2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    dc.step()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _stored(run_dir):
    """``{step: weights}`` of every committed checkpoint in ``run_dir``."""
    out = {}
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith("checkpoint_") and os.path.exists(os.path.join(path, ".dyncheck-committed")):
            out[read_manifest(path)["step"]] = safetensors.torch.load_file(os.path.join(path, MODEL_FILE))
    return out


def _four_saves_two_queued(tmp_path, device="cpu", keep_all=True):
    """Saves at steps 1-4, each after a wait for the one before that times out: write 1 holds the kept
    buffers while 2 queues behind it (fresh buffers); write 2 is still queued when 3 is copied (into the
    kept buffers, free again), and write 3 is still queued when 4 is copied."""
    writes = HeldWrites()
    dc, model, opt = _hook(tmp_path, writes, device=device, keep_all=keep_all)
    expected = {}
    try:
        expected[1] = _train(dc, model, opt)
        dc.save("weights")
        assert writes.started[1].wait(10)
        expected[2] = _train(dc, model, opt)
        dc.save("weights")  # write 1 still running: a second write queues
        writes.go[1].set()
        assert writes.started[2].wait(10)
        expected[3] = _train(dc, model, opt)
        dc.save("weights")  # write 2 still running, write 3 queued behind it
        writes.go[2].set()
        assert writes.started[3].wait(10)
        expected[4] = _train(dc, model, opt)
        dc.save("weights")  # write 3 has not read its copy yet
    finally:
        writes.release_all()
        dc.close(timeout=30)
    return dc, writes, expected


def test_each_checkpoint_holds_its_own_steps_weights_while_writes_queue(tmp_path):
    dc, writes, expected = _four_saves_two_queued(tmp_path)
    assert [(s["step"], s["error"]) for s in dc.saves] == [(1, None), (2, None), (3, None), (4, None)]
    stored = _stored(tmp_path / "run")
    assert sorted(stored) == [1, 2, 3, 4]
    for step, weights in expected.items():
        for name, tensor in weights.items():
            assert torch.equal(stored[step][name], tensor), f"the step-{step} checkpoint holds other weights ({name})"
    # The kept buffers went to writes 1 and 3; 2 and 4 (queued while they were owned) had fresh ones.
    assert writes.buffers[3] == writes.buffers[1]
    assert not set(writes.buffers[2]) & set(writes.buffers[1])
    assert not set(writes.buffers[4]) & set(writes.buffers[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host buffers are kept only for CUDA tensors: "
                    "needs a CUDA GPU")
def test_each_checkpoint_holds_its_own_steps_weights_while_writes_queue_on_cuda(tmp_path):
    dc, writes, expected = _four_saves_two_queued(tmp_path, device="cuda", keep_all=False)
    stored = _stored(tmp_path / "run")
    assert sorted(stored) == [1, 2, 3, 4]
    for step, weights in expected.items():
        for name, tensor in weights.items():
            assert torch.equal(stored[step][name], tensor), f"the step-{step} checkpoint holds other weights ({name})"
    assert writes.buffers[3] == writes.buffers[1], "the pinned buffers are reused once their write is done"


def test_close_gives_up_on_a_hung_write_after_its_deadline(tmp_path, caplog):
    before = _writers()
    writes = HeldWrites(limit_s=120)
    dc, model, opt = _hook(tmp_path, writes, commit_timeout_s=1.0)
    _train(dc, model, opt)
    dc.save("weights")
    assert writes.started[1].wait(10)
    closed = threading.Event()
    took: list[float] = []

    def close():
        t0 = time.monotonic()
        dc.close(timeout=0.5)  # the core's own wait for the stores
        took.append(time.monotonic() - t0)
        closed.set()

    closer = threading.Thread(target=close, name="test-close")
    try:
        with caplog.at_level(logging.ERROR, logger="ray_dyncheck"):
            closer.start()
            returned = closed.wait(10)
            assert returned, "close() still waits for a hung write after 10 s"
    finally:
        writes.release_all()  # the write ends: no thread is left behind
        closer.join(30)
    assert took[0] < 0.5 + 1.0 + 2.0
    assert ("the write of the step-1 checkpoint is still running after" in caplog.text
            and "raise commit_timeout_s" in caplog.text), caplog.text
    for thread in _writers() - before:  # this hook's writer
        thread.join(30)
    assert not _writers() - before
    assert _stored(tmp_path / "run") == {}, "a write given up at close is never stored"


def test_a_sync_save_gives_up_on_a_hung_write_after_its_deadline(tmp_path, caplog, monkeypatch):
    """``save_mode: sync`` waits for the write on the training thread: bounded by commit_timeout_s, then
    the save fails (logged, nothing stored) and training goes on; the write given up removes its folder
    once it ends."""
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    before = _writers()
    writes = HeldWrites(limit_s=120)
    dc, model, opt = _hook(tmp_path, writes, commit_timeout_s=1.0, save_mode="sync")
    _train(dc, model, opt)
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.ERROR, logger="ray_dyncheck"):
            dc.save("weights")
        took = time.monotonic() - t0
    finally:
        writes.release_all()
    assert took < 1.0 + 5.0, took
    assert "the write did not finish within commit_timeout_s=1 s" in caplog.text, caplog.text
    dc.close()
    assert _stored(tmp_path / "run") == {}
    for thread in _writers() - before:  # this hook's writer
        thread.join(30)
    assert os.listdir(tmp_path / "tmp") == [], "the folder of the write given up is removed"
