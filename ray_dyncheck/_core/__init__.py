"""The worker core: what every per-worker adapter (the torch hook, the HF callback) stands on. See
:mod:`ray_dyncheck._core.worker` for the contract. Nothing here imports Ray."""

from .decision import Plan
from .worker import WorkerCore

__all__ = ["Plan", "WorkerCore"]
