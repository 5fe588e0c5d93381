"""Ray's workers cannot import ``tests/harness``: the harness modules they run are sent to them by value."""

from __future__ import annotations


def register() -> None:
    """Send the workloads, the command language they use and ``faultfs`` to Ray's workers by value
    (call before Ray pickles a training function)."""
    import actions
    import ray.cloudpickle

    import faultfs
    import hf_workloads
    import lightning_workloads
    import ray_workloads

    for module in (actions, faultfs, hf_workloads, lightning_workloads, ray_workloads):
        ray.cloudpickle.register_pickle_by_value(module)
