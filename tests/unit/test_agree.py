"""Agreement's choices in one process: the auto interval, the preemption plan and a decision's round trip."""

from __future__ import annotations

from ray_dyncheck._core.agree import Decision
from ray_dyncheck._core.cadence import AutoInterval, _nice


def test_auto_interval_choice():
    auto = AutoInterval(max_overhead=0.005)
    # 20 ms steps, 1 ms checks: 1 / (0.005 * 20) = 10 steps.
    assert auto.observe(0.020, 0.001) == 10
    # Noise around the same point keeps it.
    assert [auto.observe(0.021, 0.00095) for _ in range(3)] == [10, 10, 10]
    # One check that waited on a slow rank does not move it: the largest of the recent costs is left out.
    assert auto.observe(0.020, 0.050) == 10
    # Consistently slower checks: the budget forces a longer interval, 10x per check at most.
    assert [auto.observe(0.020, 0.004) for _ in range(9)][-1] == 50
    slow = AutoInterval(max_overhead=0.005)
    assert [slow.observe(0.001, 0.01) for _ in range(4)] == [10, 100, 1000, 2000]
    assert [_nice(x) for x in (0.3, 1, 1.01, 3, 7, 11, 99, 101)] == [1, 1, 2, 5, 10, 20, 100, 200]
    assert [_nice(x) for x in (0.3, 1, 1.01, 3, 7, 11, 99, 101)] == [1, 1, 2, 5, 10, 20, 100, 200]


def test_decision_round_trip():
    d = Decision(save=True, kind="weights", stop=True, next_interval=17, reason="interrupt")
    assert Decision.decode(d.encode()) == d
    assert Decision.decode(Decision(next_interval=3).encode()) == Decision(next_interval=3)


def test_preemption_plan_chooses_from_the_measured_time_to_commit():
    from ray_dyncheck._backends.base import Notice
    from ray_dyncheck._core.preempt import PreemptionPlan

    plan = PreemptionPlan("auto")
    soon, later = Notice(deadline=1000.0 + 20), Notice(deadline=1000.0 + 300)
    assert plan.choose(later, now=1000.0)[0] == "full", "nothing measured, 300 s left"
    assert plan.choose(soon, now=1000.0)[0] == "weights", "nothing measured, 20 s left"
    plan.observe_commit("weights", 2.0)  # full estimated at 3x: 6 s * 1.5 + 5 = 14 <= 20
    assert plan.choose(soon, now=1000.0)[0] == "full"
    plan.observe_commit("full", 12.0)  # 12 * 1.5 + 5 = 23 > 20
    kind, why = plan.choose(soon, now=1000.0)
    assert kind == "weights" and "12.0 s" in why and "20 s left" in why
    assert plan.choose(later, now=1000.0)[0] == "full"
    # Once served, the same notice asks for nothing more; a new one (another node) does; a failure of the
    # save that answers it re-arms it, a failure of another save does not.
    assert plan.pending(soon) is soon
    plan.served(soon, by_step=10)
    assert plan.pending(soon) is None and plan.pending(later) is later
    plan.failed(5)
    assert plan.pending(soon) is None
    plan.failed(10)
    assert plan.pending(soon) is soon
    assert PreemptionPlan("none").pending(soon) is None
    assert PreemptionPlan("weights").choose(later)[0] == "weights"
    # No deadline reported: Ray restarts 120 s after it saw the drain.
    undated = Notice(deadline=None, nodes=("n",))
    plan.pending(undated)
    assert 119 < plan.left_s(undated) <= 120


def test_auto_interval_settles_on_a_steady_but_noisy_run():
    """~100 ms steps and checks whose cost varies a lot (as against S3): the interval settles after the
    first checks and does not flap (it was seen going 10 -> 2 -> 5 -> 10 within a minute)."""
    import random

    for seed in range(20):
        rng, auto, changes = random.Random(seed), AutoInterval(max_overhead=0.005), []
        for check in range(300):
            before = auto.interval
            if auto.observe(0.1 * rng.lognormvariate(0, 0.1), 0.002 * rng.lognormvariate(0, 0.6)) != before:
                changes.append(check)
        assert len(changes) <= 5 and len([c for c in changes if c >= 50]) <= 1, (seed, changes)
    # It still shortens when checks really got cheaper, after a few checks that agree.
    auto = AutoInterval(max_overhead=0.005)
    assert [auto.observe(0.020, 0.004) for _ in range(3)][-1] == 50
    assert [auto.observe(0.020, 0.0001) for _ in range(15)][-1] <= 2


def test_auto_interval_checks_no_faster_than_requests_can_arrive():
    """With a poll every second, checking more than twice a second carries no new request: the floor
    is half the poll interval in steps (rounded down to 1, 2, 5, 10, ...), even when checks are cheap;
    a costly check still lengthens it beyond, and slower steps lower the floor at once."""
    auto = AutoInterval(max_overhead=0.005, min_period_s=0.5)
    # 0.5 s / 5 ms = 100 steps: reached in two checks (up 10x per check at most).
    assert [auto.observe(0.005, 0.00001) for _ in range(2)] == [10, 100]
    assert [auto.observe(0.005, 0.01) for _ in range(5)][-1] == 500  # 10 ms checks: the budget rules
    slow = AutoInterval(max_overhead=0.005, min_period_s=0.5)
    assert slow.observe(0.2, 0.00001) == 2  # 0.5 s / 200 ms = 2.5: rounded down, 0.4 s between checks
    assert slow.observe(0.6, 0.00001) == 1  # slower steps (smoothed: 0.32 s): the floor drops at once
    # A first step measured far too fast (a GPU loop that has not synchronised yet) does not silence
    # checks for long: the floor grows 10x per check at most and follows the real step time down at
    # once; the budget shrinks back once 5 checks agree.
    gpu = AutoInterval(max_overhead=0.005, min_period_s=0.5)
    assert [gpu.observe(s, 0.00001) for s in (0.0001, 0.3, 0.3, 0.3, 0.3, 0.3)] == [10, 10, 10, 10, 10, 2]
    assert gpu.floor == 2 and gpu.budget == 1


def test_auto_interval_budget_leaves_room_for_the_per_step_cost():
    """What each ordinary step costs comes off the budget first: 20 ms steps, 0.5 % = 100 us per step;
    with 50 us per step spent on counters, a 1 ms check needs 20 steps, not 10."""
    def settled(tick_s: float) -> list[int]:
        auto = AutoInterval(max_overhead=0.005)
        return [auto.observe(0.020, 0.001, tick_s) for _ in range(3)]

    assert settled(0.0) == [10, 10, 10]
    assert settled(0.00005) == [10, 20, 20]
    # Steps whose own cost alone exceeds the budget: checks cannot fix that; no runaway.
    assert settled(0.0002) == [10, 10, 10]


def test_preemption_plan_is_safe_across_the_training_and_upload_threads():
    """``served`` runs on the training thread, ``failed`` on the upload/commit thread. A failure of an
    older save must never clear a newer notice that was just served (that would save for it twice).

    On CPython 3.11 the bodies of both methods hold no thread switch point, so this also passed before
    the plan had its lock; the lock makes it hold by construction (free-threaded Python, or a log line
    added between the two stores), and this test pins it."""
    import sys
    import threading

    from ray_dyncheck._backends.base import Notice
    from ray_dyncheck._core.preempt import PreemptionPlan

    plan = PreemptionPlan("auto")
    rounds, stop, cleared = 20000, threading.Event(), []
    current = [0]

    def fail_older_saves() -> None:
        while not stop.is_set():
            plan.failed(current[0] - 1)  # the save before the one that answers the newest notice

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    other = threading.Thread(target=fail_older_saves)
    other.start()
    try:
        for k in range(1, rounds):
            notice = Notice(deadline=float(k))
            current[0] = k
            plan.served(notice, by_step=k)
            if plan.pending(notice) is not None:
                cleared.append(k)
                plan.served(notice, by_step=k)
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(old)
    assert cleared == [], f"a newer notice was cleared by an older save's failure {len(cleared)} times"
