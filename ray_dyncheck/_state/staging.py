"""A framework's checkpoint folder, file by file: which rank owns which file, and staging one rank's share
(hard links) in a directory of its own for the backend, rank 0's with the manifest of every rank's files.

Used by the adapters whose framework writes its own folder (HF ``Trainer``'s ``checkpoint-N``, Lightning's
``checkpoint.ckpt``): every rank reports only the files it owns, so a folder that several ranks of one node
wrote together is stored once, and a checkpoint missing one rank's file is never resumed from.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable

from .layout import write_manifest

__all__ = ["link_or_copy", "mine", "owner", "sizes", "stage_share"]

# A rank's own files of a framework's folder:
# - its RNG state in HF's name (rng_state_<rank>.pth);
# - its shard of a DCP folder (FSDP's sharded state dict, Lightning's ModelParallelStrategy): __<rank>_<n>.distcp;
# - its DeepSpeed ZeRO partition, by data-parallel rank: [bf16_|fp16_]zero_pp_rank_<rank>_mp_rank_<mp>_
#   {model,optim}_states.pt (without model parallelism the data-parallel rank is the world rank).
_RANK_FILE = re.compile(r"^(?:rng_state_(\d+)\.pth|__(\d+)_\d+\.distcp"
                        r"|(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:model|optim)_states\.pt)$")


def owner(path: str) -> int:
    """The rank whose file this is (a path relative to the checkpoint folder): see ``_RANK_FILE``; every other
    file (a DCP folder's ``.metadata``, a full ``.ckpt``, config and trainer state) is rank 0's."""
    m = _RANK_FILE.match(os.path.basename(path))
    return int(next(g for g in m.groups() if g is not None)) if m else 0


def sizes(root: str, names: Iterable[str]) -> dict[str, int]:
    """``{path relative to root: bytes}`` of ``names`` in ``root``, folders walked."""
    found = {}
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            found[name] = os.path.getsize(path)
            continue
        for base, _dirs, files in os.walk(path):
            for file in files:
                found[os.path.relpath(os.path.join(base, file), root)] = os.path.getsize(os.path.join(base, file))
    return found


def mine(source: str, rank: int) -> dict[str, int]:
    """This rank's files of ``source`` (``{path: bytes}``); none when this node has no ``source``."""
    if not os.path.isdir(source):
        return {}
    return {path: size for path, size in sizes(source, os.listdir(source)).items() if owner(path) == rank}


def stage_share(source: str, root: str, *, step: int, kind: str, shares: list[dict[str, int]], rank: int,
                world_size: int, merged: bool, backend_name: str, layout: str,
                add: Callable[[str], None] | None = None) -> str | None:
    """This rank's share of the framework's folder ``source``, hard-linked (or copied) into a new directory in
    ``root`` that the backend deletes once it is stored. ``shares``: every rank's files (rank order).

    ``merged``: the backend merges every rank's directory into one checkpoint (Ray Train); else it stores rank
    0's alone, so rank 0 stages every file and they must all be in its ``source`` (one shared folder), and other
    ranks return ``None``. Rank 0 calls ``add(staging)`` for files of its own (a scheduler's state) and then
    writes the manifest of every rank's files (with ``layout``).

    Raises:
        FileNotFoundError: ``merged`` is false and another rank's file is not in rank 0's ``source``.
    """
    if rank != 0 and not merged:
        return None
    names = [path for path in sorted(sizes(source, os.listdir(source)) if os.path.isdir(source) else {})
             if owner(path) == rank or (rank == 0 and not merged)]
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"step{step}-rank{rank}-", dir=root)
    try:
        for name in names:  # file by file: a folder may hold other ranks' shards
            os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
            link_or_copy(os.path.join(source, name), os.path.join(staging, name))
        if rank == 0:
            if add is not None:
                add(staging)
            files = sizes(staging, os.listdir(staging))
            for other, theirs in enumerate(shares[1:], start=1):
                for name, size in theirs.items():
                    if merged:
                        files[name] = size  # stored into the same checkpoint by rank `other`
                    elif files.get(name) != size:
                        raise FileNotFoundError(
                            f"rank {other}'s {name} is not in {source} on rank 0: {backend_name} stores "
                            "rank 0's files only, so every rank needs to write into the same folder")
            write_manifest(staging, files, kind=kind, step=step, world_size=world_size, layout=layout)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def link_or_copy(src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst)
        for name in os.listdir(src):
            link_or_copy(os.path.join(src, name), os.path.join(dst, name))
        return
    try:
        os.link(src, dst)  # same filesystem: no copy of a multi-GB model
    except OSError:
        shutil.copy2(src, dst)
