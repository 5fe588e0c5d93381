"""The Backend contract: both backends implement every required member, and LocalBackend keeps its
promises on a real run directory (the Ray backend's run: tests/ray/test_backend_contract_ray.py)."""

from __future__ import annotations

import pytest
from backend_contract import check_backend, overridden

import ray_dyncheck as rdc
from ray_dyncheck._backends.base import Backend
from ray_dyncheck._backends.ray import RayBackend


@pytest.mark.parametrize("cls", [rdc.LocalBackend, RayBackend])
def test_every_backend_implements_every_required_member(cls):
    assert issubclass(cls, Backend) and rdc.Backend is Backend
    assert overridden(cls) == []


def test_the_check_notices_a_member_left_out():
    class Partial(rdc.LocalBackend):
        pass

    Partial.committed = Backend.committed  # type: ignore[method-assign]
    assert overridden(Partial) == ["committed"]
    with pytest.raises(AssertionError, match="leaves"):
        check_backend(Partial("/tmp/unused-run"))


def test_local_backend_keeps_the_contract(tmp_path):
    seen = check_backend(rdc.LocalBackend(str(tmp_path / "run")))
    assert seen["listed"] == 1 and seen["path"].startswith(str(tmp_path / "run"))
