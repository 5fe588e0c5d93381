"""How long a full checkpoint blocks training, for the same state, every method measured in one run.

Rows, per state size (model + AdamW state, fp32):

  copy       every tensor copied in memory (on a GPU: into preallocated pinned host buffers): the floor
  torch.save torch.save of model + optimizer state_dict, what users write by hand (no fsync)
  dcp async  torch.distributed.checkpoint.async_save: blocked until it returns (and until done)
  ours sync  DynamicCheckpoint.save() with save_mode: sync (copy + write; no fsync for the plain layout)
  ours async DynamicCheckpoint.save() with save_mode: async (default): blocked for the host copy only

Methods run in shuffled order in each round; the table has medians and the ratio to ``copy``. Also:
steps/s of a small training loop while a background save of the largest state is written, vs none.
No Ray, one process (world size 1), ``LocalBackend`` on a temporary directory of the local disk.

    python -m benchmarks.save_blocking [--sizes-mb 10 100 400 1000] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

import ray_dyncheck as rdc
from benchmarks._common import ray_run


def _state(size_mb: float, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP whose parameters + AdamW moments take about ``size_mb`` MB (fp32: 12 bytes/param)."""
    params = int(size_mb * 1e6 / 12)
    width = 1024
    layers = max(1, params // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=device)).sum().backward()
    opt.step()  # the moments exist
    return model, opt


def _bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def _tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach() for p in model.parameters()]
    for st in opt.state.values():
        out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return out


class _Methods:
    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, device: torch.device) -> None:
        self.model, self.opt, self.root, self.device = model, opt, root, device
        self.pinned: list[torch.Tensor] | None = None
        self.hooks = {mode: rdc.DynamicCheckpoint(
            {"enabled": False, "save_mode": mode}, model=model, optimizer=opt,
            backend=rdc.LocalBackend(os.path.join(root, f"run-{mode}"))) for mode in ("sync", "async")}

    def copy(self) -> dict[str, float]:
        tensors = _tensors(self.model, self.opt)
        if self.device.type == "cuda":
            if self.pinned is None:
                self.pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            t0 = time.perf_counter()
            for buf, t in zip(self.pinned, tensors):
                buf.copy_(t, non_blocking=True)
            torch.cuda.synchronize()
            return {"blocked": time.perf_counter() - t0}
        t0 = time.perf_counter()
        copies = [t.clone() for t in tensors]
        blocked = time.perf_counter() - t0
        del copies
        return {"blocked": blocked}

    def torch_save(self) -> dict[str, float]:
        path = os.path.join(self.root, "torch_save.pt")
        t0 = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()}, path)
        blocked = time.perf_counter() - t0
        os.remove(path)
        return {"blocked": blocked}

    def dcp_async(self) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = tempfile.mkdtemp(dir=self.root, prefix="dcp-")
        t0 = time.perf_counter()
        msd, osd = get_state_dict(self.model, self.opt)
        future = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, no_dist=True)
        blocked = time.perf_counter() - t0
        future.result()
        done = time.perf_counter() - t0
        shutil.rmtree(path, ignore_errors=True)
        return {"blocked": blocked, "done": done}

    def _ours(self, mode: str) -> dict[str, float]:
        dc = self.hooks[mode]
        dc.global_step += 1
        t0 = time.perf_counter()
        dc.save("full")
        blocked = dc.last_blocked_s
        dc.wait_stored()
        done = time.perf_counter() - t0
        run = os.path.join(self.root, f"run-{mode}")
        for name in os.listdir(run):
            if name.startswith("checkpoint_"):
                shutil.rmtree(os.path.join(run, name), ignore_errors=True)
        return {"blocked": blocked, "done": done}

    def ours_sync(self) -> dict[str, float]:
        return self._ours("sync")

    def ours_async(self) -> dict[str, float]:
        return self._ours("async")

    def close(self) -> None:
        for dc in self.hooks.values():
            dc.close()


METHODS = ("copy", "torch_save", "dcp_async", "ours_sync", "ours_async")


def _steps_per_s(seconds: float, during: Callable[[], Any] | None, device: torch.device) -> float:
    """Steps/s of a small MLP while ``during`` runs in the background (``None``: nothing)."""
    import threading

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 256, device=device)
    done = threading.Event()
    if during is not None:
        threading.Thread(target=lambda: (during(), done.set()), daemon=True).start()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and not (during is not None and done.is_set()):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    return steps / (time.perf_counter() - t0)


def measure(sizes_mb: list[float], rounds: int, device: torch.device, during_s: float = 60.0) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes": []}
    root = tempfile.mkdtemp(prefix="dyncheck-bench-")
    try:
        for size in sizes_mb:
            model, opt = _state(size, device)
            methods = _Methods(model, opt, root, device)
            samples: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
            methods.ours_async()  # warm-up: threads, first allocation
            for _ in range(rounds):
                order = list(METHODS)
                random.shuffle(order)
                for m in order:
                    samples[m].append(getattr(methods, m)())
            row: dict[str, Any] = {"size_mb": round(_bytes(model, opt) / 1e6, 1)}
            for m in METHODS:
                row[m] = {k: statistics.median(s[k] for s in samples[m]) for k in samples[m][0]}
            floor = row["copy"]["blocked"]
            for m in METHODS:
                row[m]["x_copy"] = row[m]["blocked"] / floor
            results["sizes"].append(row)
            print(_line(row), flush=True)
            methods.close()
            del model, opt, methods
        # Training speed while the largest state is written in the background.
        model, opt = _state(max(sizes_mb), device)
        methods = _Methods(model, opt, root, device)
        idle = _steps_per_s(3.0, None, device)
        during = _steps_per_s(during_s, lambda: methods.ours_async(), device)
        results["steps_per_s"] = {"idle": idle, "during_background_write": during, "ratio": during / idle,
                                  "size_mb": results["sizes"][-1]["size_mb"]}
        methods.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def _ray_train(config: dict[str, Any]) -> None:
    """In a Ray Train worker: the same full save under Ray (report ASYNC, upload to the run's storage)."""
    import ray.train

    model, opt = _state(config["size_mb"], torch.device("cpu"))
    methods = _Methods.__new__(_Methods)
    methods.model, methods.opt, methods.device, methods.pinned = model, opt, torch.device("cpu"), None
    blocked, copies = [], []
    with rdc.DynamicCheckpoint({"enabled": False}, model=model, optimizer=opt) as dc:
        for _ in range(config["rounds"]):
            copies.append(methods.copy()["blocked"])
            dc.global_step += 1
            dc.save("full")
            blocked.append(dc.last_blocked_s)
            dc.wait_stored()
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump({"blocked": statistics.median(blocked), "copy": statistics.median(copies)}, f)


def run_ray(size_mb: float, rounds: int) -> dict[str, Any]:
    """Ours async under Ray Train: one CPU worker, local storage."""
    m = ray_run(_ray_train, {"size_mb": size_mb, "rounds": rounds}, num_workers=1, num_cpus=2)
    return {"size_mb": size_mb, "blocked": m["blocked"], "copy": m["copy"], "x_copy": m["blocked"] / m["copy"]}


# mode -> (state sizes in MB, rounds, seconds of training measured during a background write, MB under Ray)
PLANS: dict[str, tuple[list[float], int, float, float | None]] = {
    "smoke": ([5], 1, 1.0, None), "quick": ([10, 100], 3, 10.0, None), "full": ([10, 100, 1000], 5, 60.0, 400)}


def run(mode: str) -> dict[str, Any]:
    """The section of ``benchmarks.run``: the sizes and rounds of ``mode``; under Ray in full mode only."""
    sizes, rounds, during_s, ray_mb = PLANS[mode]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = measure(sizes, rounds, device, during_s)
    if ray_mb:
        results["ray"] = run_ray(ray_mb, rounds)
    return results


def table(results: dict[str, Any]) -> list[str]:
    lines = ["| state | in-memory copy (the floor) | `torch.save` | DCP `async_save` (until it returns) | "
             "ours, `save_mode: sync` | ours, `async` (default) |", "|---" * (len(METHODS) + 1) + "|"]
    for row in results["sizes"]:
        cells = [f"{row[m]['blocked'] * 1e3:.1f} ms ({row[m]['x_copy']:.2f}x)" for m in METHODS]
        lines.append(f"| {row['size_mb']:.0f} MB | " + " | ".join(cells) + " |")
    s = results["steps_per_s"]
    lines += ["", f"Training steps/s during a background write of {s['size_mb']:.0f} MB: "
              f"{s['ratio']:.2f}x idle ({s['during_background_write']:.1f} vs {s['idle']:.1f})."]
    if "ray" in results:
        r = results["ray"]
        lines.append(f"Under Ray Train ({r['size_mb']:.0f} MB, one CPU worker): ours async blocked "
                     f"{r['blocked'] * 1e3:.1f} ms, {r['x_copy']:.2f}x an in-memory copy in the same worker.")
    return lines


def _line(row: dict[str, Any]) -> str:
    parts = [f"{row['size_mb']:8.1f} MB"]
    for m in METHODS:
        parts.append(f"{m} {row[m]['blocked'] * 1e3:8.1f} ms ({row[m]['x_copy']:.2f}x)")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100, 400, 1000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--ray", type=float, default=None, metavar="MB",
                   help="also measure ours async under Ray Train (one CPU worker) at this state size")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = measure(args.sizes_mb, args.rounds, device)
    if args.ray:
        results["ray"] = run_ray(args.ray, args.rounds)
        r = results["ray"]
        print(f"under Ray Train ({r['size_mb']:.0f} MB): ours async blocked {r['blocked'] * 1e3:.1f} ms = "
              f"{r['x_copy']:.2f}x the in-memory copy ({r['copy'] * 1e3:.1f} ms)")
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "device": str(device),
                          "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                          "fsync": "DCP rows fsync their files (FileSystemWriter sync_files=True); "
                                   "torch.save and the plain layout do not"}
    print("| state | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for row in results["sizes"]:
        cells = [f"{row[m]['blocked'] * 1e3:.1f} ms ({row[m]['x_copy']:.2f}x)" for m in METHODS]
        print(f"| {row['size_mb']:.0f} MB | " + " | ".join(cells) + " |")
    s = results["steps_per_s"]
    print(f"steps/s during a background write of {s['size_mb']:.0f} MB: {s['during_background_write']:.1f} vs "
          f"{s['idle']:.1f} idle ({s['ratio']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
