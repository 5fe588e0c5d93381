"""Whether HF's ``Trainer`` runs under a sharded layout (Accelerate's FSDP, or DeepSpeed), where a weights-only
save is not one: HF refuses ``save_only_model`` with FSDP's sharded state dict (``Trainer`` checks it once, at
its start; the callback's per-save toggle would slip past that check); under FSDP's full state dict
``save_only_model`` leaves out ``pytorch_model_fsdp.bin``, which HF's resume under FSDP loads; and under ZeRO-3
without ``stage3_gather_16bit_weights_on_model_save`` HF's model save writes no usable weights. Every rank
writes its shard either way, so the callback saves the full state there instead."""

from __future__ import annotations

from typing import Any

__all__ = ["sharded_layout"]


def sharded_layout(state: Any = None) -> str | None:
    """``"fsdp"`` (any FSDP state dict type), ``"deepspeed"``, or ``None`` (a layout where HF's
    ``save_only_model`` writes the full weights). ``state``: Accelerate's ``AcceleratorState`` (default: the
    live one of this process, if ``Trainer`` made one; ``None`` when it did not)."""
    if state is None:
        try:
            from accelerate.state import AcceleratorState
        except ImportError:  # pragma: no cover - transformers needs accelerate
            return None
        if not AcceleratorState._shared_state:  # no Accelerator yet: constructing one here would make it
            return None
        state = AcceleratorState()
    if getattr(state, "deepspeed_plugin", None) is not None:
        return "deepspeed"
    if getattr(state, "fsdp_plugin", None) is not None and "FSDP" in str(getattr(state, "distributed_type", "")):
        return "fsdp"
    return None
