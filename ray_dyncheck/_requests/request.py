"""One request: what was asked for (a body of data only, parsed with a size cap) and where its claim sits."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..vocab import Kind, Source
from .files import MAX_JSON_BYTES

__all__ = ["ID_RE", "KINDS", "Request", "parse_body"]

KINDS = tuple(Kind)
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Request:
    """One claimed request: what was asked for and where its claimed file now sits."""

    id: str
    kind: Kind = Kind.FULL
    stop: bool = False
    source: Source = Source.REQUEST
    """``trigger`` (the trigger file), ``request`` (the request folder) or ``interrupt`` (the driver)."""
    path: str | None = None
    """The claimed file to delete on retirement; ``None`` when it could not be moved."""
    identity: tuple[Any, ...] = field(default=(), compare=False)
    attempts: int = 0
    """Saves already started for it (and not finished: the workers died during them)."""
    claimed_at: float = field(default=0.0, compare=False)
    """When rank 0's poller claimed it (``time.monotonic()``), for the request-to-commit time."""


def parse_body(raw: bytes, stem: str) -> Request:
    """Parse a request file's bytes (data only, size-capped). Raises ``ValueError`` saying why."""
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"request body is {len(raw)} bytes; the limit is {MAX_JSON_BYTES}")
    body: Any = {}
    if raw.strip():
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"id", "kind", "stop", "time", "source"})
    if unknown:
        raise ValueError(f"unknown request field(s): {', '.join(unknown)}")
    rid = body.get("id", stem)
    if not isinstance(rid, str) or rid != stem:
        raise ValueError(f"request id {rid!r} does not match its file name {stem!r}.json")
    kind = body.get("kind", "full")
    if kind not in KINDS:
        raise ValueError(f"request kind must be 'full', 'weights' or 'none', got {kind!r}")
    stop = body.get("stop", False)
    if not isinstance(stop, bool):
        raise ValueError(f"request stop must be true or false, got {stop!r}")
    if kind == "none" and not stop:
        raise ValueError("request kind 'none' (no save) only makes sense with stop: true")
    source = body.get("source", "request")
    if source not in ("request", "interrupt"):
        raise ValueError(f"request source must be 'request' or 'interrupt', got {source!r}")
    return Request(id=rid, kind=Kind(kind), stop=stop, source=Source(source))
