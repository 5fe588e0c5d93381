"""What every benchmark section shares: ratio statistics, the machine record, free ports and a small
local Ray run that writes JSON back to the caller. (The S3 server on loopback is the tests' own:
``tests/harness/s3_local.py``.)

Every figure the benchmarks publish is a ratio or a difference measured within one run, with a
spread, because the machines these run on are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

MODES = ("smoke", "quick", "full")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def bootstrap_ci(xs: Sequence[float], stat: Callable[[Sequence[float]], float] = median,
                 level: float = 0.90, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of ``stat`` over ``xs`` (NaNs when fewer than 2 values)."""
    xs = [x for x in xs if x == x]
    if len(xs) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    boots = sorted(stat([rng.choice(xs) for _ in xs]) for _ in range(n))
    lo = boots[int((1 - level) / 2 * n)]
    hi = boots[min(n - 1, int((1 + level) / 2 * n))]
    return float(lo), float(hi)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """``a`` against ``b`` measured in the same rounds: the median of the per-round ``a/b - 1`` (as a
    fraction) with its 90 % bootstrap interval; ``n`` the number of rounds."""
    diffs = [x / y - 1 for x, y in zip(a, b) if y > 0]
    lo, hi = bootstrap_ci(diffs)
    return {"median": median(diffs), "lo": lo, "hi": hi, "n": len(diffs)}


def pct(d: dict[str, float] | None, digits: int = 2) -> str:
    """``+1.23 % (−0.10 … +2.50)`` from a :func:`paired_ratio`-shaped dict of fractions."""
    if not d or d.get("median") != d.get("median"):
        return "n/a"
    text = f"{d['median'] * 100:+.{digits}f} %"
    if d.get("lo") == d.get("lo") and "lo" in d:
        text += f" ({d['lo'] * 100:+.{digits}f} … {d['hi'] * 100:+.{digits}f})"
    return text


def machine() -> dict[str, Any]:
    """Versions and the machine, recorded in every JSON result."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                     None)
    except OSError:
        pass
    for name in ("ray", "pyarrow", "ray_dyncheck"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed: recorded as missing
            info[name] = None
    return info


def ray_run(train_fn: Callable[[dict[str, Any]], None], config: dict[str, Any], *, num_workers: int = 2,
            num_cpus: int = 2, name: str = "bench", storage: str | None = None) -> dict[str, Any]:
    """Start a local Ray, run ``train_fn`` in a ``TorchTrainer`` with ``num_workers`` CPU workers, and
    return the JSON that world rank 0 wrote to ``config["out"]`` (set here). Ray is shut down after."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root = tempfile.mkdtemp(prefix="dyncheck-bench-ray-")
    out = os.path.join(root, "result.json")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        TorchTrainer(train_fn, train_loop_config={**config, "out": out},
                     scaling_config=ScalingConfig(num_workers=num_workers),
                     run_config=RunConfig(name=name, storage_path=storage or root)).fit()
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return result


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def section_parser(doc: str | None) -> argparse.ArgumentParser:
    """The command line every section shares: ``--mode`` and ``--json`` (a section adds its own)."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--mode", choices=MODES, default="quick")
    p.add_argument("--json", default=None, metavar="PATH")
    return p


def report(result: dict[str, Any], table: Callable[[dict[str, Any]], list[str]], path: str | None) -> None:
    """A section run alone: print its table; write its result to ``path`` when given."""
    print("\n".join(table(result)))
    if path:
        write_json(path, result)
