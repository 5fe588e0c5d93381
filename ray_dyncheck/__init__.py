"""ray_dyncheck: on-demand checkpoints for distributed training on Ray Train.

Touch ``<run dir>/dyncheck.save`` (or write a request) and every rank of a ``TorchTrainer`` saves one
resumable checkpoint at the next check, reported as a ``ray.train.Checkpoint``; training goes on.
PyTorch loops use :class:`DynamicCheckpoint`; a Hugging Face ``Trainer`` uses
``DynamicCheckpointCallback`` and ``hf_resume_path`` (the ``transformers`` extra).
"""

from ._backends.base import Backend
from ._backends.local import LocalBackend
from ._core.agree import Decision
from ._requests.channel import Request
from ._state import CheckpointInfo, Stateful
from .client import request_save, run_status
from .config import DynamicCheckpointConfig, load_config
from .driver import fit
from .errors import CheckpointRestoreError, CheckpointUploadError, RunNotFoundError
from .export import export_checkpoint
from .hook import DynamicCheckpoint
from .vocab import Kind, Reason, Source, Status

# Loaded on first use and left out of __all__, so `import ray_dyncheck` (even `import *`) works
# without the transformers extra.
_HF = ("DynamicCheckpointCallback", "hf_resume_path")


def __getattr__(name: str) -> object:
    # The Hugging Face adapter imports transformers: only when asked for, so it stays an extra.
    if name in _HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'ray_dyncheck' has no attribute {name!r}")


__all__ = [
    "Backend",
    "CheckpointInfo",
    "CheckpointRestoreError",
    "CheckpointUploadError",
    "Decision",
    "DynamicCheckpoint",
    "DynamicCheckpointConfig",
    "Kind",
    "LocalBackend",
    "Reason",
    "Request",
    "RunNotFoundError",
    "Source",
    "Stateful",
    "Status",
    "export_checkpoint",
    "fit",
    "load_config",
    "request_save",
    "run_status",
]

__version__ = "0.1.0"
