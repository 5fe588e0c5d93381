"""Sharding wrappers the hook does not support are refused when it is created, naming what is supported."""

from __future__ import annotations

import pytest
import torch

import ray_dyncheck as rdc


@pytest.mark.timeout(120)
def test_fsdp1_and_deepspeed_are_refused_when_the_hook_is_created(tmp_path):
    class FullyShardedDataParallel(torch.nn.Module):  # what FSDP1's wrapper is called
        pass

    class DeepSpeedEngine(torch.nn.Module):
        pass

    for wrapper, words in ((FullyShardedDataParallel, "FSDP1"), (DeepSpeedEngine, "DeepSpeed")):
        with pytest.raises(ValueError, match=f"{words}.*Supported: .*fully_shard"):
            rdc.DynamicCheckpoint({"enabled": False}, model=wrapper(), backend=rdc.LocalBackend(str(tmp_path)))

