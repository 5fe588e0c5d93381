"""What every :class:`~ray_dyncheck.Backend` must do, checked on a real one (world size 1, rank 0).

Used by the unit test for :class:`~ray_dyncheck.LocalBackend` and, inside a Ray Train worker, by the
Ray test for the Ray backend: the same steps and assertions against both.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

from ray_dyncheck._backends.base import REQUIRED, Backend
from ray_dyncheck._state import write_manifest


def overridden(cls: type) -> list[str]:
    """The required members ``cls`` leaves to :class:`Backend` (which only raises)."""
    return [name for name in REQUIRED if getattr(cls, name) is getattr(Backend, name)]


def check_backend(backend: Backend, timeout: float = 60.0) -> dict[str, Any]:
    """Report one checkpoint through ``backend`` and read it back; returns what was seen. Raises
    ``AssertionError`` on the first broken promise."""
    assert isinstance(backend, Backend), f"{type(backend).__name__} does not subclass Backend"
    assert not overridden(type(backend)), f"{type(backend).__name__} leaves {overridden(type(backend))} to Backend"
    assert (backend.rank, backend.world_size) == (0, 1)
    assert isinstance(backend.merges_rank_dirs, bool)
    storage = backend.storage()
    assert storage is not None and isinstance(storage[1], str), storage
    # Optional members answer (defaults or the backend's own), and never raise here.
    assert backend.preemption() is None
    assert backend.node_local(tempfile.gettempdir()) in (True, False)
    directory = tempfile.mkdtemp(prefix="contract-")
    with open(os.path.join(directory, "payload.bin"), "wb") as f:
        f.write(b"x" * 1000)
    write_manifest(directory, {"payload.bin": 1000}, kind="full", step=3, world_size=1)  # as every save has
    metadata = {"kind": "full", "step": 3, "reason": "manual"}
    backend.prepare(directory, metadata)
    done = threading.Event()
    seen: dict[str, Any] = {}

    def on_done(path: str | None, exc: BaseException | None) -> None:
        assert not done.is_set(), "on_done ran twice"
        seen.update(path=path, error=exc)
        done.set()

    name = "checkpoint_00000003_full_contract1"
    backend.report({"step": 3}, directory, name=name, metadata=metadata, on_done=on_done)
    assert done.wait(timeout), "on_done never ran"
    assert seen["error"] is None and seen["path"], seen
    path = seen["path"]
    assert backend.committed(path, timeout), "stored, yet not committed"
    listed = list(backend.checkpoints())
    assert listed and listed[0] == path, f"the newest checkpoint is not first: {listed}"
    with backend.open(path) as local:
        with open(os.path.join(local, "payload.bin"), "rb") as f:
            assert f.read() == b"x" * 1000
    backend.close()
    return {"path": path, "listed": len(listed), "type": type(backend).__name__}
