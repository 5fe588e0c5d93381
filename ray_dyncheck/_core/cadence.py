"""When to check: a fixed ``check_interval`` (multiples of N, as Axolotl), or ``auto`` (an interval
chosen from the measured step and check times), and the timers that measure them.

Nothing here talks to other ranks: the interval ``auto`` chooses on rank 0 travels in the agreed
decision, and every rank applies it with :meth:`Cadence.checked`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable

from ..config import DynamicCheckpointConfig

__all__ = ["AutoInterval", "Cadence"]

logger = logging.getLogger(__name__)


class Cadence:
    """One per rank, in the training thread: which step checks next, and (rank 0 with ``auto``) how
    long training, checks and our own per-step work take.

    ``waiting`` (rank 0 with a fixed interval): whether a claimed request waits for the next check;
    the first step that sees one makes :meth:`tick` return ``False`` once, so the caller says when it
    will be served.
    """

    def __init__(self, config: DynamicCheckpointConfig, *, timed: bool,
                 waiting: Callable[[], bool] | None = None) -> None:
        self.config = config
        # About half a poll interval at least between checks (a check between two polls carries nothing new).
        self.auto = AutoInterval(config.max_check_overhead, min_period_s=config.poll_interval_s / 2) \
            if config.auto_interval else None
        self.interval = 1
        """The interval ``auto`` agreed on last (1 before the first check)."""
        self.next_check = self._first_check_after(0)
        """The next check step (every rank): a multiple of ``check_interval``, or as ``auto`` agreed."""
        self.last_step = 0
        self._timed = timed and self.auto is not None
        """Rank 0 with ``auto``: the step and check times choose the interval."""
        self._waiting = waiting if self.auto is None else None
        self._announced = False
        self._logged_interval = 0
        self._train_s = 0.0
        self._steps_since_check = 0
        self._check_s = 0.0
        """Rank 0: how long the last check took (its whole call)."""
        self._tick_s = 0.0
        """Our own time in the ordinary steps since the last check (measured inside tick/check)."""
        self._t_exit: float | None = None

    @property
    def current(self) -> int:
        """Steps between checks now."""
        return self.interval if self.auto is not None else int(self.config.check_interval)

    def start_at(self, step: int) -> None:
        """Training (re)starts after ``step``: the next check is the next step (``auto``) or the next
        multiple of ``check_interval``."""
        self.next_check = self._first_check_after(step)
        self.last_step = step

    def tick(self, step: int, t_enter: float | None = None) -> bool:
        """The common step, as cheap as it can be: ``True`` when no check is due (and no waiting request
        is to be announced); ``t_enter``: when the caller's own per-step work began."""
        if step >= self.next_check or self._announce_due():
            return False
        self._steps_since_check += 1
        self.last_step = step
        if not self._timed:
            return True
        t = time.perf_counter() if t_enter is None else t_enter
        if self._t_exit is not None:
            self._train_s += t - self._t_exit
        self._t_exit = time.perf_counter()
        self._tick_s += self._t_exit - t
        return True

    def enter(self, step: int, now: bool = False) -> tuple[bool, float]:
        """The start of a step that was not a plain :meth:`tick`: ``(check due, when it began)``; ``now``:
        a check is due whatever the interval. When no check is due it may announce a waiting request."""
        t_enter = time.perf_counter()
        again = now and step == self.last_step  # after an evaluation at the step just counted: no training
        self.last_step = step
        if self._t_exit is not None and not again:
            self._train_s += t_enter - self._t_exit
        if not again:
            self._steps_since_check += 1
        if step >= self.next_check or now:
            self._announced = False
            return True, t_enter
        if self._announce_due():
            self._announced = True  # a fixed interval can be long: say when the request will be seen
            logger.warning("dyncheck: a request is waiting; the next check is in %d step(s) (check_interval=%s)",
                           self.next_check - step, self.config.check_interval)
        self._tick_s += time.perf_counter() - t_enter
        return False, t_enter

    def observe(self) -> int:
        """Rank 0 at a check, before deciding: the interval for the next one (``auto``: from the times
        measured since the last check)."""
        if self.auto is not None and self._train_s > 0:
            steps = self._steps_since_check
            self.interval = self.auto.observe(self._train_s / steps, self._check_s, self._tick_s / max(1, steps - 1))
        return self.interval

    def checked(self, step: int, agreed_interval: int, *, rank0: bool) -> None:
        """Every rank after the check's collective: the next check step."""
        if self.auto is not None:
            if rank0 and self._logged_interval != agreed_interval and self.auto.step_s:
                self._logged_interval = agreed_interval
                logger.info("dyncheck: check interval now %d steps (step %.2f ms, check %.3f ms, "
                            "limit %.2f%% of step time)", agreed_interval, (self.auto.step_s or 0) * 1e3,
                            (self.auto.check_s or 0) * 1e3, self.config.max_check_overhead * 100)
            self.interval = agreed_interval
            self.next_check = step + agreed_interval
        else:
            self.next_check = self._first_check_after(step)

    def measured(self, t_enter: float) -> None:
        """The end of a check that began at ``t_enter`` (its own cost, for ``auto``): the timers start over."""
        self._check_s = time.perf_counter() - t_enter
        self._tick_s = 0.0
        self._train_s, self._steps_since_check = 0.0, 0

    def end_step(self) -> None:
        """Our own work ends here; time from now to the next step is training."""
        self._t_exit = time.perf_counter()

    def _announce_due(self) -> bool:
        return self._waiting is not None and not self._announced and self._waiting()

    def _first_check_after(self, step: int) -> float:
        if not self.config.enabled:
            return math.inf
        if self.auto is None:
            n = int(self.config.check_interval)
            return (step // n + 1) * n
        return step + 1


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
