"""Checkpoint state: the layout and manifest (:mod:`.layout`), copying and writing a rank's state
(:mod:`.capture`, :mod:`.snapshot`, :mod:`.sharded`), and loading it back (:mod:`.restore`). Nothing here
imports Ray."""

from .capture import (
    Captured,
    Stateful,
    capture_rank_state,
    capture_state,
    is_hf_model,
    unwrap_model,
    write_checkpoint,
    write_files,
)
from .layout import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SHARDED_FORMAT_VERSION,
    TRAINER_FILE,
    read_manifest,
    read_stored_manifest,
    write_manifest,
)
from .restore import CheckpointInfo, load_checkpoint

__all__ = ["FORMAT_VERSION", "MANIFEST_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "SHARDED_FORMAT_VERSION", "TRAINER_FILE",
           "Captured", "CheckpointInfo", "Stateful", "capture_rank_state", "capture_state", "is_hf_model",
           "load_checkpoint", "read_manifest", "read_stored_manifest", "unwrap_model", "write_checkpoint",
           "write_files", "write_manifest"]
