"""What a user does from outside a run, done by rank 0 at a known step: one command language for every
worker in the harness (gloo ranks, Ray's TorchTrainer workers, the HF callback). Real files in the run
directory; each command is a string, so a test's plan travels as JSON.

Ray's workers receive this module by value (see ``ray_by_value.py``): it imports nothing from the harness.

Commands:

  touch                     touch the trigger (creates it, or gives it a new modification time)
  touch_until_claimed       create the trigger, then wait until the poller has claimed (moved) it
  touch_at:PATH             touch a trigger_file_path elsewhere (its folder is made)
  mkdir_trigger             a folder where the trigger file goes
  break_requests            a file where the request folder should be
  request:JSON              write a request body (atomically: a hidden temporary file, then a rename)
  request_until_claimed:JSON  the same, then wait until the poller has claimed (moved) it
  raw:NAME:HEX              any bytes under any name in the request folder
  symlink:NAME:TARGET       a request file that points outside the run directory
  ready:PATH                create PATH: tell a test process that training is under way
  sleep:SECONDS
  committed:N               wait until N checkpoints carry LocalBackend's commit marker
  park_after:REASON         once a checkpoint with that reason is in ``OUT/commits.log``: wait to be killed
  wait_file:PATH            until the test creates that file (at most a minute)
  wait_claimed[:ID]         until rank 0's poller has claimed it (an entry in the claimed folder)
  wait_any_receipt:PREFIX   until a receipt whose id starts so is written
  wait_receipt:ID           until the request's receipt is written (committed)
  fault:JSON / fault_rank1:JSON  faultfs rules for this process (or rank 1's) only, into ``OUT/plan.json``
  tmpdir:PATH               this process's ``tempfile.tempdir`` (empty: the default)
  kill_rank1 / kill_self    SIGKILL rank 1 (its pid from ``OUT/pid1``) or this process
  once:NAME:COMMAND         COMMAND only the first time (a marker in OUT): a restarted group replays the
                            steps since its checkpoint, and a fault must not be injected again
"""

from __future__ import annotations

import glob
import json
import os
import signal
import time
from pathlib import Path

TRIGGER = "dyncheck.save"


def wait_until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _requests(run_dir: str) -> str:
    folder = os.path.join(run_dir, ".dyncheck", "requests")
    os.makedirs(folder, exist_ok=True)
    return folder


def _write_request(run_dir: str, body: dict) -> str:
    folder = _requests(run_dir)
    tmp, path = os.path.join(folder, f".{body['id']}.tmp"), os.path.join(folder, f"{body['id']}.json")
    with open(tmp, "w") as f:
        json.dump(body, f)
    os.rename(tmp, path)
    return path


def act(run_dir: str, action: str, out: str = "") -> None:
    """Do ``action`` (see the module's docstring) on the run in ``run_dir``; ``out`` is the worker's
    output folder (``once:``, ``park_after:``, ``fault*:``, ``kill_rank1``)."""
    trigger = os.path.join(run_dir, TRIGGER)
    if action.startswith("once:"):
        _, name, action = action.split(":", 2)
        marker = os.path.join(out, f"once-{name}")
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    # A real touch: creates the file or gives it a new modification time (a trigger claimed by its
    # version, on a store where it cannot be moved atomically, stays where it is).
    if action == "touch":
        Path(trigger).touch()
    elif action == "touch_until_claimed":
        open(trigger, "a").close()
        wait_until(lambda: not os.path.exists(trigger), "the poller to claim the trigger")
    elif action.startswith("touch_at:"):  # a trigger_file_path elsewhere
        path = action.split(":", 1)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).touch()
    elif action == "mkdir_trigger":
        os.makedirs(trigger)
    elif action == "break_requests":
        os.makedirs(os.path.join(run_dir, ".dyncheck"), exist_ok=True)
        with open(os.path.join(run_dir, ".dyncheck", "requests"), "w") as f:
            f.write("a file where the request folder should be")
    elif action.startswith("request:"):
        _write_request(run_dir, json.loads(action.split(":", 1)[1]))
    elif action.startswith("request_until_claimed:"):
        path = _write_request(run_dir, json.loads(action.split(":", 1)[1]))
        wait_until(lambda: not os.path.exists(path), "the poller to claim the request")
    elif action.startswith("raw:"):  # any bytes under any name in the request folder
        _, name, hexbody = action.split(":", 2)
        with open(os.path.join(_requests(run_dir), name), "wb") as f:
            f.write(bytes.fromhex(hexbody))
    elif action.startswith("symlink:"):  # a request file that points outside the run directory
        _, name, target = action.split(":", 2)
        os.symlink(target, os.path.join(_requests(run_dir), name))
    elif action.startswith("ready:"):  # tell a test process that training is under way
        open(action.split(":", 1)[1], "a").close()
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action.startswith("committed:"):  # until N checkpoints carry LocalBackend's commit marker
        count = int(action.split(":", 1)[1])
        wait_until(lambda: len(glob.glob(os.path.join(run_dir, "checkpoint_*", ".dyncheck-committed"))) >= count,
                   f"{count} committed checkpoint(s)")
    elif action.startswith("park_after:"):  # once a checkpoint with that reason is committed: wait to be killed
        reason, log, marker = action.split(":", 1)[1], os.path.join(out, "commits.log"), os.path.join(out, "parked")
        if not os.path.exists(marker) and os.path.exists(log) and any(
                json.loads(line)["reason"] == reason for line in open(log)):
            open(marker, "w").close()
            time.sleep(120)
    elif action.startswith("wait_file:"):  # until the test creates that file (at most a minute)
        path, deadline = action.split(":", 1)[1], time.time() + 60
        while time.time() < deadline and not os.path.exists(path):
            time.sleep(0.05)
    elif action.startswith("wait_claimed"):  # until rank 0's poller has claimed it (wait_claimed:<id>)
        folder = os.path.join(run_dir, ".dyncheck", "claimed")
        rid = action.partition(":")[2]
        deadline = time.time() + 30
        while time.time() < deadline and not (os.path.isdir(folder) and any(
                n.startswith(rid) and not n.startswith(".") for n in os.listdir(folder))):
            time.sleep(0.05)
    elif action.startswith("wait_any_receipt:"):  # until a receipt whose id starts so is written
        folder, prefix = os.path.join(run_dir, ".dyncheck", "receipts"), action.partition(":")[2]
        deadline = time.time() + 60
        while time.time() < deadline and not (os.path.isdir(folder) and any(
                n.startswith(prefix) for n in os.listdir(folder))):
            time.sleep(0.05)
    elif action.startswith("wait_receipt:"):  # until the request's receipt is written (committed)
        path = os.path.join(run_dir, ".dyncheck", "receipts", f"{action.partition(':')[2]}.json")
        deadline = time.time() + 60
        while time.time() < deadline and not os.path.exists(path):
            time.sleep(0.05)
    elif action.startswith(("fault:", "fault_rank1:")):  # faults for this process (or rank 1's) only
        pid = os.getpid() if action.startswith("fault:") else int(open(os.path.join(out, "pid1")).read())
        rules = [dict(r, pid=pid) for r in json.loads(action.split(":", 1)[1])]
        plan = os.path.join(out, "plan.json")
        with open(f"{plan}.tmp", "w") as f:
            json.dump(rules, f)
        os.replace(f"{plan}.tmp", plan)
    elif action.startswith("tmpdir:"):
        import tempfile

        tempfile.tempdir = action.split(":", 1)[1] or None
    elif action == "kill_rank1":
        os.kill(int(open(os.path.join(out, "pid1")).read()), signal.SIGKILL)
    elif action == "kill_self":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise ValueError(action)
