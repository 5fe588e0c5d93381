"""The errors users catch. Each is a builtin subclass, so ``except ValueError`` / ``OSError`` work too."""

from __future__ import annotations

__all__ = ["CheckpointRestoreError", "CheckpointUploadError", "RunNotFoundError"]


class RunNotFoundError(ValueError):
    """RUN is not a reachable Ray Train run directory (the CLI and :func:`ray_dyncheck.request_save`)."""


class CheckpointRestoreError(RuntimeError):
    """Resuming failed on at least one rank; every rank raises it, with the same message, at the same
    call (no rank trains on while another stopped)."""


class CheckpointUploadError(OSError):
    """A checkpoint's files could not be stored after every retry. Raised in Ray's upload thread, so
    Ray fails the worker group and ``FailureConfig`` decides what follows. When it was rank 0's upload,
    its requests got an ``error`` receipt first; another rank's leaves the claims to the restarted
    group. The message leaves out the cause's text (see ``__cause__``), so Ray does not retry it."""
