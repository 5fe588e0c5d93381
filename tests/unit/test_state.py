"""State capture and restore: safetensors weights (tied too), weights_only loads, RNG, user state."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import safetensors.torch
import torch

from ray_dyncheck._state import (
    capture_rank_state,
    load_checkpoint,
    read_manifest,
    unwrap_model,
    write_checkpoint,
)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x))


class Position:
    def __init__(self, index=0):
        self.index = index

    def state_dict(self):
        return {"index": self.index, "order": torch.arange(3)}

    def load_state_dict(self, sd):
        self.index = sd["index"]


def train(model, opt, steps=3):
    for _ in range(steps):
        loss = model(torch.tensor([1, 2, 3])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_round_trip_full_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt)
    sched.step()
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    pos = Position(41)
    states = [capture_rank_state({"pos": pos}), capture_rank_state({"pos": Position(99)})]
    sizes = write_checkpoint(str(tmp_path), model=model, optimizer=opt, lr_scheduler=sched, step=3,
                             kind="full", rank_states=states)
    assert set(sizes) == {"model.safetensors", "optimizer.pt", "trainer_state.pt"}
    expected = (random.random(), np.random.rand(), torch.rand(1))
    # Every file loads without unpickling code; weights are safetensors with the tie stored once.
    torch.load(tmp_path / "optimizer.pt", weights_only=True)
    torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert len(safetensors.torch.load_file(tmp_path / "model.safetensors")) == 1

    torch.manual_seed(123)
    fresh = Tied()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    fresh_pos = Position()
    info = load_checkpoint(str(tmp_path), model=torch.nn.parallel.DataParallel(fresh), optimizer=fresh_opt,
                           lr_scheduler=fresh_sched, extra_state={"pos": fresh_pos}, rank=0)
    assert (info.step, info.kind, info.loaded_optimizer) == (3, "full", True)
    assert fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight)
    assert fresh_sched.state_dict() == sched.state_dict()
    assert fresh_pos.index == 41
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    # Continuing from the restored state gives bitwise the same parameters.
    train(model, opt), train(fresh, fresh_opt)
    assert torch.equal(fresh.emb.weight, model.emb.weight)


def test_weights_checkpoint_has_no_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    write_checkpoint(str(tmp_path), model=model, optimizer=opt, lr_scheduler=None, step=9, kind="weights",
                     rank_states=[capture_rank_state(None)])
    assert not os.path.exists(tmp_path / "optimizer.pt")
    info = load_checkpoint(str(tmp_path), model=torch.nn.Linear(3, 2), optimizer=opt, lr_scheduler=None,
                           extra_state=None, rank=0)
    assert (info.step, info.kind, info.loaded_optimizer) == (9, "weights", False)


class Opaque:
    pass


def test_extra_state_that_needs_pickle_is_refused(tmp_path):
    class Bad:
        def state_dict(self):
            return {"thing": Opaque()}

        def load_state_dict(self, sd):
            pass

    with pytest.raises(ValueError, match=r"^the training state \(LR scheduler state_dict or extra_state\) "
                                         r"holds a type that torch.load\(weights_only=True\) refuses"):
        write_checkpoint(str(tmp_path), model=torch.nn.Linear(1, 1), optimizer=None, lr_scheduler=None,
                         step=1, kind="full", rank_states=[capture_rank_state({"bad": Bad()})])
    assert not os.path.exists(tmp_path / "dyncheck.json"), "no manifest: never claimed complete"


def test_incomplete_checkpoint_is_detected(tmp_path):
    write_checkpoint(str(tmp_path), model=torch.nn.Linear(3, 2), optimizer=None, lr_scheduler=None, step=1,
                     kind="full", rank_states=[capture_rank_state(None)])
    assert read_manifest(str(tmp_path))["step"] == 1
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="is incomplete: model.safetensors is missing or truncated$"):
        read_manifest(str(tmp_path))
    assert read_manifest(str(tmp_path / "nothing")) is None


def test_unknown_format_version_is_refused_with_the_fix(tmp_path):
    import pyarrow.fs as pafs

    from ray_dyncheck._state import read_stored_manifest

    write_checkpoint(str(tmp_path), model=torch.nn.Linear(3, 2), optimizer=None, lr_scheduler=None, step=1,
                     kind="full", rank_states=[capture_rank_state(None)])
    manifest = json.load(open(tmp_path / "dyncheck.json"))
    json.dump({**manifest, "format_version": 99}, open(tmp_path / "dyncheck.json", "w"))
    with pytest.raises(ValueError, match="format_version 99; this ray_dyncheck reads 1, 2: upgrade"):
        read_manifest(str(tmp_path))
    with pytest.raises(ValueError, match="format_version 99"):
        read_stored_manifest(pafs.LocalFileSystem(), str(tmp_path))


def test_unwrap_model():
    inner = torch.nn.Linear(1, 1)
    assert unwrap_model(torch.nn.DataParallel(torch.nn.DataParallel(inner))) is inner


def test_hf_model_weights_in_save_pretrained_layout(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    write_checkpoint(str(tmp_path), model=model, optimizer=None, lr_scheduler=None, step=4, kind="weights",
                     rank_states=[capture_rank_state(None)])
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    torch.manual_seed(1)
    fresh = transformers.LlamaForCausalLM(cfg)
    info = load_checkpoint(str(tmp_path), model=fresh, optimizer=None, lr_scheduler=None, extra_state=None, rank=0)
    assert info.step == 4
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
