"""``ray-dyncheck``: ask a running job for a checkpoint, stop it gracefully, or list what it saved.

RUN is the run directory, ``<storage_path>/<name>`` (a path, or a URI such as
``s3://bucket/ray_results/run1``). Exit status: 0 done, 1 the save failed, 2 bad RUN or timed out.

    ray-dyncheck save RUN [--weights-only] [--stop] [--wait] [--timeout S]
    ray-dyncheck stop RUN [--full] [--wait] [--timeout S]
    ray-dyncheck status RUN [--json]
    ray-dyncheck export CHECKPOINT --out DIR

``export`` writes a checkpoint's full weights (a sharded one consolidated) as ``DIR/model.safetensors``,
with ``config.json`` when the model was a Hugging Face one (then ``from_pretrained(DIR)`` loads it).

``status`` marks each checkpoint directory ``committed`` (a new run resumes from it), ``torn`` (files
missing or truncated) or ``uncommitted`` (never registered: not resumed from).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ._state.sharded import DCP_ERRORS
from .client import RunNotFoundError, request_save, run_status
from .export import export_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-dyncheck", description="On-demand checkpoints for Ray Train runs.")
    sub = p.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="ask for a checkpoint; training goes on (unless --stop)")
    save.add_argument("run", metavar="RUN", help="<storage_path>/<name>, a path or URI")
    save.add_argument("--weights-only", action="store_true", help="weights + small state, no optimizer")
    save.add_argument("--stop", action="store_true", help="stop the run after the save")
    stop = sub.add_parser("stop", help="save (weights by default), then stop the run gracefully")
    stop.add_argument("run", metavar="RUN")
    stop.add_argument("--full", action="store_true", help="a full, exactly resumable checkpoint")
    for cmd in (save, stop):
        cmd.add_argument("--wait", action="store_true", help="wait for the receipt; print the checkpoint path")
        cmd.add_argument("--timeout", type=float, default=None, metavar="S", help="with --wait: give up after S s")
    status = sub.add_parser("status", help="the run's checkpoints, pending requests and receipts")
    status.add_argument("run", metavar="RUN")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    export = sub.add_parser("export", help="a checkpoint's full weights as safetensors (sharded ones consolidated)")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory, a path or URI")
    export.add_argument("--out", required=True, metavar="DIR", help="a new or empty local folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "status":
            return _status(run_status(args.run), as_json=args.json)
        if args.command == "export":
            return _export(args.checkpoint, args.out)
        if args.command == "save":
            kind, stop = ("weights" if args.weights_only else "full"), args.stop
        else:
            kind, stop = ("full" if args.full else "weights"), True
        receipt = request_save(args.run, kind=kind, stop=stop, wait=args.wait, timeout=args.timeout)
    except RunNotFoundError as exc:
        print(f"ray-dyncheck: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"ray-dyncheck: {exc}", file=sys.stderr)
        return 2
    if receipt["status"] == "pending":
        print(f"requested {kind} checkpoint{' and stop' if stop else ''}: request {receipt['id']} "
              f"(receipt will be at {args.run.rstrip('/')}/.dyncheck/receipts/{receipt['id']}.json)")
        return 0
    if receipt["status"] == "ok":
        print(f"{receipt.get('kind')} checkpoint at step {receipt.get('step')} ({receipt['id']}):")
        print(receipt.get("checkpoint_uri") or receipt.get("checkpoint"))
        return 0
    print(f"ray-dyncheck: request {receipt['id']} {receipt['status']}: {receipt.get('error')}", file=sys.stderr)
    return 1


def _export(checkpoint: str, out: str) -> int:
    try:
        files = export_checkpoint(checkpoint, out)
    except DCP_ERRORS as exc:  # a corrupt shard raises DCP's own (BaseException) type
        print(f"ray-dyncheck: {exc}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} -> {out}: {', '.join(files)}")
    return 0


def _status(status: dict[str, Any], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(status, indent=1, sort_keys=True))
        return 0
    rows = [("DIR", "KIND", "STEP", "REASON", "TIME", "SIZE", "STATE")]
    for c in status["checkpoints"]:
        rows.append((c["dir"], str(c["kind"] or "-"), str(c["step"] if c["step"] is not None else "-"),
                     str(c["reason"] or "-"), str(c["time"] or "-")[:19], _size(c["size"]), c["state"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"run {status['run']}: {len(status['checkpoints'])} checkpoint(s)")
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    if status["pending"]:
        print("pending requests: " + ", ".join(f"{p['id']} ({p['state']})" for p in status["pending"]))
    else:
        print("pending requests: none")
    return 0


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
