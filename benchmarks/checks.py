"""P1: what checking for requests costs a training loop, and how fast a request is acted on.

Plain ``torch.distributed`` processes (gloo, CPU, no Ray) train a small DDP MLP with a fixed sleep per
step (the step time), and call, after each optimizer step, one of:

  none, none-b    nothing (twice: the spread between the two is this run's noise floor, the A/A row)
  auto            ours, ``check_interval: auto`` (the default)
  auto, no floor  ``auto`` with its floor (about half a poll interval between checks) turned off, the
                  budget alone choosing the interval: what the floor changes, in the same run
  every 1/10/100  ours at a fixed ``check_interval``
  axolotl N       the peer design of Axolotl's dynamic checkpoint: every N steps rank 0 stats the
                  trigger file on the training thread, broadcasts a flag, and all ranks barrier
  lightning       the Lightning/NeMo shape: rank 0 stats the file and broadcasts a flag every step

Every variant lives in the same processes; each round runs every variant once, in a shuffled order
(the same on every rank), so the machine's drift hits all of them alike. Per variant:

* overhead, end to end: per round, its mean step time over ``none``'s, minus 1; the median over rounds
  with a 90 % bootstrap interval (compare with the A/A row);
* overhead, in process: the share of the segment each rank spent inside the call (low noise). A check
  that waits for a slower rank absorbs skew DDP's next all-reduce would otherwise have waited for;
* reaction: the trigger is touched at a random moment while it trains; the time and the steps until
  every rank has decided to save (for ours, until ``step()`` returned: the save's own blocking part,
  a few ms for this model, is included; for the peers, until the flag arrived).

Rank 0's pollers (one per hook of ours, all alive the whole run) run during every variant, ``none``
included: their cost is not in these ratios; ``benchmarks.poller_cost`` measures it on its own.

    python -m benchmarks.checks [--mode quick] [--world 2] [--step-ms 5 20 200] [--json PATH]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from benchmarks._common import free_port, machine, median, paired_ratio, pct, report, section_parser

OURS = {"auto": "auto", "auto, no floor": "auto", "every 1": 1, "every 10": 10, "every 100": 100}
PEERS = {"axolotl 10": 10, "axolotl 100": 100, "lightning": 1}
VARIANTS = ["none", "none-b", *OURS, *PEERS]

# mode -> (rounds, seconds per variant per round, reaction trials, longest reaction waited for)
PLANS = {"smoke": (1, 0.1, 1, 1.5), "quick": (5, 1.5, 2, 8.0), "full": (10, 2.0, 3, 12.0)}


class _Peer:
    """A peer design's per-step call: rank 0 looks at the trigger file on the training thread every
    ``every`` steps, broadcasts the flag on the default group; Axolotl also barriers."""

    def __init__(self, trigger: str, every: int, barrier: bool) -> None:
        import torch
        import torch.distributed as dist

        self.trigger, self.every, self.barrier = trigger, every, barrier
        self.dist, self.flag = dist, torch.zeros(1, dtype=torch.int64)
        self.n = 0

    def step(self) -> bool:
        self.n += 1
        if self.n % self.every:
            return False
        if self.dist.get_rank() == 0:
            found = os.path.exists(self.trigger)
            if found:
                os.remove(self.trigger)
            self.flag.fill_(int(found))
        self.dist.broadcast(self.flag, src=0)
        if self.barrier:
            self.dist.barrier()
        return bool(self.flag.item())


def worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    import torch
    import torch.distributed as dist

    import ray_dyncheck as rdc

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)
    sleep_s = cfg["step_ms"] / 1e3
    variants: list[str] = cfg["variants"]
    calls: dict[str, Callable[[], bool]] = {}
    hooks: dict[str, Any] = {}
    triggers: dict[str, str] = {}
    for v in variants:
        run_dir = os.path.join(out, v.replace(" ", "_"))
        triggers[v] = os.path.join(run_dir, "dyncheck.save")
        if v in OURS:
            hooks[v] = rdc.DynamicCheckpoint({"check_interval": OURS[v]}, model=model, optimizer=opt,
                                             backend=rdc.LocalBackend(run_dir))
            if v == "auto, no floor":
                hooks[v]._core.cadence.auto.min_period_s = 0.0

            def ours(hook: Any = hooks[v]) -> bool:
                d = hook.step()
                return bool(d is not None and d.save)

            calls[v] = ours
        elif v in PEERS:
            if rank == 0:
                os.makedirs(run_dir, exist_ok=True)
            calls[v] = _Peer(triggers[v], PEERS[v], barrier=v.startswith("axolotl")).step
        else:
            calls[v] = lambda: False

    def train_step() -> None:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(sleep_s)

    def segment(v: str, steps: int, until_decided: bool = False) -> dict[str, Any]:
        call = calls[v]
        if v in hooks:
            hooks[v]._core.end_step()  # the time since this hook's last step was other variants'
        dist.barrier()
        in_call, decided_at, n = 0.0, None, 0
        t0 = time.perf_counter()
        while n < steps or (until_decided and decided_at is None):
            train_step()
            n += 1
            state["step"] = n
            c0 = time.perf_counter()
            decided = call()
            in_call += time.perf_counter() - c0
            if decided and decided_at is None:
                decided_at = (time.time(), n)
                if until_decided:
                    break
        total = time.perf_counter() - t0
        return {"step_s": total / n, "in_call": in_call / total, "decided": decided_at}

    state: dict[str, Any] = {"step": 0}
    rounds, seg_s, trials, reaction_cap_s = cfg["plan"]
    steps = max(5, int(seg_s / (sleep_s + 1e-3)))
    # Warm-up: connections, allocations, and `auto` settling on its interval.
    for v in variants:
        segment(v, steps * (3 if OURS.get(v) == "auto" and rounds > 1 else 1))
    rows: dict[str, dict[str, list[float]]] = {v: {"step_s": [], "in_call": []} for v in variants}
    order = list(variants)
    for r in range(rounds):
        random.Random(r).shuffle(order)  # the same order on every rank
        for v in order:
            res = segment(v, steps)
            rows[v]["step_s"].append(res["step_s"])
            rows[v]["in_call"].append(res["in_call"])
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, {v: median(rows[v]["in_call"]) for v in variants})
    result: dict[str, Any] = {"steps_per_segment": steps, "variants": {}}
    for v in variants:
        result["variants"][v] = {"step_s": rows[v]["step_s"], "in_call": rows[v]["in_call"],
                                 "in_call_ranks": [r[v] for r in per_rank]}
        if v in hooks:
            result["variants"][v]["interval"] = hooks[v].check_interval if OURS[v] == "auto" else OURS[v]
    # Reaction: touch the trigger at a random moment; train until every rank decided.
    reactions: dict[str, list[dict[str, float]]] = {}
    for v in variants:
        if v.startswith("none"):
            continue
        interval = hooks[v].check_interval if OURS.get(v) == "auto" else (OURS.get(v) or PEERS[v])
        worst = interval * (sleep_s + 1e-3) + (1.0 if v in OURS else 0.0)  # ours: + the poll interval
        if worst > reaction_cap_s:
            continue
        reactions[v] = []
        for t in range(trials):
            delay = random.Random(1000 + t).uniform(0.0, 1.0)
            touched: dict[str, Any] = {}

            def touch(path: str = triggers[v], delay: float = delay, touched: dict[str, Any] = touched) -> None:
                time.sleep(delay)
                touched["step"] = state["step"]
                touched["time"] = time.time()
                with open(path, "w"):
                    pass

            thread = threading.Thread(target=touch, daemon=True) if rank == 0 else None
            dist.barrier()
            state["step"] = 0
            if thread is not None:
                thread.start()
            res = segment(v, 0, until_decided=True)
            if thread is not None:
                thread.join()
            decided = [None] * world
            dist.all_gather_object(decided, res["decided"])
            if rank == 0:
                t_dec = max(d[0] for d in decided)
                reactions[v].append({"seconds": t_dec - touched["time"],
                                     "steps": decided[0][1] - touched["step"]})
    result["reaction"] = reactions
    for hook in hooks.values():
        hook.close()
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def measure(world: int, step_ms: float, mode: str, variants: list[str] | None = None) -> dict[str, Any]:
    """One run of ``world`` ranks at ``step_ms`` of sleep per step; ratios against ``none``."""
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(prefix="dyncheck-bench-checks-")
    cfg = {"step_ms": step_ms, "variants": variants or VARIANTS, "plan": PLANS[mode]}
    try:
        mp.start_processes(worker, args=(world, free_port(), cfg, out), nprocs=world, start_method="spawn")
        with open(os.path.join(out, "result.json")) as f:
            raw = json.load(f)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    base = raw["variants"]["none"]["step_s"]
    rows = {}
    for v, r in raw["variants"].items():
        reaction = raw["reaction"].get(v)
        rows[v] = {
            "step_ms": median(r["step_s"]) * 1e3,
            "overhead": paired_ratio(r["step_s"], base) if v != "none" else None,
            "in_call": median(r["in_call"]),
            "in_call_others_max": max(r["in_call_ranks"][1:]),
            "interval": r.get("interval", PEERS.get(v)),
            "reaction_s": median([x["seconds"] for x in reaction]) if reaction else None,
            "reaction_s_max": max(x["seconds"] for x in reaction) if reaction else None,
            "reaction_steps": median([x["steps"] for x in reaction]) if reaction else None,
        }
    return {"world": world, "sleep_ms": step_ms, "rounds": PLANS[mode][0],
            "steps_per_segment": raw["steps_per_segment"], "rows": rows}


def run(mode: str, worlds: tuple[int, ...] | None = None, step_ms: tuple[float, ...] | None = None) -> dict[str, Any]:
    """P1 at each step time on 2 ranks, then the scaling rows (4 and 8 ranks, ~20 ms steps)."""
    if step_ms is None:
        step_ms = {"smoke": (5.0,), "quick": (4.0, 19.0, 199.0), "full": (4.0, 19.0, 199.0)}[mode]
    if worlds is None:
        worlds = {"smoke": (), "quick": (4, 8), "full": (4, 8)}[mode]
    runs = [measure(2, ms, mode) for ms in step_ms]
    scaling = [measure(w, 19.0, mode, ["none", "none-b", "auto", "every 10", "axolotl 100", "lightning"])
               for w in worlds]
    return {"runs": runs, "scaling": scaling}


def _reaction(row: dict[str, Any]) -> str:
    if row["reaction_s"] is None:
        return "not waited for"
    return f"{row['reaction_s']:.2f} s / {row['reaction_steps']:.0f} steps"


def table(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in result["runs"] + result["scaling"]:
        base = r["rows"]["none"]["step_ms"]
        lines += [f"**{r['world']} ranks, {base:.1f} ms steps** ({r['rounds']} rounds x "
                  f"{r['steps_per_segment']} steps per variant)", "",
                  "| variant | interval | overhead, end to end (90 % CI) | time in the call: rank 0, "
                  "other ranks (max) | reaction |",
                  "|---|---|---|---|---|"]
        for v, row in r["rows"].items():
            if v == "none":
                continue
            name = "A/A: none vs none" if v == "none-b" else v
            reaction = _reaction(row) if v != "none-b" else "-"
            lines.append(f"| {name} | {row['interval'] or '-'} | {pct(row['overhead'])} | "
                         f"{row['in_call'] * 100:.3f} %, {row['in_call_others_max'] * 100:.3f} % | {reaction} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = section_parser(__doc__)
    p.add_argument("--world", type=int, nargs="*", default=None, help="extra world sizes (scaling rows)")
    p.add_argument("--step-ms", type=float, nargs="+", default=None, help="sleep per step, on top of compute")
    args = p.parse_args(argv)
    result = run(args.mode, tuple(args.world) if args.world is not None else None,
                 tuple(args.step_ms) if args.step_ms else None)
    result["machine"] = machine()
    report(result, table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
