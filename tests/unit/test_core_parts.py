"""The worker core's parts on their own, with plain collaborators: the cadence, the decision (deferral
and the preemption fold), receipts, and the plan's kind rules. World size 1: the agreement is local."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from ray_dyncheck import DynamicCheckpointConfig, Kind, Reason, Request, Source, Status
from ray_dyncheck._backends.base import Notice
from ray_dyncheck._core.agree import Agreement, Decision
from ray_dyncheck._core.cadence import Cadence
from ray_dyncheck._core.decision import Decider, Plan, decide
from ray_dyncheck._core.preempt import PreemptionPlan
from ray_dyncheck._core.receipts import Receipts

# -- the kind rules -------------------------------------------------------------------------------


def test_full_covers_weights_and_the_widest_kind_wins():
    assert Kind.FULL.covers(Kind.WEIGHTS) and Kind.FULL.covers("full") and Kind.WEIGHTS.covers("weights")
    assert not Kind.WEIGHTS.covers(Kind.FULL)
    assert Kind.widest("weights", None, "full") is Kind.FULL
    assert Kind.widest("weights", None) is Kind.WEIGHTS
    assert Kind.widest(None, "none") is None
    assert f"{Kind.FULL}-{Reason.MANUAL}-{Status.OK}" == "full-manual-ok" and Kind("weights") == "weights"


def test_a_plan_joined_with_a_later_one_saves_once_for_both():
    first = Plan(5, Kind.WEIGHTS, Reason.INTERRUPT, requests=(Request("a"),))
    later = Plan(6, Kind.FULL, Reason.TRIGGER, requests=(Request("b", source=Source.TRIGGER),))
    both = first.joined(later)
    assert (both.step, both.kind, both.reason) == (6, Kind.FULL, Reason.TRIGGER)
    assert [r.id for r in both.requests] == ["a", "b"]
    assert first.at_least(Kind.FULL).kind is Kind.FULL and first.at_step(9).step == 9
    assert not Plan(1, None, Reason.REQUEST, stop=True).save


def test_decide_takes_the_widest_kind_and_the_strongest_source():
    assert decide([], 7) == Decision(next_interval=7)
    d = decide([Request("a", kind=Kind.WEIGHTS), Request("t", source=Source.TRIGGER)], 3)
    assert (d.save, d.kind, d.reason, d.stop) == (True, Kind.FULL, Reason.TRIGGER, False)
    d = decide([Request("i", kind=Kind.WEIGHTS, stop=True, source=Source.INTERRUPT)], 3)
    assert (d.kind, d.reason, d.stop) == (Kind.WEIGHTS, Reason.INTERRUPT, True)
    d = decide([Request("n", kind=Kind.NONE, stop=True)], 3)
    assert (d.save, d.kind, d.stop) == (False, None, True)


# -- the cadence -----------------------------------------------------------------------------------


def test_a_fixed_interval_checks_at_its_multiples_also_after_a_resume():
    cadence = Cadence(DynamicCheckpointConfig(check_interval=5), timed=True)
    due = [s for s in range(1, 13) if not cadence.tick(s) and cadence.enter(s)[0]
           and cadence.checked(s, 1, rank0=True) is None]
    assert due == [5, 10]
    cadence.start_at(7)
    assert cadence.next_check == 10 and cadence.current == 5


def test_a_waiting_request_is_announced_once_before_its_check(caplog):
    waiting = [False]
    cadence = Cadence(DynamicCheckpointConfig(check_interval=100), timed=True, waiting=lambda: waiting[0])
    assert cadence.tick(1)
    waiting[0] = True
    assert not cadence.tick(2), "the first step that sees it is not a plain tick"
    with caplog.at_level("WARNING"):
        assert cadence.enter(2) == (False, pytest.approx(time.perf_counter(), abs=5))
    assert "a request is waiting; the next check is in 98 step(s)" in caplog.text
    assert cadence.tick(3), "said once"


def test_auto_checks_the_next_step_then_as_agreed_and_disabled_never():
    cadence = Cadence(DynamicCheckpointConfig(check_interval="auto"), timed=True)
    assert not cadence.tick(1)
    due, t = cadence.enter(1)
    assert due
    cadence.checked(1, 20, rank0=True)
    cadence.measured(t)
    assert cadence.next_check == 21 and cadence.current == 20
    off = Cadence(DynamicCheckpointConfig(enabled=False), timed=True)
    assert all(off.tick(s) for s in range(1, 1000))


def test_a_check_now_at_the_step_just_counted_counts_no_training_and_announces_nothing(caplog):
    """The check at the end of a validation or evaluation (``now``) at the step whose end was already counted:
    due whatever the interval, silent about a waiting request (it is served now), and the evaluation's time
    is not a training step's for ``auto``."""
    waiting = [True]
    cadence = Cadence(DynamicCheckpointConfig(check_interval=100), timed=True, waiting=lambda: waiting[0])
    assert not cadence.tick(3)
    with caplog.at_level("WARNING"):
        assert cadence.enter(3)[0] is False  # the step's own end: not due, the request announced
        cadence.end_step()
        time.sleep(0.05)  # an evaluation
        assert cadence.enter(3, now=True)[0] is True
    assert caplog.text.count("a request is waiting") == 1
    auto = Cadence(DynamicCheckpointConfig(check_interval="auto"), timed=True)
    for step in (1, 2):
        auto.enter(step)
        auto.end_step()
    time.sleep(0.2)  # an evaluation after step 2
    auto.enter(2, now=True)
    auto.observe()
    assert auto.auto is not None and auto.auto.step_s is not None
    assert auto.auto.step_s < 0.02, "the evaluation is no training step (else about 0.2 s / 3 steps)"


# -- the decision ----------------------------------------------------------------------------------


class Pending:
    """The poller's training-thread side: take, requeue, begin."""

    def __init__(self, *requests: Request) -> None:
        self.pending = list(requests)
        self.begun: list[str] = []

    def take(self) -> list[Request]:
        out, self.pending = self.pending, []
        return out

    def requeue(self, requests: Sequence[Request]) -> None:
        self.pending[:0] = list(requests)

    def begin(self, requests: Sequence[Request]) -> threading.Event:
        self.begun += [r.id for r in requests]
        done = threading.Event()
        done.set()
        return done


def decider(poller: Pending, *, notice: Notice | None = None, last: tuple[Kind | None, int | None] = (None, None),
            mode: str = "auto") -> tuple[Decider, list[list[Request]], list[str]]:
    attached: list[list[Request]] = []
    counted: list[str] = []
    d = Decider(Agreement(), PreemptionPlan(mode), poller=lambda: poller, read_notice=lambda: notice,  # type: ignore
                count_request=counted.append, attach=attached.append, last=lambda: last)
    return d, attached, counted


def test_requests_are_decided_on_and_their_attempt_marked():
    poller = Pending(Request("a", kind=Kind.WEIGHTS))
    d, _, _ = decider(poller)
    agreed, requests, _ = d.decide(10, 5, busy=False)
    assert (agreed.save, agreed.kind, agreed.next_interval) == (True, Kind.WEIGHTS, 5)
    assert [r.id for r in requests] == ["a"] and poller.begun == ["a"]


def test_a_save_in_flight_defers_a_request_to_the_next_check():
    poller = Pending(Request("a"))
    d, attached, _ = decider(poller, last=(Kind.WEIGHTS, 5))
    agreed, requests, _ = d.decide(10, 5, busy=True)
    assert not agreed.save and not agreed.stop and requests == []
    assert [r.id for r in poller.pending] == ["a"] and not attached and not poller.begun


def test_a_stop_the_save_in_flight_covers_is_answered_by_it_and_stops_now():
    stop = Request("i", kind=Kind.WEIGHTS, stop=True, source=Source.INTERRUPT)
    poller = Pending(stop)
    d, attached, _ = decider(poller, last=(Kind.FULL, 5))
    agreed, requests, _ = d.decide(10, 5, busy=True)
    assert agreed.stop and not agreed.save and requests == []
    assert attached == [[stop]] and poller.pending == []
    # A weights save in flight does not hold a full stop: it waits.
    poller = Pending(Request("f", kind=Kind.FULL, stop=True))
    d, attached, _ = decider(poller, last=(Kind.WEIGHTS, 5))
    agreed, _, _ = d.decide(10, 5, busy=True)
    assert not agreed.stop and not attached and [r.id for r in poller.pending] == ["f"]


def test_a_preemption_notice_saves_now_and_once():
    notice = Notice(deadline=time.time() + 3600, ranks=(1,), nodes=("node1",))
    d, _, counted = decider(Pending(), notice=notice)
    agreed, _, _ = d.decide(10, 5, busy=False)
    assert (agreed.save, agreed.kind, agreed.reason, agreed.stop) == (True, Kind.FULL, Reason.PREEMPTION, False)
    assert counted == [Source.PREEMPTION]
    again, _, _ = d.decide(15, 5, busy=False)
    assert not again.save, "a notice served is not served again"


def test_a_near_deadline_saves_weights_now_and_the_full_request_after_it():
    poller = Pending(Request("a", kind=Kind.FULL))
    d, _, _ = decider(poller, notice=Notice(deadline=time.time() + 10))
    agreed, requests, _ = d.decide(10, 5, busy=False)
    assert (agreed.kind, agreed.reason) == (Kind.WEIGHTS, Reason.PREEMPTION) and requests == []
    assert [r.id for r in poller.pending] == ["a"], "the full request waits for the next check"


def test_a_backend_that_cannot_read_notices_turns_them_off_not_the_requests(caplog):
    def broken() -> Notice | None:
        raise RuntimeError("no controller")

    poller = Pending(Request("a"))
    d = Decider(Agreement(), PreemptionPlan("auto"), poller=lambda: poller, read_notice=broken,  # type: ignore
                count_request=lambda s: None, attach=lambda r: None, last=lambda: (None, None))
    agreed, requests, _ = d.decide(10, 5, busy=False)
    assert agreed.save and [r.id for r in requests] == ["a"]
    assert "saving on preemption is off" in caplog.text


# -- receipts --------------------------------------------------------------------------------------


class Collaborators:
    def __init__(self, committed: bool = True) -> None:
        self.committed = committed
        self.answers: list[tuple[list[str], dict[str, Any], bool]] = []
        self.settled: list[tuple[int, str | None]] = []
        self.answered = threading.Event()

    def confirm(self, path: str) -> tuple[bool, str | None]:
        return (True, None) if self.committed else (False, "not registered")

    def answer(self, requests: list[Request], receipt: dict[str, Any], now: bool) -> None:
        self.answers.append(([r.id for r in requests], dict(receipt), now))
        self.answered.set()

    def settle(self, record: dict[str, Any], requests: list[Request], path: str | None) -> None:
        self.settled.append((record["step"], path))

    def receipts(self) -> Receipts:
        return Receipts(rank=0, confirm=self.confirm, answer=self.answer, settled=self.settle,
                        uri=lambda p: f"s3://{p}", last_step=lambda: 42)


def record(step: int = 10) -> dict[str, Any]:
    return {"step": step, "kind": "full", "reason": "trigger", "error": None}


def test_ok_only_once_committed_with_the_checkpoint_and_its_uri():
    c = Collaborators()
    receipts = c.receipts()
    on_done = receipts.expect(record(), [Request("a")], time.perf_counter())
    assert receipts.storing == 1 and receipts.busy == 1 and c.answers == []
    on_done("bucket/run/ckpt", None)
    assert receipts.wait(10)
    [(ids, receipt, now)] = c.answers
    assert ids == ["a"] and not now
    assert receipt["status"] == Status.OK and receipt["checkpoint_uri"] == "s3://bucket/run/ckpt"
    assert c.settled == [(10, "bucket/run/ckpt")]
    on_done("again", None)
    assert receipts.wait(10) and len(c.answers) == 1, "settled once"
    receipts.stop()


def test_not_registered_is_an_error_receipt():
    c = Collaborators(committed=False)
    receipts = c.receipts()
    receipts.expect(record(), [Request("a")], time.perf_counter())("path", None)
    assert receipts.wait(10)
    [(_, receipt, _)] = c.answers
    assert receipt["status"] == Status.ERROR and receipt["error"] == "not registered"
    assert c.settled == [(10, None)]
    receipts.stop()


def test_a_failed_store_is_answered_at_once_from_the_upload_thread():
    c = Collaborators()
    receipts = c.receipts()
    receipts.expect(record(), [Request("a")], time.perf_counter())(None, OSError("disk full"))
    [(_, receipt, now)] = c.answers
    assert now and receipt["status"] == Status.ERROR and "OSError: disk full" in receipt["error"]
    assert receipts.wait(1) and receipts.storing == 0
    receipts.stop()


def test_requests_attached_while_in_flight_get_that_save_s_receipt():
    c = Collaborators()
    receipts = c.receipts()
    on_done = receipts.expect(record(), [Request("a")], time.perf_counter())
    receipts.attach([Request("stop")])
    on_done("p", None)
    assert receipts.wait(10)
    [(ids, receipt, _)] = c.answers
    assert ids == ["a", "stop"] and receipt["status"] == Status.OK
    receipts.attach([Request("late")])  # its receipt is written already: the same, at once
    assert c.answers[-1][0] == ["late"] and c.answers[-1][1]["checkpoint"] == "p"
    receipts.stop()


def test_attach_with_no_save_in_flight_is_an_error_at_the_last_step():
    c = Collaborators()
    c.receipts().attach([Request("x")])
    [(_, receipt, _)] = c.answers
    assert receipt["status"] == Status.ERROR and receipt["step"] == 42


# -- the core with a real LocalBackend (one process) ------------------------------------------------


def test_a_stop_without_a_save_at_a_scheduled_step_is_answered_by_the_schedule_s_save(tmp_path):
    """``on_interrupt: none`` and ``save_steps`` at the same step: the scheduled save carries the stop's
    request, so its receipt names the checkpoint saved at that step (not "no checkpoint")."""
    import json

    import torch

    import ray_dyncheck as rdc

    run = tmp_path / "run"
    backend = rdc.LocalBackend(str(run))
    model = torch.nn.Linear(3, 1)
    with rdc.DynamicCheckpoint({"check_interval": 4, "save_steps": 4, "poll_interval_s": 0.05}, model=model,
                               backend=backend) as dc:
        folder = run / ".dyncheck" / "requests"
        folder.mkdir(parents=True)
        (folder / "stopme.json").write_text(json.dumps({"id": "stopme", "kind": "none", "stop": True}))
        deadline = time.time() + 30
        while dc.pending_requests == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert dc.pending_requests == 1
        while not dc.should_stop and dc.global_step < 8:
            dc.step()
    assert dc.global_step == 4
    saves = [(s["step"], s["kind"], s["reason"], s["requests"]) for s in dc.saves]
    assert saves == [(4, "full", "schedule", ["stopme"])]
    receipt = json.loads((run / ".dyncheck" / "receipts" / "stopme.json").read_text())
    assert receipt["status"] == "ok" and receipt["checkpoint"] == dc.saves[0]["path"]


def test_a_backend_that_does_not_subclass_backend_is_refused_with_the_fix():
    import torch

    import ray_dyncheck as rdc

    class Duck:
        rank, world_size = 0, 1

    fix = r"backend must subclass ray_dyncheck.Backend .* `class Duck\(ray_dyncheck.Backend\)`"
    with pytest.raises(TypeError, match=fix):
        rdc.DynamicCheckpoint({}, model=torch.nn.Linear(1, 1), backend=Duck())  # type: ignore[arg-type]
