"""Every injection point of the request path and the save path, on real gloo ranks (no Ray) and a
real fault-injecting filesystem: each case ends (no hang), every request gets one final receipt,
no claim is left behind, and a request made after the fault is served."""

from __future__ import annotations

import json
import os

import pytest

from faultfs import hits, set_plan
from gloo_workers import fault_cases_worker, restore_worker, run_ranks

RAISE, HANG = {"action": "raise"}, {"action": "hang", "seconds": 2, "times": 1}

# (case id, faults active from the start until step 20, worker options)
CASES = [
    # The request path: rank 0's poller.
    ("trigger-stat", [{"op": "get_file_info", "path": "dyncheck.save", **RAISE}], {}),
    ("run-marker-stat", [{"op": "get_file_info", "path": ".validate_storage_marker", **RAISE}], {}),
    ("list-requests", [{"op": "get_file_info_selector", "path": ".dyncheck/requests", **RAISE}], {}),
    ("list-claimed", [{"op": "get_file_info_selector", "path": ".dyncheck/claimed", **RAISE}], {}),
    ("claim-move", [{"op": "move", "path": ".dyncheck/claimed", **RAISE}], {}),
    ("claim-read", [{"op": "open_input_stream", "path": ".dyncheck/claimed", **RAISE, "times": 2}], {}),
    ("attempt-mark", [{"op": "open_output_stream", "path": ".attempt", **RAISE}], {}),
    ("receipt-write", [{"op": "open_output_stream", "path": ".dyncheck/receipts", **RAISE, "times": 3}], {}),
    # Recovering a claim reads its receipt first (answered already?): that read fails too.
    ("receipt-read", [{"op": "open_input_stream", "path": ".dyncheck/claimed", **RAISE, "times": 1},
                      {"op": "open_input_stream", "path": ".dyncheck/receipts", **RAISE}], {}),
    ("claim-delete", [{"op": "delete_file", "path": ".dyncheck/claimed", **RAISE}], {}),
    ("list-requests-hang", [{"op": "get_file_info_selector", "path": ".dyncheck/requests", **HANG}], {}),
    ("receipt-write-hang", [{"op": "open_output_stream", "path": ".dyncheck/receipts", **HANG}], {}),
    # The save path: rank 0 stores the checkpoint (LocalBackend), every rank gives its state.
    ("ckpt-mkdir", [{"op": "create_dir", "path": "/checkpoint_", **RAISE, "times": 1}], {}),
    ("ckpt-write", [{"op": "open_output_stream", "path": "/checkpoint_", **RAISE, "times": 1}], {}),
    ("ckpt-commit", [{"op": "open_output_stream", "path": ".dyncheck-committed", **RAISE, "times": 1}], {}),
    # The store runs in the background: later saves wait for it (one in flight), so train past the hang.
    ("ckpt-write-hang", [{"op": "open_output_stream", "path": "/checkpoint_", **HANG}], {"steps": 200}),
    ("state-rank1", [], {"state_rank": 1, "state_mode": "raise"}),
    ("state-rank0", [], {"state_rank": 0, "state_mode": "raise"}),
    ("unsafe-state-rank0", [], {"state_rank": 0, "state_mode": "unsafe"}),
    ("tmpdir-rank0", [], {"bad_tmpdir": True}),
    # Rank 1 never touches storage: every operation there fails, and nothing notices.
    ("everything-rank1", [{"op": "*", "path": "", **RAISE, "rank": 1}], {}),
]


def receipts(run_dir):
    folder = os.path.join(run_dir, ".dyncheck", "receipts")
    return {n[:-5]: json.load(open(os.path.join(folder, n))) for n in os.listdir(folder) if n.endswith(".json")}


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    """Every case, one after another in one pair of gloo processes (starting processes costs more than
    a case): ``{case id: (run_dir, plan, out)}``."""
    runs, cases = {}, []
    for name, rules, options in CASES:
        base = tmp_path_factory.mktemp(name)
        run_dir, plan, out = str(base / "run"), str(base / "plan.json"), str(base / "out")
        os.makedirs(out)
        set_plan(plan, rules)
        runs[name] = (run_dir, plan, out)
        cases.append((run_dir, plan, out, options))
    run_ranks(fault_cases_worker, 2, cases)
    return runs


@pytest.mark.timeout(900)  # the first one runs them all
@pytest.mark.parametrize("name,rules,options", CASES, ids=[c[0] for c in CASES])
def test_fault_ends_with_every_request_answered(fault_runs, name, rules, options):
    run_dir, plan, out = fault_runs[name]
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    assert not any("error" in r for r in ranks), [r.get("error") for r in ranks]
    steps = options.get("steps", 70)
    assert [r["final_step"] for r in ranks] == [steps, steps], "no rank stopped early or hung"
    injected = hits(plan)
    if "rank" in (rules[0] if rules else {}):
        assert injected == [], "rank 1 reads no storage at all"
    elif rules:
        assert injected, "the fault was hit"
    got = receipts(run_dir)
    assert got["r1"]["status"] in ("ok", "error", "unserved"), got["r1"]
    assert got["later"]["status"] == "ok", f"a request after the fault is served: {got['later']}"
    assert all(r["status"] in ("ok", "error") for r in got.values()), got
    assert any(k.startswith("trigger-") for k in got), "the trigger has its receipt"
    for sub in ("requests", "claimed"):
        folder = os.path.join(run_dir, ".dyncheck", sub)
        assert not os.path.isdir(folder) or os.listdir(folder) == [], f"{sub}/ left: {os.listdir(folder)}"
    saves = ranks[0]["saves"]
    for save in saves:  # an error receipt, or a committed checkpoint: never half of one
        path = os.path.join(run_dir, save["name"])
        if save["error"] is None:
            assert os.path.isfile(os.path.join(path, ".dyncheck-committed")), save
    if options.get("state_mode") or options.get("bad_tmpdir"):
        assert got["r1"]["status"] == "error" and got["r1"]["step"] == 5, got["r1"]


@pytest.mark.timeout(120)
def test_restore_failing_on_one_rank_fails_on_every_rank(tmp_path):
    run_dir, plan, out = str(tmp_path / "run"), str(tmp_path / "plan.json"), str(tmp_path / "out")
    os.makedirs(out)
    set_plan(plan, [{"op": "open_input_stream", "path": "/checkpoint_", "rank": 1, **RAISE}])
    run_ranks(restore_worker, 2, run_dir, plan, out)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    assert "restored" not in ranks[0] and "restored" not in ranks[1], "no rank resumed alone"
    assert ranks[0]["error"] == ranks[1]["error"]
    assert "failed on 1 rank(s): rank 1: OSError: injected fault" in ranks[0]["error"]


HOSTILE = {
    "notjson": b"{not json",
    "oversized": b'{"kind": "full", "pad": "' + b"x" * 70_000 + b'"}',
    "notutf8": b'\xff\xfe{"kind": "full"}',
    "kindtype": b'{"kind": 5}',
    "stoptype": b'{"stop": "yes"}',
    "idtype": b'{"id": 7}',
    "escape": b'{"id": "../../../etc/evil"}',
    "array": b"[1, 2]",
    "unknown": b'{"kind": "full", "path": "/tmp/x"}',
}


@pytest.mark.timeout(120)
def test_hostile_request_bodies_while_training(tmp_path):
    from gloo_workers import agreement_worker

    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "secret.json"
    outside.write_text('{"kind": "full"}')
    actions = {"5": [f"raw:{name}.json:{body.hex()}" for name, body in HOSTILE.items()]
               + [f"symlink:link.json:{outside}", "raw:..json:7b7d", "sleep:0.3"],
               "30": ['request:{"id": "fine"}', "sleep:0.3"]}
    cfg = {"check_interval": 5, "poll_interval_s": 0.05, "steps": 60, "step_time": 0.01}
    run_ranks(agreement_worker, 2, str(run_dir), str(out), cfg, actions)

    res = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    assert [r["final_step"] for r in res] == [60, 60], "training went on"
    got = receipts(str(run_dir))
    rejected = {k: v["error"] for k, v in got.items() if v["status"] == "rejected"}
    assert set(rejected) == set(HOSTILE), got
    assert rejected["oversized"].startswith("request body is 70") and "the limit is 65536" in rejected["oversized"]
    assert rejected["notutf8"].startswith("request body is not JSON")
    assert rejected["kindtype"] == "request kind must be 'full', 'weights' or 'none', got 5"
    assert rejected["escape"] == "request id '../../../etc/evil' does not match its file name 'escape'.json"
    assert rejected["unknown"] == "unknown request field(s): path"
    assert got["fine"]["status"] == "ok", "a good request after them is served"
    # A link to a file elsewhere is judged by what it points to (written before the run: stale);
    # the link itself is removed, never its target.
    assert got["link"]["status"] == "discarded"
    assert outside.read_text() == '{"kind": "full"}', "the symlink's target is untouched"
    written = {os.path.relpath(os.path.join(d, f), run_dir) for d, _, fs in os.walk(run_dir) for f in fs}
    assert all(p.startswith((".dyncheck/", "checkpoint_")) or p == ".validate_storage_marker" for p in written), \
        written
    assert sorted(os.listdir(run_dir / ".dyncheck" / "requests")) == ["..json"], "a nameless file is left alone"
