"""Where our log lines go: one line per request, decision, save and receipt on rank 0 (the driver's
console and the job's logs, where Ray forwards worker output); other ranks only when something is wrong.

Ray Train configures its workers' root logger (INFO, to the console), so there our lines simply
propagate. Elsewhere (plain ``torch.distributed``, the driver) a process with no logging configured
would drop them: then we add one console handler of our own. A level the application set on the
``ray_dyncheck`` logger is never changed.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["console"]


def console(rank: int = 0) -> None:
    """Show our lines: INFO on rank 0 (and the driver), warnings and errors only on other ranks."""
    log = logging.getLogger("ray_dyncheck")
    chosen = log.level != logging.NOTSET
    if rank != 0 and not chosen:
        log.setLevel(logging.WARNING)
    if logging.getLogger().handlers or log.handlers:
        return  # the application (or Ray Train, in its workers) configured logging: its levels apply
    if not chosen and rank == 0:
        log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False  # nothing above would print it; a later basicConfig would print it twice
