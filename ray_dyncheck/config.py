"""The ``dynamic_checkpoint`` configuration block.

Compatible with Axolotl's block (``enabled``, ``check_interval``, ``trigger_file_path``): an Axolotl
YAML file loads verbatim. The extra keys are ours.

Example:
    >>> from ray_dyncheck import DynamicCheckpointConfig
    >>> cfg = DynamicCheckpointConfig.from_dict({"enabled": True, "check_interval": 100})
    >>> cfg.check_interval
    100
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import signal
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

__all__ = ["DynamicCheckpointConfig", "load_config"]

BLOCK = "dynamic_checkpoint"
DEFAULT_TRIGGER = "dyncheck.save"
TRIGGER_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
"""URI schemes pyarrow makes filesystems for."""

CheckInterval = Union[int, Literal["auto"]]
MemorySnapshots = Union[int, Literal["off", "auto"]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class DynamicCheckpointConfig:
    """On-demand checkpointing settings, read by every worker (and by the driver for interrupts).

    Build it from the ``dynamic_checkpoint:`` block of a YAML file, a dict, or keywords; every field
    is validated on construction and a bad value raises ``ValueError`` naming the field and the fix.
    """

    enabled: bool = True
    """Watch for triggers and requests. Off: no checks and no collectives; ``save_steps`` and
    ``restore()`` still work."""

    check_interval: CheckInterval = "auto"
    """Steps between checks for a trigger. ``auto`` keeps checks under ``max_check_overhead`` of
    training time while reacting as fast as that allows, with at least about half a
    ``poll_interval_s`` between checks (rank 0 cannot have a new request sooner); an integer N
    checks when ``step % N == 0``, as Axolotl does."""

    trigger_file_path: str = DEFAULT_TRIGGER
    """The trigger file: relative to the run directory (``<storage_path>/<name>/``), or an absolute
    path or URI. Any file there asks for one full checkpoint; it is removed once saved."""

    save_steps: int | None = None
    """Also save a full checkpoint every N steps (``None``: no schedule)."""

    max_check_overhead: float = 0.005
    """With ``check_interval: auto``: the share of training time checks may cost (0.005 = 0.5 %)."""

    poll_interval_s: float = 1.0
    """Seconds between two reads of the trigger and request folder by rank 0's background poller."""

    on_interrupt: Literal["weights", "full", "none"] = "weights"
    """What ``rdc.fit`` asks for on Ctrl+C / SIGTERM: a weights-only save, a full one, or none (then
    the workers still stop cleanly)."""

    interrupt_grace_s: float = 120.0
    """How long ``rdc.fit`` waits for that save and a clean stop before forcing the exit."""

    signals: tuple[str, ...] = ("SIGINT", "SIGTERM")
    """The signals ``rdc.fit`` handles while it runs (add ``SIGUSR1`` for Slurm's warning signal)."""

    collective_timeout_s: float = 600.0
    """Timeout of every collective on our gloo side group: a rank that died makes the others fail
    after this long instead of waiting 30 minutes. Keep it above your longest synchronous save."""

    commit_timeout_s: float = 300.0
    """How long rank 0 waits for Ray to register a stored checkpoint before its receipt says error."""

    save_mode: Literal["async", "sync"] = "async"
    """``async``: a save blocks training only while the state is copied into host memory; the files are
    written and uploaded in the background, one save at a time. ``sync``: training also waits for the
    write (the upload stays in the background)."""

    on_preemption: Literal["auto", "full", "weights", "none"] = "auto"
    """When Ray reports that a node of this run is being preempted (drained with a deadline): save at
    the next check, with ``reason: preemption``. ``auto``: full when the last full save's measured
    time to commit fits before the deadline with room to spare, else weights-only; ``none``: do not
    save for it."""

    max_save_attempts: int = 2
    """A request whose save was started this many times, each time killing the workers (e.g. out of
    memory), gets an ``error`` receipt instead of another try after the next restart."""

    memory_snapshots: MemorySnapshots = "off"
    """Keep the training state in host memory, with one replica on another node, every N steps, so a
    crash (a killed worker, a lost node) resumes from there instead of the newest stored checkpoint.
    ``auto`` picks N so a snapshot costs at most 1 % of training time; ``off``: storage only. Needs
    ``rdc.fit(trainer)`` (its driver owns the memory holders); covers the plain hook's unsharded state."""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise _error("enabled", self.enabled, "set it to true or false")
        ci = self.check_interval
        if ci != "auto" and not (_is_int(ci) and ci >= 1):
            raise _error(
                "check_interval", ci, "set it to 'auto' or an integer >= 1 (steps between checks)"
            )
        self._validate_trigger_path()
        if self.save_steps is not None and not (_is_int(self.save_steps) and self.save_steps >= 1):
            raise _error("save_steps", self.save_steps, "set it to an integer >= 1, or leave it out")
        mco = self.max_check_overhead
        if not (_is_number(mco) and 0 < mco < 1):
            raise _error(
                "max_check_overhead", mco, "set it to a fraction between 0 and 1, e.g. 0.005 for 0.5 %"
            )
        pis = self.poll_interval_s
        if not (_is_number(pis) and 0 < pis <= 3600):
            raise _error("poll_interval_s", pis, "set it to a number of seconds in (0, 3600], e.g. 1.0")
        if self.on_interrupt not in ("weights", "full", "none"):
            raise _error("on_interrupt", self.on_interrupt, "set it to 'weights', 'full' or 'none'")
        grace = self.interrupt_grace_s
        if not (_is_number(grace) and grace > 0):
            raise _error("interrupt_grace_s", grace, "set it to a number of seconds > 0, e.g. 120")
        for name in ("collective_timeout_s", "commit_timeout_s"):
            value = getattr(self, name)
            if not (_is_number(value) and value > 0):
                raise _error(name, value, "set it to a number of seconds > 0, e.g. 600")
        if self.on_preemption not in ("auto", "full", "weights", "none"):
            raise _error("on_preemption", self.on_preemption, "set it to 'auto', 'full', 'weights' or 'none'")
        if self.save_mode not in ("async", "sync"):
            raise _error("save_mode", self.save_mode, "set it to 'async' or 'sync'")
        ms = self.memory_snapshots
        if ms not in ("off", "auto") and not (_is_int(ms) and int(ms) >= 1):
            raise _error("memory_snapshots", ms, "set it to 'off', 'auto' or an integer >= 1 (steps between "
                         "snapshots)")
        if not (_is_int(self.max_save_attempts) and self.max_save_attempts >= 1):
            raise _error("max_save_attempts", self.max_save_attempts, "set it to an integer >= 1, e.g. 2")
        sigs = self.signals
        if isinstance(sigs, str) or not isinstance(sigs, (list, tuple)) or not all(
            isinstance(n, str) and isinstance(getattr(signal, n, None), signal.Signals) for n in sigs
        ):
            raise _error("signals", sigs, "set it to a list of signal names, e.g. [SIGINT, SIGTERM, SIGUSR1]")
        object.__setattr__(self, "signals", tuple(sigs))

    def _validate_trigger_path(self) -> None:
        path = self.trigger_file_path
        if not isinstance(path, str) or not path.strip():
            raise _error("trigger_file_path", path, "set it to a file name such as 'dyncheck.save'")
        if "://" in path:
            self._validate_trigger_uri(path)
            return
        if os.path.isabs(path):
            return
        norm = posixpath.normpath(path.replace(os.sep, "/"))
        if norm == ".." or norm.startswith("../"):
            raise _error(
                "trigger_file_path",
                path,
                "a relative path must stay inside the run directory; use an absolute path or URI to "
                "put the trigger elsewhere",
            )
        if norm == ".":
            raise _error("trigger_file_path", path, "set it to a file name such as 'dyncheck.save'")

    def _validate_trigger_uri(self, uri: str) -> None:
        """Parsed here, on every rank alike, with no I/O: a bad URI fails every rank at once instead of
        rank 0 alone (the others would wait for it in a collective)."""
        parts = urllib.parse.urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in TRIGGER_SCHEMES:
            raise _error("trigger_file_path", uri, f"use one of the schemes {', '.join(TRIGGER_SCHEMES)} "
                         "(pyarrow filesystems), a local path, or a name inside the run directory")
        if scheme not in ("file", "hdfs", "viewfs") and not parts.netloc:  # HDFS: the default namenode
            raise _error("trigger_file_path", uri, f"name the bucket: {scheme}://<bucket>/<path>/dyncheck.save")
        if not parts.path.strip("/") or parts.path.endswith("/"):
            raise _error("trigger_file_path", uri, f"name a file, e.g. {scheme}://{parts.netloc or '<bucket>'}"
                         f"{parts.path.rstrip('/')}/dyncheck.save")

    @property
    def snapshots_on(self) -> bool:
        """Whether memory snapshots are taken."""
        return self.memory_snapshots != "off"

    @property
    def auto_interval(self) -> bool:
        """Whether the check interval is chosen at run time."""
        return self.check_interval == "auto"

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (what ``from_dict`` reads back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> DynamicCheckpointConfig:
        """Build from a mapping of field names (the contents of a ``dynamic_checkpoint:`` block).

        Args:
            data: The block. ``None`` values mean "use the default", as in YAML.
            source: Where it came from (a file name), added to error messages.

        Raises:
            ValueError: unknown keys (listed) or a bad value.
        """
        where = f" in {source}" if source else ""
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{BLOCK} must be a mapping of settings{where}, got {type(data).__name__}; "
                f"write it as '{BLOCK}: {{enabled: true}}'"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(
                f"unknown {BLOCK} key(s){where}: {', '.join(unknown)}; "
                f"valid keys are {', '.join(sorted(known))}"
            )
        kwargs = {k: v for k, v in data.items() if v is not None}
        try:
            return cls(**kwargs)
        except ValueError as exc:
            if source:
                raise ValueError(f"{exc} (in {source})") from None
            raise

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> DynamicCheckpointConfig:
        """Read a YAML file: either a document with a top-level ``dynamic_checkpoint:`` block (other
        top-level keys, e.g. the rest of an Axolotl config, are ignored) or the block's contents alone.

        A document without the block gives a disabled config, as Axolotl does.
        """
        name = os.fspath(path)
        try:
            with open(name, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except OSError as exc:
            raise ValueError(f"cannot read config file {name}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"invalid YAML in {name}: {exc}") from None
        return cls.from_document(doc, source=name)

    @classmethod
    def from_document(cls, doc: Any, *, source: str | None = None) -> DynamicCheckpointConfig:
        """Like :meth:`from_yaml`, for an already parsed document."""
        if doc is None:
            return cls(enabled=False)
        if not isinstance(doc, Mapping):
            where = f" in {source}" if source else ""
            raise ValueError(
                f"expected a mapping with a '{BLOCK}:' block{where}, got {type(doc).__name__}"
            )
        if BLOCK in doc:
            return cls.from_dict(doc[BLOCK] if doc[BLOCK] is not None else {}, source=source)
        known = {f.name for f in dataclasses.fields(cls)}
        if doc and all(k in known for k in doc):
            return cls.from_dict(doc, source=source)
        return cls(enabled=False)


def load_config(
    config: DynamicCheckpointConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
) -> DynamicCheckpointConfig:
    """Accept whatever a user hands the hook: a config, a dict, a YAML path, or ``None`` (defaults)."""
    if config is None:
        return DynamicCheckpointConfig()
    if isinstance(config, DynamicCheckpointConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return DynamicCheckpointConfig.from_yaml(config)
    if isinstance(config, Mapping):
        if BLOCK in config:
            return DynamicCheckpointConfig.from_document(config)
        return DynamicCheckpointConfig.from_dict(config)
    raise ValueError(
        f"{BLOCK} config must be a dict, a YAML file path or a DynamicCheckpointConfig, "
        f"got {type(config).__name__}"
    )


def _error(field: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"{BLOCK}.{field}: got {value!r}; {fix}")
