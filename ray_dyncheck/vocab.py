"""The words of the protocol: what a checkpoint holds, why it was saved, how a request ended, where a
request came from.

Each is a ``(str, Enum)``: a member is equal to its string (``Kind.FULL == "full"``), hashes like it,
prints as it and is written to JSON as it, so every file on disk (metadata, manifests, receipts,
request bodies) reads exactly as before.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["FINAL_STATUSES", "Kind", "Reason", "Source", "Status"]


class _Word(str, Enum):
    """A member prints as its value (``f"{Kind.FULL}"`` is ``full``, on every Python version)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Kind(_Word):
    """What a checkpoint holds."""

    FULL = "full"
    """Weights, optimizer, scheduler, RNG, step and ``extra_state``: resumes exactly."""
    WEIGHTS = "weights"
    """Weights, scheduler, RNG and step, no optimizer: smaller, faster (the interrupt's default)."""
    NONE = "none"
    """No checkpoint (a request body's ``kind`` for "stop, save nothing")."""

    def covers(self, other: Kind | str | None) -> bool:
        """A save of this kind answers a request for ``other`` (full covers weights)."""
        return other is None or self == other or self == Kind.FULL

    @staticmethod
    def widest(*kinds: Kind | str | None) -> Kind | None:
        """The kind that covers all of ``kinds`` (``None`` when none asks for a save)."""
        present = {Kind(k) for k in kinds if k is not None and k != Kind.NONE}
        return Kind.FULL if Kind.FULL in present else Kind.WEIGHTS if present else None


class Reason(_Word):
    """Why a checkpoint was saved (its metadata's ``reason``, the metrics' ``reason`` tag)."""

    SCHEDULE = "schedule"
    """``save_steps`` (or HF's own save schedule)."""
    REQUEST = "request"
    """A request file (``ray-dyncheck save``, :func:`~ray_dyncheck.request_save`)."""
    TRIGGER = "trigger"
    """The trigger file (``touch <run dir>/dyncheck.save``)."""
    INTERRUPT = "interrupt"
    """Ctrl+C or ``ray job stop`` on the driver."""
    PREEMPTION = "preemption"
    """Ray reported a node of this run draining with a deadline."""
    MANUAL = "manual"
    """:meth:`DynamicCheckpoint.save` called by the training loop."""


class Status(_Word):
    """A receipt's ``status``: how a request ended (or that it has not yet)."""

    OK = "ok"
    """A checkpoint holding what it asked for is committed (or a stop without a save happened)."""
    ERROR = "error"
    """Its save failed (``error`` says why)."""
    REJECTED = "rejected"
    """Its body was invalid (``error`` names the field)."""
    DISCARDED = "discarded"
    """A trigger older than this run, not served."""
    UNSERVED = "unserved"
    """Training ended before a check served it."""
    PENDING = "pending"
    """Not answered yet (never written to disk by the workers; what :func:`~ray_dyncheck.request_save`
    returns without ``wait``)."""


FINAL_STATUSES = frozenset({Status.OK, Status.ERROR, Status.REJECTED, Status.DISCARDED, Status.UNSERVED})
"""Receipts that never change again."""


class Source(_Word):
    """Where a request came from (the ``requests`` metric's ``source`` tag)."""

    TRIGGER = "trigger"
    """The trigger file."""
    REQUEST = "request"
    """The request folder."""
    INTERRUPT = "interrupt"
    """The driver's Ctrl+C / ``ray job stop`` handler (through the request folder)."""
    PREEMPTION = "preemption"
    """A preemption notice (counted as a request; it is not a file)."""
