"""The request channel on a real local filesystem (pyarrow.fs): claim, retire, stale, receipts."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pyarrow.fs as pafs
import pytest

from ray_dyncheck._requests.channel import RequestChannel, parse_body
from ray_dyncheck._requests.files import RUN_MARKER
from ray_dyncheck._requests.poller import RequestPoller


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = run_dir / RUN_MARKER
    marker.touch()
    past = time.time() - 100
    os.utime(marker, (past, past))  # the run "started" 100 s ago
    return run_dir


def channel(run_dir, trigger="dyncheck.save"):
    return RequestChannel(pafs.LocalFileSystem(), str(run_dir), trigger)


def receipts(run_dir):
    folder = run_dir / ".dyncheck" / "receipts"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.exists() else {}


def test_trigger_is_claimed_then_retired_with_receipt(run):
    ch = channel(run)
    assert ch.poll() == []
    (run / "dyncheck.save").touch()
    [req] = ch.poll()
    assert (req.source, req.kind, req.stop) == ("trigger", "full", False)
    assert not (run / "dyncheck.save").exists(), "claimed: moved out of the way"
    assert req.path is not None and os.path.exists(req.path)
    # A touch during the save is a new request, not lost and not merged.
    (run / "dyncheck.save").touch()
    [again] = ch.poll()
    assert again.id != req.id
    ch.retire([req], {"status": "ok", "step": 7, "checkpoint": "/x"})
    assert not os.path.exists(req.path)
    got = receipts(run)[req.id]
    assert (got["status"], got["step"], got["checkpoint"], got["source"]) == ("ok", 7, "/x", "trigger")
    assert ch.poll() == []


def test_stale_trigger_is_discarded_with_warning(run, caplog):
    trig = run / "dyncheck.save"
    trig.touch()
    old = time.time() - 1000
    os.utime(trig, (old, old))
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        assert channel(run).poll() == []
    assert "written before this run started" in caplog.text
    assert not trig.exists()


def test_directory_trigger_acts_once_then_only_when_it_changes(run, caplog):
    trig = run / "dyncheck.save"
    trig.mkdir()
    ch = channel(run)
    with caplog.at_level(logging.ERROR, logger="ray_dyncheck"):
        first = ch.poll()
        assert [r.source for r in first] == ["trigger"]
        for _ in range(5):
            assert ch.poll() == [], "no save storm from a trigger that cannot be removed"
    assert caplog.text.count("is acted on once but it is a directory") == 1
    ch.retire(first, {"status": "ok"})
    assert trig.is_dir()
    later = time.time() + 5
    os.utime(trig, (later, later))  # `touch` on it again: a new version, a new request
    assert len(ch.poll()) == 1


def test_request_folder_bodies(run):
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    (folder / "a1.json").write_text(json.dumps({"id": "a1", "kind": "weights", "stop": True}))
    (folder / "b2.json").write_text("")
    (folder / "bad.json").write_text("{not json")
    (folder / "mismatch.json").write_text(json.dumps({"id": "other"}))
    (folder / "kind.json").write_text(json.dumps({"kind": "everything"}))
    (folder / "big.json").write_text(" " * (64 * 1024 + 1))
    (folder / ".partial-upload").write_text("{}")
    got = {r.id: r for r in channel(run).poll()}
    assert set(got) == {"a1", "b2"}
    assert (got["a1"].kind, got["a1"].stop, got["a1"].source) == ("weights", True, "request")
    assert (got["b2"].kind, got["b2"].stop) == ("full", False)
    rec = receipts(run)
    assert rec["bad"]["status"] == "rejected" and "not JSON" in rec["bad"]["error"]
    assert rec["mismatch"]["error"] == "request id 'other' does not match its file name 'mismatch'.json"
    assert rec["kind"]["error"] == "request kind must be 'full', 'weights' or 'none', got 'everything'"
    assert rec["big"]["error"] == "request body is 65537 bytes; the limit is 65536"
    assert sorted(p.name for p in folder.iterdir()) == [".partial-upload"]


def test_stale_request_gets_a_discarded_receipt(run):
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    req = folder / "old.json"
    req.write_text("{}")
    old = time.time() - 1000
    os.utime(req, (old, old))
    assert channel(run).poll() == []
    assert receipts(run)["old"] == {"id": "old", "status": "discarded",
                                    "error": "written before this run started",
                                    "time": receipts(run)["old"]["time"]}


def test_claimed_requests_survive_a_restart_but_not_a_new_run(run):
    (run / "dyncheck.save").touch()
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    (folder / "r1.json").write_text('{"kind": "weights"}')
    claimed = channel(run).poll()
    assert len(claimed) == 2
    # A worker restart inside the same fit: a fresh channel finds them pending again.
    again = channel(run).poll()
    assert sorted(r.id for r in again) == sorted(r.id for r in claimed)
    assert {r.id: r.kind for r in again}["r1"] == "weights"
    # A new fit rewrites the marker: claims from before it are stale.
    future = time.time() + 100
    os.utime(run / RUN_MARKER, (future, future))
    assert channel(run).poll() == []
    assert receipts(run)["r1"]["status"] == "discarded"
    assert list((run / ".dyncheck" / "claimed").iterdir()) == []


def test_absolute_trigger_path_outside_run_dir(tmp_path, run):
    outside = tmp_path / "elsewhere" / "go.save"
    outside.parent.mkdir()
    ch = channel(run, str(outside))
    outside.touch()
    [req] = ch.poll()
    assert not outside.exists()
    ch.retire([req], {"status": "ok"})
    assert receipts(run)[req.id]["status"] == "ok"


def test_parse_body_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"^unknown request field\(s\): extra$"):
        parse_body(b'{"extra": 1}', "x")
    with pytest.raises(ValueError, match="^request stop must be true or false, got 'yes'$"):
        parse_body(b'{"stop": "yes"}', "x")


def pollers() -> set[threading.Thread]:
    """The live poller threads in this process (``dyncheck-poller``)."""
    return {t for t in threading.enumerate() if t.name == "dyncheck-poller"}


def test_poller_claims_in_background_and_survives_storage_errors(run, caplog):
    ch = channel(run)
    before = pollers()
    poller = RequestPoller(ch, interval_s=0.05).start()
    try:
        [thread] = pollers() - before  # this poller's
        (run / "dyncheck.save").touch()
        deadline = time.time() + 10
        got = []
        while not got and time.time() < deadline:
            got = poller.take()
            time.sleep(0.02)
        assert [r.source for r in got] == ["trigger"]
        assert poller.take() == [], "taken once: one request, one checkpoint"
        # Break one source: the request folder becomes a file, so listing it fails. The trigger
        # still works, the error is logged once (rate-limited), nothing reaches the caller.
        folder = run / ".dyncheck" / "requests"
        folder.write_text("not a folder")
        with caplog.at_level(logging.ERROR, logger="ray_dyncheck"):
            (run / "dyncheck.save").touch()
            polls = poller.polls
            while poller.polls < polls + 5 and time.time() < deadline:
                time.sleep(0.02)
            got = poller.take()
        assert [r.source for r in got] == ["trigger"]
        assert thread.is_alive()
        assert caplog.text.count("cannot read requests") == 1, caplog.text
        # Storage back: a request written now is claimed.
        folder.unlink()
        folder.mkdir()
        (folder / "later.json").write_text("{}")
        got = []
        while not got and time.time() < deadline:
            got = poller.take()
            time.sleep(0.02)
        assert [r.id for r in got] == ["later"]
        poller.complete(got, {"status": "ok", "step": 3})
        assert poller.flush(5.0)
        assert receipts(run)["later"]["step"] == 3
    finally:
        poller.close(timeout=5)
    assert not thread.is_alive()


def test_trigger_on_another_filesystem_is_claimed_by_identity(tmp_path, run):
    # The run on a filesystem that is not this machine's local one (as S3 would be); the trigger an
    # absolute local path: it cannot be moved into claimed/, so this version is claimed by identity.
    # It is never deleted (no delete can be made conditional on the version there); the served version
    # is stored under the run, so neither a restart nor a new poll serves it again.
    run_fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    outside = tmp_path / "local" / "go.save"
    outside.parent.mkdir()
    ch = RequestChannel(run_fs, "run", str(outside))
    outside.touch()
    [req] = ch.poll()
    assert req.path is not None and outside.exists(), "a claim file of ours; the trigger stays"
    assert ch.poll() == [] and ch.poll() == [], "the same version is not a new request"
    ch.retire([req], {"status": "ok"})
    assert outside.exists(), "never deleted"
    assert receipts(run)[req.id]["status"] == "ok"
    assert ch.poll() == []
    assert RequestChannel(run_fs, "run", str(outside)).poll() == [], "a restart does not serve it again"
    later = time.time() + 5
    os.utime(outside, (later, later))  # written again
    [again] = ch.poll()
    assert again.id != req.id
    assert RequestChannel(run_fs, "run", str(outside)).poll() == [req for req in [again]], \
        "a restart before it was answered: the same claim, pending again, not a new one"


def test_a_claim_whose_read_fails_is_picked_up_at_the_next_poll(tmp_path, run):
    from faultfs import fault_fs, hits, set_plan

    plan = tmp_path / "plan.json"
    set_plan(plan, [{"op": "open_input_stream", "path": ".dyncheck/claimed", "action": "raise", "times": 1}])
    ch = RequestChannel(fault_fs(plan), str(run), "dyncheck.save")
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    (folder / "r1.json").write_text('{"kind": "weights"}')
    assert ch.poll() == [], "moved to claimed/, then the read failed"
    assert len(hits(plan)) == 1 and (run / ".dyncheck" / "claimed" / "r1.json").exists()
    [req] = ch.poll()
    assert (req.id, req.kind) == ("r1", "weights"), "not lost: the rescan found the claim"
    assert ch.poll() == [], "and only once"


def test_a_save_that_keeps_killing_the_workers_gets_an_error_receipt(run):
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    (folder / "r1.json").write_text("{}")
    [req] = channel(run).poll()
    channel(run).mark_attempt([req])  # the save started; the workers died (a restart follows)
    [again] = channel(run).poll()
    assert (again.id, again.attempts) == ("r1", 1)
    channel(run).mark_attempt([again])  # died again
    assert channel(run).poll() == [], "not a third try"
    got = receipts(run)["r1"]
    assert (got["status"], got["attempts"]) == ("error", 2)
    assert "started 2 times" in got["error"]
    assert list((run / ".dyncheck" / "claimed").iterdir()) == []


def test_a_recovered_claim_that_was_answered_is_retired_not_saved_again(run):
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    (folder / "r1.json").write_text("{}")
    [req] = channel(run).poll()
    channel(run).write_receipt({"id": "r1", "status": "ok", "step": 4})  # then the worker died
    assert channel(run).poll() == []
    assert list((run / ".dyncheck" / "claimed").iterdir()) == []
    assert receipts(run)["r1"]["step"] == 4


def test_retire_removes_the_attempt_marks(run):
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    (folder / "r1.json").write_text("{}")
    ch = channel(run)
    [req] = ch.poll()
    ch.mark_attempt([req])
    ch.retire([req], {"status": "ok"})
    assert list((run / ".dyncheck" / "claimed").iterdir()) == []


def test_poller_close_answers_what_training_never_served(run):
    from ray_dyncheck._requests.channel import answer_leftovers

    poller = RequestPoller(channel(run), interval_s=0.05).start()
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    (folder / "early.json").write_text("{}")
    deadline = time.time() + 10
    while not poller.has_pending() and time.time() < deadline:
        time.sleep(0.02)
    (folder / "late.json").write_text("{}")  # written just before the end: claimed by the last poll
    poller.close(timeout=5, unserved=(42, "training ended"))
    got = receipts(run)
    assert {k: (v["status"], v["step"]) for k, v in got.items()} == {"early": ("unserved", 42),
                                                                       "late": ("unserved", 42)}
    # After the run: whatever is still there (no hook left to read it) is answered by the driver.
    (folder / "after.json").write_text("{}")
    assert answer_leftovers(pafs.LocalFileSystem(), str(run), "the run ended") == ["after"]
    assert receipts(run)["after"]["status"] == "unserved"
    assert receipts(run)["early"]["step"] == 42, "a final receipt is never rewritten"
    assert os.listdir(folder) == []


def test_a_receipt_that_cannot_be_written_never_starves_new_claims(tmp_path, run):
    from faultfs import fault_fs, set_plan

    plan = tmp_path / "plan.json"
    set_plan(plan, [{"op": "open_output_stream", "path": ".dyncheck/receipts", "action": "raise"}])
    poller = RequestPoller(RequestChannel(fault_fs(plan), str(run), "dyncheck.save"), interval_s=0.05).start()
    try:
        folder = run / ".dyncheck" / "requests"
        folder.mkdir(parents=True)
        (folder / "r1.json").write_text("{}")
        deadline = time.time() + 10
        got: list = []
        while not got and time.time() < deadline:
            got = poller.take()
            time.sleep(0.02)
        poller.complete(got, {"status": "ok", "step": 1})  # cannot be written while the fault lasts
        (folder / "r2.json").write_text("{}")
        later: list = []
        while not later and time.time() < deadline:
            later = poller.take()
            time.sleep(0.02)
        assert [r.id for r in later] == ["r2"], "claims go on while a receipt keeps failing"
        assert not poller.flush(0.3), "the failed receipt is still queued, not dropped"
        set_plan(plan, [])
        assert poller.flush(5.0)
        assert receipts(run)["r1"]["step"] == 1
    finally:
        poller.close(timeout=5)


def test_a_reused_request_id_is_refused_not_served_twice(run, caplog):
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    (folder / "nightly.json").write_text("{}")
    ch = channel(run)
    [req] = ch.poll()
    ch.retire([req], {"status": "ok", "step": 3})
    (folder / "nightly.json").write_text("{}")  # the same id again
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        assert ch.poll() == [] and ch.poll() == []
    assert caplog.text.count("its id was used before") == 1
    assert receipts(run)["nightly"]["step"] == 3, "the first receipt stands"
    assert (folder / "nightly.json").exists()


def test_leftovers_after_the_run(tmp_path, run):
    from faultfs import fault_fs, set_plan
    from ray_dyncheck._requests.channel import answer_leftovers

    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    for rid in ("crashed", "waiting", "answered"):
        (folder / f"{rid}.json").write_text("{}")
    ch = channel(run)
    claimed = {r.id: r for r in ch.poll()}
    ch.mark_attempt([claimed["crashed"]])  # its save started; the workers died; no restart followed
    ch.write_receipt({"id": "answered", "status": "ok", "step": 9})  # the claim outlived its answer
    (folder / "late.json").write_text("{}")
    # A receipt that cannot be read is never overwritten: that request is left for later.
    plan = tmp_path / "plan.json"
    set_plan(plan, [{"op": "open_input_stream", "path": "receipts/answered.json", "action": "raise"}])
    assert sorted(answer_leftovers(fault_fs(plan), str(run), "the run ended")) == ["crashed", "late", "waiting"]
    got = receipts(run)
    assert (got["crashed"]["status"], got["crashed"]["attempts"]) == ("error", 1)
    assert got["crashed"]["error"].startswith("its save was started 1 time(s) and the workers died during it")
    assert got["waiting"]["status"] == got["late"]["status"] == "unserved"
    assert got["answered"] == {"id": "answered", "status": "ok", "step": 9, "time": got["answered"]["time"]}
    assert sorted(os.listdir(run / ".dyncheck" / "claimed")) == ["answered.json"]
    set_plan(plan, [])
    assert answer_leftovers(fault_fs(plan), str(run), "the run ended") == []
    assert os.listdir(run / ".dyncheck" / "claimed") == [] and receipts(run)["answered"]["step"] == 9


def test_a_repeated_storage_error_is_logged_with_how_often(caplog):
    """Once a minute, an identical failure says how many times it happened since it was last logged."""
    from ray_dyncheck._requests.files import ErrorLog

    now = [0.0]
    log = ErrorLog(clock=lambda: now[0], every_s=60.0)
    exc = OSError("connection refused")
    with caplog.at_level(logging.ERROR, logger="ray_dyncheck"):
        for t in range(0, 125, 5):  # every 5 s for two minutes
            now[0] = float(t)
            log.log("read the trigger", "s3://b/run", exc)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "still failing" not in lines[0]
    assert "still failing: 12 times in the last minute" in lines[1], lines[1]
    assert "still failing: 12 times in the last minute" in lines[2], lines[2]


def _claim_answered_ok(run, body: str = "{}"):
    """A request claimed, saved and answered ``ok``, whose claim could not be removed (storage error at
    the end of a run): it sits in claimed/ next to its final receipt."""
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r1.json").write_text(body)
    [req] = channel(run).poll()
    channel(run).write_receipt({"id": "r1", "status": "ok", "step": 4, "checkpoint": "/ckpt"})
    return req


def test_a_final_receipt_survives_a_new_run(run):
    """The next fit() rewrites the start marker, so the leftover claim is stale: it is removed, but its
    ``ok`` receipt stays ``ok`` (not rewritten ``discarded``)."""
    req = _claim_answered_ok(run)
    future = time.time() + 100
    os.utime(run / RUN_MARKER, (future, future))
    assert channel(run).poll() == []
    assert (receipts(run)["r1"]["status"], receipts(run)["r1"]["step"]) == ("ok", 4)
    assert not os.path.exists(req.path)


def test_a_final_receipt_survives_a_rejected_body(run):
    req = _claim_answered_ok(run)
    with open(req.path, "w") as f:
        f.write("not json")
    assert channel(run).poll() == []
    assert receipts(run)["r1"]["status"] == "ok"


def test_a_final_receipt_survives_the_unserved_answer_at_the_end(run):
    """A request in hand whose save was answered meanwhile (``ok``) is not rewritten ``unserved``."""
    folder = run / ".dyncheck" / "requests"
    folder.mkdir(parents=True)
    poller = RequestPoller(channel(run), interval_s=0.05).start()
    (folder / "r1.json").write_text("{}")
    deadline = time.time() + 10
    while not poller.has_pending() and time.time() < deadline:
        time.sleep(0.02)
    channel(run).write_receipt({"id": "r1", "status": "ok", "step": 4})
    poller.close(timeout=5, unserved=(9, "training ended"))
    assert (receipts(run)["r1"]["status"], receipts(run)["r1"]["step"]) == ("ok", 4)
    assert list((run / ".dyncheck" / "claimed").iterdir()) == []


def test_a_receipt_is_written_once_by_any_path(run, caplog):
    """``write_receipt`` itself refuses to overwrite a final receipt, whoever calls it (a second
    ``discarded``, an ``error`` after max attempts, a retried retirement)."""
    _claim_answered_ok(run)
    ch = channel(run)
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        for status in ("discarded", "error", "unserved", "rejected", "ok"):
            assert ch.write_receipt({"id": "r1", "status": status, "step": 99}) is False
    assert (receipts(run)["r1"]["status"], receipts(run)["r1"]["step"]) == ("ok", 4)
    assert any("already has its final receipt" in r.getMessage() for r in caplog.records)
    assert ch.write_receipt({"id": "r2", "status": "unserved"}) is True


def test_a_trigger_on_another_store_written_before_the_run_started_does_not_fire(tmp_path, run, caplog):
    """Staleness on the trigger's own store: the run's start marker moved onto that store's clock."""
    run_fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    outside = tmp_path / "local" / "go.save"
    outside.parent.mkdir()
    outside.touch()
    old = time.time() - 300  # before the run started (its marker: 100 s ago)
    os.utime(outside, (old, old))
    with caplog.at_level(logging.WARNING, logger="ray_dyncheck"):
        assert RequestChannel(run_fs, "run", str(outside)).poll() == []
        assert RequestChannel(run_fs, "run", str(outside)).poll() == []
    assert caplog.text.count("written before this run started") == 2  # once per channel
    assert outside.exists()
    now = time.time()
    os.utime(outside, (now, now))  # touched during the run
    assert len(RequestChannel(run_fs, "run", str(outside)).poll()) == 1
    assert not list(outside.parent.glob(".dyncheck-clock-*")), "the clock probes are removed"


def _elsewhere(tmp_path):
    """The run on a filesystem other than this machine's local one (as S3 would be), the trigger at an
    absolute local path: claimed by its version."""
    run_fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    trigger = tmp_path / "local" / "go.save"
    trigger.parent.mkdir(exist_ok=True)
    return run_fs, trigger, lambda: RequestChannel(run_fs, "run", str(trigger))


def test_a_version_claimed_before_a_restart_never_fires_again(tmp_path, run):
    """The process died between storing the claim and storing the version as served: the restarted
    channel serves the claim, stores its version as served before removing it, and a second restart
    does not serve it again."""
    run_fs, trigger, new_channel = _elsewhere(tmp_path)
    trigger.touch()
    [req] = new_channel().poll()
    served = run / ".dyncheck" / "served"
    for f in served.iterdir():
        f.unlink()  # its served record never landed
    ch = new_channel()  # restart 1
    [again] = ch.poll()
    assert again.id == req.id
    ch.retire([again], {"status": "ok", "step": 3})
    assert new_channel().poll() == [], "restart 2: the same version is not served again"
    assert list(receipts(run)) == [req.id]


def test_a_version_answered_before_its_served_record_landed_is_not_served_again(tmp_path, run):
    """One id per version: a claim written again (a timed-out write retried, a lost served record)
    finds its receipt and is not a second request."""
    run_fs, trigger, new_channel = _elsewhere(tmp_path)
    trigger.touch()
    ch = new_channel()
    [req] = ch.poll()
    ch.retire([req], {"status": "ok", "step": 3})
    for f in (run / ".dyncheck" / "served").iterdir():
        f.unlink()
    assert new_channel().poll() == []
    assert list(receipts(run)) == [req.id] and receipts(run)[req.id]["step"] == 3


def test_an_unreadable_claim_does_not_stop_the_trigger(tmp_path, run, caplog):
    (run / ".dyncheck" / "claimed" / "odd.json").mkdir(parents=True)  # not a file: cannot be read
    ch = channel(run)
    with caplog.at_level(logging.ERROR, logger="ray_dyncheck"):
        assert ch.poll() == []
        (run / "dyncheck.save").touch()
        assert [r.source for r in ch.poll()] == ["trigger"]
    assert "cannot read a claimed request" in caplog.text


def test_a_stale_trigger_claim_gets_a_discarded_receipt(run):
    trig = run / "dyncheck.save"
    trig.touch()
    old = time.time() - 1000
    os.utime(trig, (old, old))
    assert channel(run).poll() == []
    [(rid, got)] = receipts(run).items()
    assert rid.startswith("trigger-") and got["status"] == "discarded"
    assert "written before this run started" in got["error"]


def test_the_served_version_is_read_back_after_a_restart(tmp_path, run):
    """The served record alone keeps a version from firing again (its claim and receipt gone)."""
    run_fs, trigger, new_channel = _elsewhere(tmp_path)
    trigger.touch()
    ch = new_channel()
    [req] = ch.poll()
    ch.retire([req], {"status": "ok", "step": 3})
    (run / ".dyncheck" / "receipts" / f"{req.id}.json").unlink()  # e.g. receipts cleaned up
    assert new_channel().poll() == []
