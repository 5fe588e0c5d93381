"""Recovery from a crash: memory snapshots vs storage alone, on a local multi-node Ray cluster.

A ``ray.cluster_utils.Cluster`` of a head (no CPUs) and three 1-CPU worker nodes, each with its own raylet and
object store (``object_store_memory`` set per node: four raylets at the default share would over-commit the
machine). Two CPU workers (DDP, gloo) train an MLP whose parameters + AdamW moments take ``mb`` MB under
``rdc.fit(trainer)`` with ``FailureConfig(max_failures=1)`` and a scheduled save every ``SAVE_STEPS`` steps.

  lost      one crash per trial at step ``KILL_AT`` (after the step-``SAVE_STEPS`` checkpoint is committed and,
            with snapshots, the newest snapshot is held): a SIGKILL of rank 0's process (``kill``) or the
            removal of rank 0's whole node (``node``). Recorded: the step the restarted group resumed at
            (steps lost = ``KILL_AT`` minus it), from where (memory or storage), how long ``restore()`` took,
            and the time from the failure to the first step after the restore. ``memory``:
            ``memory_snapshots: SNAP_STEPS``; ``storage``: off (today's recovery).
  steady    training time per step with ``memory_snapshots: auto`` vs off, in paired rounds (one run each per
            round, alternating which goes first); the interval ``auto`` chose; the bytes the holders held.

    python -m benchmarks.recovery [--mode smoke|quick|full] [--mb MB] [--json PATH]

``smoke`` starts nothing (the same keys, empty). ``quick``: 100 MB, one trial per cell, 2 steady rounds;
``full``: 400 MB, 2 trials per cell, 3 rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from benchmarks._common import MODES, bootstrap_ci, machine, median, report, section_parser

SAVE_STEPS = 20
SNAP_STEPS = 5
KILL_AT = 38
PLAN: dict[str, dict[str, Any]] = {
    "smoke": {},
    "quick": {"mb": 100, "trials": 1, "rounds": 2, "steady_steps": 260},
    "full": {"mb": 400, "trials": 2, "rounds": 3, "steady_steps": 360},
}
NODE_STORE = 1024**3
WARM_STEPS = 60
"""Steady state: the steps after these (the first snapshot, at step 10, and its hand-over are a one-time cost)."""


def workload(config: dict[str, Any]) -> None:
    """In each Ray Train worker. Rank 0 appends events (JSON lines) to ``config["out"]/events.log``."""
    import ray
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    import ray_dyncheck as rdc

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    out = config["out"]
    torch.manual_seed(0)
    width = 1024
    layers = max(1, int(config["mb"] * 1e6 / 12) // (width * width))
    model = prepare_model(torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def event(**fields: Any) -> None:
        if rank == 0:
            with open(os.path.join(out, "events.log"), "a") as f:
                f.write(json.dumps({"t": time.time(), **fields}) + "\n")

    if rank == 0:
        with open(os.path.join(out, "node0"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
    with rdc.DynamicCheckpoint(config["dynamic_checkpoint"], model=model, optimizer=opt) as dc:
        t0 = time.time()
        info = dc.restore()
        event(event="start", restored=None if info is None else info.step,
              source=None if info is None else "memory" if info.path.startswith("memory") else "storage",
              restore_s=time.time() - t0)
        first, times = True, []
        while dc.global_step < config["steps"]:
            failed = os.path.join(out, "failed")
            if rank == 0 and dc.global_step == config.get("fail_at") and not os.path.exists(failed):
                _wait_safe(dc, config)
                open(failed, "w").close()
                event(event="fail", step=dc.global_step)
                if config["failure"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                open(os.path.join(out, "ready"), "w").close()  # the benchmark removes this node
                time.sleep(600)
            t = time.perf_counter()
            x = torch.randn(16, width)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            dc.step()
            times.append(time.perf_counter() - t)
            if first:
                event(event="first_step", step=dc.global_step)
                first = False
        event(event="end", step_s=times, interval=dc.memory_snapshot_interval, held=_held() if rank == 0 else {})


def _wait_safe(dc: Any, config: dict[str, Any]) -> None:
    """Rank 0, before the failure (training paused): the scheduled checkpoint committed and, with snapshots, the
    snapshot in flight (if any) held: the newest one no longer changes for a second."""
    deadline = time.time() + 300
    snapshots = bool(config["dynamic_checkpoint"].get("memory_snapshots"))
    seen, since = None, time.time()
    while time.time() < deadline:
        committed = any(s["step"] == SAVE_STEPS and "committed_at" in s for s in dc.saves)
        newest = dc.memory_snapshot_step
        if newest != seen:
            seen, since = newest, time.time()
        if committed and (not snapshots or (newest is not None and time.time() - since > 1.0)):
            return
        time.sleep(0.05)
    raise TimeoutError("the checkpoint or snapshot before the failure never completed")


def _held() -> dict[str, int]:
    import ray

    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("dyncheck-holder-"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            out[actor["name"][-12:]] = int(ray.get(handle.held.remote(), timeout=30))
    return out


def _fit(storage: str, name: str, out: str, config: dict[str, Any], on_ready: Any = None) -> list[dict[str, Any]]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import ray_dyncheck as rdc

    os.makedirs(out, exist_ok=True)
    trainer = TorchTrainer(workload, train_loop_config={**config, "out": out},
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name=name, storage_path=storage,
                                                failure_config=FailureConfig(max_failures=1)))
    if on_ready is None:
        rdc.fit(trainer)
    else:  # the node failure: the benchmark waits for rank 0 to be ready, then removes its node
        done: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: done.update(r=rdc.fit(trainer)), daemon=True)
        thread.start()
        deadline = time.time() + 600
        while not os.path.exists(os.path.join(out, "ready")):
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("the run never reached the failure")
            time.sleep(0.1)
        on_ready(open(os.path.join(out, "node0")).read())
        thread.join(900)
    with open(os.path.join(out, "events.log")) as f:
        return [json.loads(line) for line in f]


def _trial(cluster: Any, nodes: list[Any], variant: str, failure: str, mb: int) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="dyncheck-bench-rec-")
    dc: dict[str, Any] = {"enabled": False, "save_steps": SAVE_STEPS}
    if variant == "memory":
        dc["memory_snapshots"] = SNAP_STEPS
    removed: dict[str, float] = {}

    def remove(node_id: str) -> None:
        victim = next(n for n in nodes if n.node_id == node_id)
        removed["t"] = time.time()
        cluster.remove_node(victim)
        nodes.remove(victim)

    try:
        config = {"mb": mb, "steps": KILL_AT + 5, "dynamic_checkpoint": dc, "fail_at": KILL_AT, "failure": failure}
        events = _fit(os.path.join(root, "results"), "rec", os.path.join(root, "out"), config,
                      on_ready=remove if failure == "node" else None)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if failure == "node":
            nodes.append(cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE))
    fail = next(e for e in events if e["event"] == "fail")
    t_fail = removed.get("t", fail["t"])
    starts = [e for e in events if e["event"] == "start"]
    firsts = [e for e in events if e["event"] == "first_step"]
    again, first_after = starts[-1], firsts[-1]
    return {"variant": variant, "failure": failure, "restored": again["restored"], "source": again["source"],
            "lost_steps": KILL_AT - (again["restored"] or 0), "restore_s": again["restore_s"],
            "fail_to_first_step_s": first_after["t"] - t_fail}


def _steady(plan: dict[str, Any]) -> dict[str, Any]:
    mb = plan["mb"]
    rows: dict[str, list[float]] = {"off": [], "auto": []}
    warm: dict[str, list[float]] = {"off": [], "auto": []}
    extra: dict[str, Any] = {}
    for r in range(plan["rounds"]):
        order = ["off", "auto"] if r % 2 == 0 else ["auto", "off"]
        for variant in order:
            root = tempfile.mkdtemp(prefix="dyncheck-bench-steady-")
            try:
                dc = {"enabled": False, **({"memory_snapshots": "auto"} if variant == "auto" else {})}
                events = _fit(os.path.join(root, "results"), "steady", os.path.join(root, "out"),
                              {"mb": mb, "steps": plan["steady_steps"], "dynamic_checkpoint": dc})
            finally:
                shutil.rmtree(root, ignore_errors=True)
            end = next(e for e in events if e["event"] == "end")
            # The first snapshot (step 10, before auto has measured anything) and its hand-over are a one-time
            # cost, reported apart; the steady state is what follows.
            warm[variant].append(sum(end["step_s"][:WARM_STEPS]))
            steps = end["step_s"][WARM_STEPS:]
            rows[variant].append(sum(steps) / len(steps))
            if variant == "auto":
                extra = {"interval": end["interval"], "held": end["held"]}
            print(f"steady round {r} {variant}: {rows[variant][-1] * 1000:.1f} ms/step", flush=True)
    ratios = [a / o - 1 for a, o in zip(rows["auto"], rows["off"])]
    first = [a - o for a, o in zip(warm["auto"], warm["off"])]
    return {"step_s": rows, "overhead": {"median": median(ratios), **dict(zip(("lo", "hi"), bootstrap_ci(ratios)))},
            "first_snapshot_s": median(first), "warm_steps": WARM_STEPS, **extra}


def run(mode: str, mb: int | None = None) -> dict[str, Any]:
    """``mb``: the state's size instead of the mode's."""
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; one of {', '.join(MODES)}")
    result: dict[str, Any] = {"mode": mode, "save_steps": SAVE_STEPS, "snapshot_steps": SNAP_STEPS, "kill_at": KILL_AT,
                              "trials": [], "steady": {}}
    if mode == "smoke":
        return {**result, "skipped": "starts a 4-node Ray cluster; run --quick", "machine": {}}
    import ray
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result["machine"] = machine()
    plan = {**PLAN[mode], **({"mb": mb} if mb else {})}
    os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "120")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": NODE_STORE})
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        for _ in range(plan["trials"]):
            for failure in ("kill", "node"):
                for variant in ("memory", "storage"):
                    row = _trial(cluster, nodes, variant, failure, plan["mb"])
                    result["trials"].append(row)
                    print(json.dumps(row), flush=True)
        result["steady"] = _steady(plan)
        result["mb"] = plan["mb"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


def table(result: dict[str, Any]) -> list[str]:
    if result.get("skipped"):
        return [f"Recovery: skipped ({result['skipped']})."]
    lines = ["| failure | recovery | resumed at (from) | steps lost | `restore()` | failure → first step |",
             "| --- | --- | --- | --- | --- | --- |"]
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in result["trials"]:
        cells.setdefault((row["failure"], row["variant"]), []).append(row)
    names = {"kill": "SIGKILL of rank 0", "node": "rank 0's node removed"}
    for (failure, variant), rows in cells.items():
        resumed = ", ".join(f"{r['restored']} ({r['source']})" for r in rows)
        lines.append(f"| {names[failure]} | {variant} | {resumed} | "
                     f"{', '.join(str(r['lost_steps']) for r in rows)} | "
                     f"{median([r['restore_s'] for r in rows]):.2f} s | "
                     f"{median([r['fail_to_first_step_s'] for r in rows]):.1f} s |")
    s = result["steady"]
    held = s.get("held") or {}
    lines += ["", f"{result['mb']} MB of state (fp32 weights + AdamW moments); a scheduled save every "
              f"{result['save_steps']} steps; snapshots every {result['snapshot_steps']}; the failure at step "
              f"{result['kill_at']}. Steady state: `memory_snapshots: auto` chose every {s.get('interval')} steps; "
              f"after the first {s['warm_steps']} steps, training time per step {s['overhead']['median'] * 100:+.2f} % "
              f"({s['overhead']['lo'] * 100:+.2f} … {s['overhead']['hi'] * 100:+.2f}) vs off over "
              f"{len(s['step_s']['off'])} paired round(s); the first snapshot (step 10, before `auto` has measured "
              f"anything) cost {s['first_snapshot_s']:.2f} s once; holders held {sum(held.values()) / 1e6:.0f} MB "
              "in all "
              f"({', '.join(f'{v / 1e6:.0f}' for v in held.values())} MB per node)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = section_parser(__doc__)
    p.add_argument("--mb", type=int, default=None, help="the state's size in MB (default: the mode's)")
    args = p.parse_args(argv)
    report(run(args.mode, args.mb), table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
