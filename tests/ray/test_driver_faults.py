"""``rdc.fit`` when the run's storage fails under the driver: real driver processes (local Ray, a real
TorchTrainer with 2 CPU workers) storing the run on ``faultfs`` (a real pyarrow filesystem that raises
or hangs on chosen calls, here only in the driver process), signalled like a terminal would."""

from __future__ import annotations

import json
import os
import signal
import time

from drivers import KILLED_BY_SIGINT, finish, start_driver, wait_ready, weights_checkpoints

from faultfs import hits, set_plan

REQUEST_WRITE = {"op": "open_output_stream", "path": ".dyncheck/requests", "rank": "driver"}


def test_second_sigint_exits_within_seconds_while_the_request_write_hangs(tmp_path):
    plan = tmp_path / "plan.json"
    set_plan(plan, [{**REQUEST_WRITE, "action": "hang", "seconds": 3600}])
    proc, ready = start_driver(tmp_path, extra={"plan": str(plan)})
    wait_ready(proc, ready, tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(2.0)
    assert proc.poll() is None
    assert [h["op"] for h in hits(plan)] == ["open_output_stream"], "the request write should hang now"
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, tmp_path, timeout=60)
    elapsed = time.monotonic() - t0
    assert rc in KILLED_BY_SIGINT, log[-3000:]
    # The one functional bound: a second Ctrl+C ends the script within 5 s, whatever storage does.
    assert elapsed <= 5.0, (elapsed, log[-3000:])
    assert "forced exit (second SIGINT)" in log
    assert "the request is not written yet (storage has not answered)" in log
    print(f"second SIGINT -> driver exit {elapsed:.2f} s (request write hung)")


def test_failed_request_write_stops_cleanly_without_a_save(tmp_path):
    plan = tmp_path / "plan.json"
    set_plan(plan, [{**REQUEST_WRITE, "action": "raise"}])
    proc, ready = start_driver(tmp_path, extra={"plan": str(plan)})
    wait_ready(proc, ready, tmp_path)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, tmp_path, timeout=60)
    elapsed = time.monotonic() - t0
    assert rc in KILLED_BY_SIGINT, log[-3000:]
    [line] = [line for line in log.splitlines() if "injected fault" in line]
    assert "cannot ask the workers to save: writing the interrupt request into" in line
    assert f"{tmp_path / 'results' / 'run'} failed (OSError: injected fault" in line
    assert line.endswith("stopping without a save")
    # Python's own report of the KeyboardInterrupt the script ends with is the only traceback.
    tracebacks = log.split("Traceback (most recent call last):")[1:]
    assert [tb.rstrip().splitlines()[-1] for tb in tracebacks] in ([], ["KeyboardInterrupt"]), log[-3000:]
    assert "forced exit" not in log
    assert weights_checkpoints(tmp_path) == []
    print(f"SIGINT with a failing request write -> driver exit {elapsed:.1f} s")


def test_requests_left_when_the_run_ends_get_unserved_receipts(tmp_path):
    # Rank 0 cannot list the request folder, so only the driver can answer what lands there.
    plan = tmp_path / "plan.json"
    set_plan(plan, [{"op": "get_file_info_selector", "path": ".dyncheck/requests", "rank": 0, "action": "raise"}])
    body = {"id": "left-1", "kind": "full"}
    proc, _ = start_driver(tmp_path, dc={"check_interval": 100_000}, steps=150,
                           extra={"plan": str(plan), "actions": {"5": [f"request:{json.dumps(body)}"]}})
    rc, log = finish(proc, tmp_path, timeout=180)
    assert rc == 0, log[-3000:]
    assert any(h["rank"] == 0 for h in hits(plan)), "rank 0 should have failed to list the requests"
    channel = tmp_path / "results" / "run" / ".dyncheck"
    receipt = json.loads((channel / "receipts" / "left-1.json").read_text())
    assert receipt["status"] == "unserved", receipt
    assert receipt["error"] == "the run ended (fit() returned) before a check served it"
    assert not (channel / "requests" / "left-1.json").exists()
    assert "1 request(s) left in" in log and "answered 'unserved': left-1" in log


def test_a_request_write_that_lands_after_the_driver_gave_up_is_answered(tmp_path):
    # The write takes 9 s: the driver stops without a save at 5 s, and the request lands afterwards.
    plan = tmp_path / "plan.json"
    set_plan(plan, [{**REQUEST_WRITE, "action": "hang", "seconds": 9}])
    proc, ready = start_driver(tmp_path, extra={"plan": str(plan)})
    wait_ready(proc, ready, tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, tmp_path, timeout=90)
    assert rc in KILLED_BY_SIGINT, log[-3000:]
    assert "storage did not answer within 5 s); stopping without a save" in log, log[-3000:]
    channel = tmp_path / "results" / "run" / ".dyncheck"
    [request] = [json.loads(p.read_text()) for p in (channel / "receipts").glob("interrupt-*.json")] or [None]
    assert request is not None, (sorted(p.name for p in channel.rglob("*")), log[-3000:])
    assert request["status"] == "unserved", request
    assert request["error"] == ("the driver stopped the run without a save (its interrupt request could not be "
                                "written in time)")
    assert not list((channel / "requests").glob("*.json"))
    assert f"1 request(s) left in {tmp_path / 'results' / 'run'} answered 'unserved': {request['id']}" in log
    assert weights_checkpoints(tmp_path) == []
