"""Moved to :mod:`lightning_moe.checkpoint`; these names stay importable from here until callers switch."""

from lightning_moe.checkpoint import (
    COMPLETE_MARKER,
    AtomicCheckpointIO,
    RetainingModelCheckpoint,
    checkpoint_step,
    find_latest_checkpoint,
    is_complete,
    prune_checkpoints,
    resolve_resume,
)

__all__ = [
    "COMPLETE_MARKER",
    "AtomicCheckpointIO",
    "RetainingModelCheckpoint",
    "checkpoint_step",
    "find_latest_checkpoint",
    "is_complete",
    "prune_checkpoints",
    "resolve_resume",
]
