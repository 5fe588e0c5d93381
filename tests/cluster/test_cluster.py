"""Several Ray nodes (``ray.cluster_utils.Cluster``: a head with no CPUs and three 1-CPU worker nodes, one
spare): workers spread over nodes (``STRICT_SPREAD``), metrics read back from the nodes' Prometheus
endpoints while the run is live, a real interrupt and resume, and a node drained for preemption.

What one machine cannot show: the nodes share this machine's disk (a node-local path looks shared), its
clock, and loopback networking; a real cloud reclaims the drained node itself (here the test removes it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from drivers import DRIVER

from ray_workloads import train_fn


@pytest.fixture(scope="module")
def cluster():
    import ray
    import ray_by_value
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    # Read by Ray Train's controller and workers, which inherit the nodes' environment.
    os.environ.update(RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5", RAY_TRAIN_COLLECTIVE_TIMEOUT_S="120")
    ray_by_value.register()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": {"metrics_report_interval_ms": 1000}})
    try:
        nodes = [c.add_node(num_cpus=1) for _ in range(3)]
        c.wait_for_nodes()
        ray.init(address=c.address)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def scrape(run_name: str) -> list[str]:
    """Every node's Prometheus endpoint: the lines of our series for this run."""
    import ray

    lines = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            continue
        lines += [ln for ln in text.splitlines() if ln.startswith("ray_dyncheck_") and f'"{run_name}"' in ln]
    return lines


def value(lines: list[str], name: str, **tags: str) -> float:
    """The sum of a series' samples whose tags include ``tags``."""
    found = [float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith(name + "{")
             and all(f'{k}="{v}"' in ln for k, v in tags.items())]
    assert found, f"no {name} {tags}"
    return sum(found)


def wait_for(cond, what: str, timeout: float = 90.0):
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def commits(out, reason: str) -> list[dict]:
    """Rank 0's commits with that reason so far (``commits.log`` is created at its first commit, which may
    come after the test's first look)."""
    log = out / "commits.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [c for c in map(json.loads, lines) if c["reason"] == reason]


def reported(result):
    return sorted(((c.get_metadata()["step"], c.get_metadata(), c.path) for c, _ in result.best_checkpoints),
                  key=lambda t: t[0])


def test_spread_over_nodes_trigger_metrics_interrupt_and_resume(cluster, tmp_path):
    """Two workers on two nodes: only rank 0 reads requests; a trigger saves on both at one step; the
    metrics are on the dashboard while the run is live; Ctrl+C on the driver saves weights; resume."""
    c, _ = cluster
    storage, out, ready, go = tmp_path / "results", tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    trigger = str(tmp_path / "elsewhere" / "go.save")  # an absolute path on this "node's" disk
    dc = {"check_interval": 5, "poll_interval_s": 0.1, "trigger_file_path": trigger}
    # Rank 0 touches the trigger at step 5 (saved at step 10), then holds at step 20 until the test has
    # read the metrics; then the test interrupts the driver.
    actions = {"5": ["touch_at:" + trigger], "20": [f"wait_file:{go}"]}
    env = {**os.environ, "RAY_ADDRESS": c.address}
    driver = subprocess.Popen(
        [sys.executable, DRIVER, str(storage), "mn", str(out), str(ready),
         json.dumps(dc), "100000", json.dumps({"actions": actions, "placement": "STRICT_SPREAD"})],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs: list[str] = []
    reader = threading.Thread(target=lambda: logs.extend(driver.stdout), daemon=True)
    reader.start()
    try:
        needed = ("ray_dyncheck_requests_total", "ray_dyncheck_checkpoints_total",
                  "ray_dyncheck_save_blocked_seconds_bucket", "ray_dyncheck_request_to_commit_seconds_count",
                  "ray_dyncheck_pending_requests", "ray_dyncheck_check_interval_steps",
                  "ray_dyncheck_steps_since_commit")
        def complete(ls: list[str]) -> bool:  # every series, and work at risk counted from the commit
            return all(any(ln.startswith(n) for ln in ls) for n in needed) and any(
                ln.startswith("ray_dyncheck_steps_since_commit{") and float(ln.rsplit(" ", 1)[1]) <= 10 for ln in ls)

        lines = wait_for(lambda: (ls := scrape("mn")) and complete(ls) and ls, "the metrics on the nodes' endpoints",
                         180)
        go.touch()
        print("\n".join(lines))  # quoted in the closing note
        assert value(lines, "ray_dyncheck_requests_total", source="trigger") == 1.0
        assert value(lines, "ray_dyncheck_checkpoints_total", kind="full", reason="trigger") == 1.0
        assert value(lines, "ray_dyncheck_request_to_commit_seconds_count", kind="full", reason="trigger") == 1.0
        assert value(lines, "ray_dyncheck_save_blocked_seconds_count", kind="full") == 1.0
        assert value(lines, "ray_dyncheck_check_interval_steps") == 5.0
        # The step-10 checkpoint is committed: at most 10 steps (rank 0 holds at step 20) are at risk.
        assert 0 <= value(lines, "ray_dyncheck_steps_since_commit") <= 10
        assert all('ray_train_run_id="' in ln for ln in lines)
        time.sleep(1.0)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(180) in (130, -signal.SIGINT)
    finally:
        if driver.poll() is None:
            driver.kill()
    reader.join(10)
    text = "".join(logs)
    records = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    assert records[0]["node"] != records[1]["node"], "STRICT_SPREAD: one worker per node"
    assert [r["reads_requests"] for r in records] == [True, False], "only world rank 0 reads the channel"
    assert records[0]["checks"] == records[1]["checks"]
    saved = [(ch[0], ch[2]) for ch in records[0]["checks"] if ch[1]]
    assert saved[0] == (10, "full") and saved[-1][1] == "weights"
    assert "is on this node's disk only" in text, "a node-local trigger path is warned about"
    # The driver's console: rank 0's lines for the claim, the save and the commit; nothing of ours from rank 1.
    pid0, pid1 = ((out / f"pid{r}").read_text() for r in range(2))
    ours = [ln for ln in text.splitlines() if "dyncheck:" in ln]
    assert any(f"pid={pid0}" in ln and "full checkpoint at step 10 (trigger" in ln for ln in ours), ours
    assert any(f"pid={pid0}" in ln and "full checkpoint for step 10 committed at" in ln for ln in ours), ours
    assert not [ln for ln in ours if re.search(rf"pid={pid1}\b", ln)], "rank 1 stays quiet"

    # Resume on the cluster, spread again: from the interrupt's weights checkpoint.
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stop_step = saved[-1][0]
    out2 = tmp_path / "out2"
    trainer = TorchTrainer(train_fn, train_loop_config={"steps": stop_step + 5, "step_time": 0.02, "out": str(out2),
                                                        "dynamic_checkpoint": dc},
                           scaling_config=ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD"),
                           run_config=RunConfig(name="mn", storage_path=str(storage)))
    result = trainer.fit()
    resumed = [json.load(open(out2 / f"rank{r}.json")) for r in range(2)]
    assert [r["restored"] for r in resumed] == [[stop_step, "weights"]] * 2
    assert [r["final_step"] for r in resumed] == [stop_step + 5] * 2
    assert [s for s, _, _ in reported(result)][-1] == stop_step


def test_preemption_notice_saves_before_the_deadline_and_the_restarted_group_resumes(cluster, tmp_path):
    """The node hosting rank 1 is drained for preemption with a deadline: rank 0 saves at the next check
    (reason preemption; full, since the full save measured before commits in far less than the time left),
    committed before the deadline; Ray restarts the group on the spare node at the deadline and it
    resumes from that checkpoint."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    c, nodes = cluster
    storage, out, ready = tmp_path / "results", tmp_path / "out", tmp_path / "ready"
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"steps": 60, "step_time": 0.05, "out": str(out),
                           "dynamic_checkpoint": {"check_interval": 5, "poll_interval_s": 0.1},
                           # Once the preemption checkpoint is committed, the first group waits to be
                           # taken down (no need to train on); the restarted group does not wait.
                           "actions": {"2": ['request:{"id": "first"}'],
                                       "10": ["wait_receipt:first", f"ready:{ready}"],
                                       **{str(s): ["park_after:preemption"] for s in range(11, 60)}}},
        scaling_config=ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="pre", storage_path=str(storage),
                             failure_config=FailureConfig(max_preemption_failures=1)),
    )
    box: dict = {}
    fitting = threading.Thread(target=lambda: box.update(result=trainer.fit()), daemon=True)
    fitting.start()
    wait_for(ready.exists, "training to start", 120)
    node_id = (out / "node1").read_text()
    deadline_s = 12
    deadline = time.time() + deadline_s
    gcs = ray._raylet.GcsClient(address=c.address)
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "test: spot reclaim", int(deadline * 1000))
    assert accepted, why
    [commit] = wait_for(lambda: commits(out, "preemption"), "the preemption checkpoint", deadline_s)
    assert commit["kind"] == "full"
    assert commit["committed_at"] < deadline, "committed before the deadline"
    print(f"preemption checkpoint: step {commit['step']}, committed {deadline - commit['committed_at']:.1f} s "
          "before the deadline")
    # The cloud takes the node away at the deadline.
    time.sleep(max(0.0, deadline - time.time()))
    c.remove_node(next(n for n in nodes if n.node_id == node_id))
    fitting.join(240)
    assert not fitting.is_alive(), "the restarted group finished"
    starts = [int(s) for s in (out / "starts.log").read_text().split()]
    assert starts == [0, commit["step"]], "the restarted group resumed from the preemption checkpoint"
    records = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    assert [r["restored"] for r in records] == [[commit["step"], "full"]] * 2
    assert node_id not in {r["node"] for r in records}
    assert box["result"].error is None
