"""The parts of the Lightning adapter that subclass Lightning's own classes: a strategy for FSDP2 under Ray, and
the ``CheckpointIO`` wrapper a save goes through. Lightning is imported as ``ray.train.lightning`` imports it:
``lightning.pytorch``, else the ``pytorch_lightning`` package."""

from __future__ import annotations

from typing import Any

import torch

try:
    try:
        import lightning.pytorch as pl
    except ModuleNotFoundError:
        import pytorch_lightning as pl  # type: ignore[no-redef]
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "ray_dyncheck.lightning needs PyTorch Lightning: pip install 'ray_dyncheck[lightning]'. The import failed "
        f"with: {exc}"
    ) from exc

__all__ = ["Recording", "RayModelParallelStrategy", "pl"]


class RayModelParallelStrategy(pl.strategies.ModelParallelStrategy):  # type: ignore[misc,name-defined]
    """Lightning's ``ModelParallelStrategy`` (FSDP2 and tensor parallelism, ``configure_model``) in a Ray
    ``TorchTrainer`` worker: what ``ray.train.lightning`` does for ``DDPStrategy`` (``RayDDPStrategy``).

    Lightning's own class indexes its devices by local rank (under Ray each worker sees its own device, so
    the second worker on a node fails) and sizes the mesh from nodes × devices (1 × 1 under Ray). Here the
    device is Ray's (``ray.train.torch.get_device()``) and the mesh is ``data_parallel_size`` ×
    ``tensor_parallel_size`` over Ray's world (default: data parallel over every worker). Use it with
    ``RayLightningEnvironment`` and without ``prepare_trainer`` (which only checks the strategy's class and
    knows Ray's three). Runs on CPU workers too (gloo), where FSDP2 shards on the CPU.
    """

    def __init__(self, data_parallel_size: Any = "auto", tensor_parallel_size: Any = 1, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    @property
    def root_device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    @property
    def num_processes(self) -> int:
        return 1  # one process per Ray worker

    def setup_environment(self) -> None:
        import ray.train

        world = ray.train.get_context().get_world_size()
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = world // int(self._tensor_parallel_size)
        if int(self._data_parallel_size) * int(self._tensor_parallel_size) != world:
            raise ValueError(f"RayModelParallelStrategy: data_parallel_size ({self._data_parallel_size}) × "
                             f"tensor_parallel_size ({self._tensor_parallel_size}) must be Ray's world size "
                             f"({world}): pass sizes whose product is ScalingConfig(num_workers)")
        super().setup_environment()


class Recording(pl.plugins.CheckpointIO):  # type: ignore[misc,name-defined]
    """The strategy's own ``CheckpointIO`` for one save, recording a failure of its write instead of raising
    it: rank 0 then still reaches Lightning's barrier in ``save_checkpoint``, and every rank learns of the
    error in our next collective (no rank is left waiting in Lightning's)."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        async_io = getattr(pl.plugins, "AsyncCheckpointIO", None)
        if async_io is not None and isinstance(inner, async_io):
            inner = inner.checkpoint_io  # written now: staging links the file right after the save returns
        self.inner = inner
        self.error: BaseException | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        try:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        except Exception as exc:
            self.error = exc

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
