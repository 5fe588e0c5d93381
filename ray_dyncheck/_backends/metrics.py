"""What rank 0 tells the dashboard: one method per event. This base records nothing (plain
``torch.distributed`` without Ray); :class:`ray_dyncheck._backends.ray.RayMetrics` sends each event to Ray's
metrics (Prometheus, the dashboard's Metrics view, Grafana). Every method is cheap and never raises.

The series (Ray prefixes each name with ``ray_``; every one is tagged with ``ray_train_run_name`` and
``ray_train_run_id``, as Ray Train's own):

==================================== ========= =================== ===================================
name                                 type      tags                what
==================================== ========= =================== ===================================
``dyncheck_requests``                counter   source              requests claimed (trigger, request,
                                                                   interrupt) and preemption notices
``dyncheck_checkpoints``             counter   kind, reason        checkpoints committed
``dyncheck_save_failures``           counter   kind, reason        saves that committed nothing
``dyncheck_save_blocked_seconds``    histogram kind                training time blocked per save
``dyncheck_request_to_commit_seconds`` histogram kind, reason      from the request (or decision) to
                                                                   the commit
``dyncheck_pending_requests``        gauge                         requests waiting for a check
``dyncheck_check_interval_steps``    gauge                         the current check interval
``dyncheck_steps_since_commit``      gauge                         work at risk: steps since the step
                                                                   of the newest committed checkpoint
``dyncheck_snapshot_age_steps``      gauge                         at each memory snapshot: steps since
                                                                   the newest complete one before it
``dyncheck_snapshot_bytes``          gauge     node                bytes of memory snapshots held, per
                                                                   node's holder
``dyncheck_restores``                counter   source              resumes, from ``memory`` or ``storage``
==================================== ========= =================== ===================================
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["Metrics"]


class Metrics:
    """Records nothing."""

    def request(self, source: str) -> None:
        """A request was claimed (or a preemption notice seen)."""

    def blocked(self, kind: str, seconds: float) -> None:
        """Training was blocked this long by one save."""

    def committed(self, kind: str, reason: str, seconds: float) -> None:
        """A checkpoint was committed ``seconds`` after it was asked for."""

    def failed(self, kind: str, reason: str) -> None:
        """A save committed nothing."""

    def check(self, pending: int, interval: int, steps_at_risk: int) -> None:
        """At each check: requests waiting, the check interval, steps since the newest commit."""

    def snapshot_age(self, steps: int) -> None:
        """At a memory snapshot: steps since the newest complete one (what a crash just now would lose)."""

    def snapshot_held(self, held: Mapping[str, int]) -> None:
        """A memory snapshot is complete: bytes held per node."""

    def restored(self, source: str) -> None:
        """A resume, from ``memory`` or ``storage``."""
