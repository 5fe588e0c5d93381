"""The one cross-rank decision per check, and how often to check.

Shape (as in Lightning's cross-rank decisions): rank 0 computes the decision locally, one collective
delivers it, every rank acts on the same value. The collective runs on a CPU (gloo) side group, so
NCCL training never synchronises for it, and every rank calls it at the same steps, always. Nothing
here imports Ray.

Example (every rank runs this at the same step):
    >>> agreement = Agreement()          # world size 1 / no process group: local only
    >>> agreement.agree(Decision(save=True, kind="full", next_interval=7)).next_interval
    7
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Agreement", "AutoInterval", "Decision"]

logger = logging.getLogger(__name__)

_KINDS = {0: None, 1: "weights", 2: "full"}
_CODES = {v: k for k, v in _KINDS.items()}
REASONS = ("schedule", "request", "trigger", "interrupt", "preemption")


@dataclass(frozen=True)
class Decision:
    """What all ranks do at this check."""

    save: bool = False
    kind: str | None = None
    """``full`` or ``weights`` when saving."""
    stop: bool = False
    """Leave the training loop after this step (after the save, if any)."""
    next_interval: int = 1
    """Steps until the next check (``check_interval: auto``)."""
    reason: str = "request"
    """Why it saves: one of ``REASONS`` (for metrics and metadata on every rank)."""
    busy: bool = False
    """Some rank still has a save in flight (its files not yet stored): no new save starts."""

    def encode(self) -> list[int]:
        return [int(self.save), _CODES[self.kind if self.save else None], int(self.stop),
                max(1, int(self.next_interval)), REASONS.index(self.reason), int(self.busy)]

    @classmethod
    def decode(cls, values: list[int]) -> Decision:
        save, kind, stop, interval, reason, busy = values
        return cls(save=bool(save), kind=_KINDS[kind] if save else None, stop=bool(stop),
                   next_interval=max(1, interval), reason=REASONS[reason], busy=bool(busy))


class Agreement:
    """Delivers rank 0's decision to every rank with one ``all_reduce(MAX)`` on a gloo group.

    Construct it on every rank at the same point (creating the side group is itself collective).
    Ranks other than 0 contribute zeros, so the result is rank 0's decision; any rank may raise a flag
    (``stop``) and every rank sees it. Without an initialised process group, or at world size 1, no
    collective runs. ``timeout_s`` bounds every collective on the side group: a rank that died makes
    the others raise after it, instead of waiting out the default (30 minutes).
    """

    def __init__(self, timeout_s: float | None = None) -> None:
        self.group: dist.ProcessGroup | None = None
        self.rank, self.world_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            if self.world_size > 1:
                # A side group even when the default one is gloo: our collective never interleaves
                # with the user's on the same communicator.
                timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
                self.group = dist.new_group(backend="gloo", timeout=timeout)
                # Connect now: the first collective on a group is far slower than the rest, and
                # would mislead the first interval chosen by `auto`.
                dist.all_reduce(torch.zeros(6, dtype=torch.int64), group=self.group)

    def agree(self, local: Decision) -> Decision:
        """Every rank calls this at the same step. Rank 0's ``local`` is the decision; ``stop`` and
        ``busy`` are raised when any rank's is."""
        if self.group is None:
            return local
        values = local.encode() if self.rank == 0 else [0, 0, int(local.stop), 0, 0, int(local.busy)]
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return Decision.decode(t.tolist())

    def any_rank(self, flag: bool) -> bool:
        """``True`` on every rank when ``flag`` is set on any rank (one small collective)."""
        if self.group is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def gather(self, obj: object) -> list[object] | None:
        """Collect one small picklable object per rank on rank 0 (only when saving)."""
        if self.group is None:
            return [obj]
        out: list[object] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return out

    def broadcast(self, obj: object) -> object:
        """Rank 0's small picklable ``obj`` on every rank (every rank calls it)."""
        if self.group is None:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def all_gather(self, obj: object) -> list[object]:
        """Every rank's small picklable ``obj``, in rank order, on every rank."""
        if self.group is None:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        """Release the side group (a local operation for gloo; safe after a peer died)."""
        group, self.group = self.group, None
        if group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except Exception:  # already torn down with the default group
                logger.debug("dyncheck: side group already destroyed", exc_info=True)


def _nice_down(n: float) -> int:
    """The largest of 1, 2, 5, 10, 20, 50, ... that is <= n (at least 1)."""
    if n < 2:
        return 1
    exp = 10 ** math.floor(math.log10(n))
    for m in (5, 2, 1):
        if m * exp <= n:
            return int(m * exp)
    return int(exp)  # pragma: no cover


def _nice(n: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= n: stable intervals, fewer log lines."""
    if n <= 1:
        return 1
    exp = 10 ** math.floor(math.log10(n))
    for m in (1, 2, 5, 10):
        if m * exp >= n:
            return int(m * exp)
    return int(10 * exp)  # pragma: no cover


class AutoInterval:
    """Rank 0's choice of the next check interval for ``check_interval: auto``.

    Two limits, the longer of which is the interval:

    * **the budget**: checks stay within ``max_overhead`` of training time. It keeps a smoothed step
      time (training only, our own work excluded), what a check costs on rank 0 (the mean of the
      last 8 without the largest: waits for a slower rank count, unless one was a one-off) and the
      hook's own time per ordinary step; the interval is the shortest in 1, 2, 5, 10, ... for which
      ``check / interval + per_step <= max_overhead * step``. It grows at once when over budget (at
      most 10x per check) and shrinks only when ``SHRINK_AFTER`` checks in a row agree, to twice what
      they need, so noise in the measured costs does not make it flap;
    * **the floor**: about ``min_period_s`` between checks, in steps rounded down to 1, 2, 5, 10, ...
      (so between 0.4x and 1x of it). Rank 0's poller reads storage once per poll interval, so a
      check between two polls can carry no new request; ``WorkerCore`` passes half the poll interval.
      It follows the smoothed step time: up at most 10x per check, down at once (with a 20 % margin).
    """

    SHRINK_AFTER = 5

    def __init__(self, max_overhead: float, max_interval: int = 100_000, smoothing: float = 0.3,
                 min_period_s: float = 0.0) -> None:
        self.max_overhead = max_overhead
        self.min_period_s = min_period_s
        self.max_interval = max_interval
        self.smoothing = smoothing
        self.step_s: float | None = None
        self.check_s: float | None = None
        self.tick_s: float | None = None
        self.interval = 1
        self.budget = 1
        self.floor = 1
        self._recent_checks: list[float] = []
        self._short: list[float] = []

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def observe(self, step_s: float, check_s: float, tick_s: float = 0.0) -> int:
        """Record the mean step time since the last check, the last check's cost and the hook's mean
        time per ordinary step since; return the interval."""
        self.step_s = self._ema(self.step_s, max(step_s, 1e-9))
        self.tick_s = self._ema(self.tick_s, max(tick_s, 0.0))
        self._recent_checks = (self._recent_checks + [max(check_s, 0.0)])[-8:]
        kept = sorted(self._recent_checks)[:-1] if len(self._recent_checks) > 2 else self._recent_checks
        self.check_s = statistics.fmean(kept)
        # What is left of the budget per step once every step's own cost is paid (if the steps alone
        # exceed it, checks cannot help: budget them as if the steps cost nothing).
        per_step = self.max_overhead * self.step_s - self.tick_s
        if per_step <= 0:
            per_step = self.max_overhead * self.step_s
        need = self.check_s / per_step
        if need > self.budget:
            self.budget = min(self.max_interval, 10 * self.budget, _nice(need))
            self._short = []
        elif self.budget > _nice(2.5 * need):
            self._short.append(need)
            if len(self._short) >= self.SHRINK_AFTER:
                self.budget = _nice(2 * max(self._short))
                self._short = []
        else:
            self._short = []
        steps = self.min_period_s / self.step_s
        target = min(self.max_interval, _nice_down(steps))
        if target > self.floor:
            self.floor = min(target, 10 * self.floor)
        elif target < self.floor and steps < 0.8 * self.floor:
            self.floor = target
        self.interval = max(self.floor, self.budget)
        return self.interval
