"""Memory snapshots on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head with no CPUs and
three 1-CPU worker nodes, each with its own raylet and object store): the holders ``rdc.fit`` starts on every
node, real crashes (a SIGKILLed worker, a removed node, a worker killed halfway through a snapshot), Ray's
own restart under ``FailureConfig``, and the holders' end (``fit()`` returning, the driver killed).

The bitwise checks compare against one run of the same workload that never crashed (DDP over gloo on CPU,
deterministic batches, dropout: the RNG states come back from memory too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from drivers import DRIVER

import ray_dyncheck as rdc
from ray_workloads import train_fn

STEPS = 30
HOLDER = "dyncheck-holder-"


@pytest.fixture(scope="module")
def cluster():
    import ray
    import ray_by_value
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    os.environ.update(RAY_TRAIN_COLLECTIVE_TIMEOUT_S="120")
    ray_by_value.register()
    store = 128 * 1024 * 1024  # per node: four raylets at the default share would over-commit the machine
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "object_store_memory": store})
    try:
        nodes = [c.add_node(num_cpus=1, object_store_memory=store) for _ in range(3)]
        c.wait_for_nodes()
        ray.init(address=c.address)
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def trainer_for(storage, name, out, dc, actions=None, **config):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(train_fn, train_loop_config={"steps": STEPS, "step_time": 0.02, "out": str(out),
                                                     "dynamic_checkpoint": dc, "actions": actions or {}, **config},
                        scaling_config=ScalingConfig(num_workers=2),
                        run_config=RunConfig(name=name, storage_path=str(storage),
                                             failure_config=FailureConfig(max_failures=1)))


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The final weights of the workload run to the end without a crash (and without snapshots)."""
    tmp = tmp_path_factory.mktemp("reference")
    trainer_for(tmp / "results", "ref", tmp / "out", {"enabled": False}).fit()
    return torch.load(tmp / "out" / "final.pt")


def holders():
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(HOLDER))


def wait_for(cond, what, timeout=90.0):
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return value


def check_resumed_from_memory(out, step, reference, result):
    starts = [int(s) for s in (out / "starts.log").read_text().split()]
    assert starts == [0, step], starts
    records = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    assert [r["restored"] for r in records] == [[step, "full"]] * 2
    assert [r["final_step"] for r in records] == [STEPS] * 2
    assert result.checkpoint is None, "nothing was ever stored: the resume came from memory alone"
    final = torch.load(out / "final.pt")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final), "not bitwise equal to the run that never crashed"


def test_a_killed_worker_resumes_from_the_newest_snapshot_bitwise(cluster, reference, tmp_path):
    """Rank 0 is SIGKILLed at step 13, after the step-10 snapshot is held: Ray restarts the group, which
    resumes at step 10 from memory (storage has nothing) and ends bitwise where the uncrashed run ends."""
    out = tmp_path / "out"
    trainer = trainer_for(tmp_path / "results", "kill", out, {"enabled": False, "memory_snapshots": 5},
                          {"13": ["wait_snapshot:10", "once:kill:kill_self"]})
    result = rdc.fit(trainer)
    check_resumed_from_memory(out, 10, reference, result)
    assert wait_for(lambda: not holders(), "the holders to end with fit()", 30)


def test_a_crash_halfway_through_a_snapshot_resumes_from_the_one_before(cluster, reference, tmp_path):
    """Rank 0 dies after its step-20 snapshot reached one holder and before it was complete: that set is never
    used; the group resumes from the step-15 set."""
    out = tmp_path / "out"
    trainer = trainer_for(tmp_path / "results", "half", out, {"enabled": False, "memory_snapshots": 5},
                          {"19": ["wait_snapshot:15"]}, snapshot_fault=20)
    result = rdc.fit(trainer)
    assert (out / "once-snapshot-fault").exists(), "the fault was injected"
    check_resumed_from_memory(out, 15, reference, result)


def test_a_lost_node_is_served_by_the_replica_on_another(cluster, reference, tmp_path):
    """Rank 0's node is removed (its worker and its own holder with it) after the step-10 snapshot: the
    restarted group, on the nodes left, resumes from the replica another node holds."""
    c, nodes = cluster
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    trainer = trainer_for(tmp_path / "results", "node", out, {"enabled": False, "memory_snapshots": 5},
                          {"12": ["wait_snapshot:10", f"ready:{ready}", f"wait_file:{go}"]})
    box = {}
    fit = threading.Thread(target=lambda: box.update(result=rdc.fit(trainer)))  # holders started here too
    fit.start()
    try:
        wait_for(ready.exists, "the step-10 snapshot", 180)
        node_id = (out / "node0").read_text()
        victim = next(n for n in nodes if n.node_id == node_id)
        c.remove_node(victim)
        nodes.remove(victim)
        go.touch()
    finally:
        fit.join(300)
    assert not fit.is_alive()
    nodes.append(c.add_node(num_cpus=1, object_store_memory=128 * 1024 * 1024))  # back to three, for what follows
    check_resumed_from_memory(out, 10, reference, box["result"])
    assert (out / "node0").read_text() != node_id


def test_the_holders_die_with_a_killed_driver(cluster, tmp_path):
    """A driver under ``ray job``-like conditions (its own process, joined to the cluster) is SIGKILLed
    while its holders hold a snapshot: Ray ends them with it (they are the driver's, not detached)."""
    import ray

    c, _ = cluster
    ready = tmp_path / "ready"
    env = {**os.environ, "RAY_ADDRESS": c.address, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(
        [sys.executable, DRIVER, str(tmp_path / "results"), "killed", str(tmp_path / "out"), str(ready),
         json.dumps({"enabled": False, "memory_snapshots": 2}), "100000", json.dumps({"step_time": 0.05})],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(ready.exists, "training under way", 180)
        names = wait_for(holders, "the driver's holders")
        assert len(names) == 4, names  # one per node: the head and three workers

        def held() -> int:
            return sum(ray.get(ray.get_actor(n, namespace="ray_dyncheck").held.remote()) for n in names)

        wait_for(held, "a snapshot in the holders")
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
        wait_for(lambda: not holders(), "the holders to die with the driver", 60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
