"""Memory holders on Ray: one actor per node that keeps a run's memory snapshots in its own process.

Who owns them, and why: the driver. ``rdc.fit(trainer)`` starts one holder on every alive node before
``trainer.fit()`` and kills them when it returns. An actor dies with the process that created it (Ray's
ownership fate-sharing), so holders created by a training worker would die with the crash they are for;
created by the driver they outlive every worker-group restart of the run, and die with the driver when
it is killed (nothing leaks into the next run, no detached actor to clean up). A plain ``trainer.fit()``
has no holders: the workers find none and resume from storage only.

Workers find the holders by name (this job's id and the node's id, in the ``ray_dyncheck`` namespace).
Rank 0 puts each snapshot into its own node's holder and one on another node (the replica), then marks
it complete in both; a set that was not marked complete is never handed out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
import ray.exceptions

from .._state.memory import Held, MemoryStore

__all__ = ["Holder", "RayMemoryStore", "start_holders", "stop_holders"]

logger = logging.getLogger(__name__)

NAMESPACE = "ray_dyncheck"
CALL_TIMEOUT_S = 120.0
"""A holder call that takes longer is treated as a lost holder."""
LOOKUP_TIMEOUT_S = 10.0


def holder_name(job_id: str, node_id: str) -> str:
    return f"dyncheck-holder-{job_id}-{node_id}"


class Holder:
    """A Ray actor (one per node, owned by the driver): a run's snapshot sets in this process's memory.

    Per run (``key``), at most two sets: the newest complete one and the one being put.
    """

    def __init__(self) -> None:
        self._sets: dict[tuple[str, int], dict[str, Any]] = {}

    def put(self, key: str, step: int, meta: dict[str, Any], files: dict[str, Any]) -> str:
        files = {name: bytes(memoryview(data)) for name, data in files.items()}  # our copy, off the object store
        newest = self._newest(key)
        self._sets = {k: v for k, v in self._sets.items() if k[0] != key or (newest is not None and k[1] == newest)}
        self._sets[(key, step)] = {"meta": meta, "files": files, "complete": False}
        return ray.get_runtime_context().get_node_id()

    def commit(self, key: str, step: int) -> bool:
        """Mark the set complete (the older complete one stays until :meth:`prune`: every copy commits first)."""
        entry = self._sets.get((key, step))
        if entry is None:
            return False
        entry["complete"] = True
        return True

    def prune(self, key: str, step: int) -> None:
        """Every copy of ``step`` is complete: drop the run's other sets."""
        self._sets = {k: v for k, v in self._sets.items() if k[0] != key or k[1] == step}

    def abort(self, key: str, step: int) -> None:
        """``step`` could not be made complete everywhere: drop it here (the set before it stays)."""
        self._sets.pop((key, step), None)

    def _newest(self, key: str) -> int | None:
        return max((s for (k, s), v in self._sets.items() if k == key and v["complete"]), default=None)

    def newest(self, key: str) -> tuple[int, dict[str, Any]] | None:
        step = self._newest(key)
        return None if step is None else (step, self._sets[(key, step)]["meta"])

    def get(self, key: str, step: int) -> dict[str, Any]:
        entry = self._sets.get((key, step))
        if entry is None or not entry["complete"]:
            raise KeyError(f"no complete snapshot of step {step} is held here")
        # As arrays, so Ray ships them out of band: one copy into the object store, read in place by the worker.
        return {name: np.frombuffer(data, dtype=np.uint8) for name, data in entry["files"].items()}

    def held(self) -> int:
        return sum(len(b) for v in self._sets.values() for b in v["files"].values())


def start_holders(timeout_s: float = 60.0) -> list[Any]:
    """Driver: one holder on every alive node, named for this job; returns their handles (owned here)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    job = ray.get_runtime_context().get_job_id()
    actor = ray.remote(Holder)
    handles: list[Any] = []
    try:
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            node_id = node["NodeID"]
            handles.append(actor.options(  # type: ignore[attr-defined]
                name=holder_name(job, node_id), namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote())
        ray.get([h.held.remote() for h in handles], timeout=timeout_s)
    except BaseException:
        stop_holders(handles)  # none left behind for workers to find
        raise
    logger.info("dyncheck: memory holders on %d node(s)", len(handles))
    return handles


def stop_holders(handles: list[Any], timeout_s: float = 10.0) -> None:
    """Driver: end the holders (what they held goes with them), and wait (bounded) until their names are free,
    so a next ``fit()`` in this driver can start its own."""
    for h in handles:
        try:
            ray.kill(h)
        except Exception:  # already gone with its node
            logger.debug("dyncheck: holder already gone", exc_info=True)
    deadline = time.monotonic() + timeout_s
    for h in handles:
        while time.monotonic() < deadline:
            try:
                ray.get(h.held.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                break  # dead
            except Exception:
                break  # unreachable: as good as gone for this wait
            time.sleep(0.05)


class RayMemoryStore(MemoryStore):
    """A worker's view of the run's holders (found by name: this job, every alive node)."""

    def __init__(self, key: str, holders: Mapping[str, Any], own_node: str) -> None:
        self.key = key
        self.holders = dict(holders)
        """node id -> holder handle."""
        self.own_node = own_node
        self.copies = min(2, len(self.holders))

    @classmethod
    def find(cls, key: str) -> RayMemoryStore | None:
        """The holders of this job, or ``None`` when it has none (a plain ``trainer.fit()``)."""
        job = ray.get_runtime_context().get_job_id()
        found = {}
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            try:
                found[node["NodeID"]] = ray.get_actor(holder_name(job, node["NodeID"]), namespace=NAMESPACE)
            except ValueError:  # no holder on that node (it joined after the run started)
                continue
        if not found:
            return None
        return cls(key, found, ray.get_runtime_context().get_node_id())

    def _targets(self) -> list[str]:
        """Own node first, then the others in a fixed order starting after it (replicas spread out)."""
        others = sorted(n for n in self.holders if n != self.own_node)
        after = [n for n in others if n > self.own_node] + [n for n in others if n < self.own_node]
        return ([self.own_node] if self.own_node in self.holders else []) + after

    def put(self, step: int, meta: Mapping[str, Any], files: Mapping[str, bytes]) -> tuple[str, ...]:
        # As arrays: one copy into the object store, out of band; each holder copies its own out of it.
        ref = ray.put({name: np.frombuffer(data, dtype=np.uint8) for name, data in files.items()})
        held: list[str] = []
        try:
            for node in self._targets():
                if len(held) == self.copies:
                    break
                try:
                    ray.get(self.holders[node].put.remote(self.key, step, dict(meta), ref), timeout=CALL_TIMEOUT_S)
                    held.append(node)
                except Exception as exc:
                    logger.warning("dyncheck: the memory holder on node %s did not take the step-%d snapshot (%s); "
                                   "trying another", node[:12], step, type(exc).__name__)
        finally:
            del ref
        try:
            if len(held) < self.copies:
                raise RuntimeError(f"only {len(held)} of {self.copies} holders took it")
            for node in held:  # complete only once every copy is held; the set before it stays until then
                if not ray.get(self.holders[node].commit.remote(self.key, step), timeout=CALL_TIMEOUT_S):
                    raise RuntimeError(f"the holder on node {node[:12]} lost it before the commit")
        except BaseException:
            for node in held:  # best effort: none keeps a copy that is not complete everywhere
                self.holders[node].abort.remote(self.key, step)
            raise
        for node in held:
            self.holders[node].prune.remote(self.key, step)
        return tuple(held)

    def newest(self) -> Held | None:
        calls = {node: h.newest.remote(self.key) for node, h in self.holders.items()}
        found: dict[int, tuple[dict[str, Any], list[str]]] = {}
        deadline = time.monotonic() + LOOKUP_TIMEOUT_S
        for node, call in calls.items():
            try:
                answer = ray.get(call, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:  # a holder lost with its node
                logger.warning("dyncheck: the memory holder on node %s is gone (%s)", node[:12], type(exc).__name__)
                continue
            if answer is not None:
                step, meta = answer
                found.setdefault(step, (meta, []))[1].append(node)
        if not found:
            return None
        step = max(found)
        meta, nodes = found[step]
        return Held(step, meta, tuple(nodes))

    def get(self, held: Held) -> dict[str, memoryview]:
        errors = []
        own_first = sorted(held.holders, key=lambda n: n != self.own_node)
        for node in own_first:
            try:
                files = ray.get(self.holders[node].get.remote(self.key, held.step), timeout=CALL_TIMEOUT_S)
                return {name: memoryview(data) for name, data in files.items()}
            except Exception as exc:
                errors.append(f"node {node[:12]}: {type(exc).__name__}: {exc}")
        raise RuntimeError(f"no holder served the step-{held.step} snapshot: {'; '.join(errors)}")

    def held_bytes(self) -> dict[str, int]:
        calls = {node: h.held.remote() for node, h in self.holders.items()}
        deadline = time.monotonic() + LOOKUP_TIMEOUT_S
        out = {}
        for node, call in calls.items():
            try:
                out[node] = int(ray.get(call, timeout=max(0.1, deadline - time.monotonic())))
            except Exception:  # a holder lost with its node holds nothing
                continue
        return out
