"""Checkpoints of sharded MoE models: save, load with resharding, consolidate, resume and retention.

Two layouts, both written atomically (a half-written checkpoint is never taken for a whole one):

* **Distributed (DCP) folder** (default; :mod:`~lightning_moe.checkpoint.dcp`): every rank writes its
  shards, rank 0 adds ``meta.pt`` (loops, epoch, global step, callbacks, hyper-parameters, lr schedulers)
  and a ``.complete`` marker last. A folder saved on one layout loads on any other.
* **Full file** (``save_distributed_checkpoint=False``; :mod:`~lightning_moe.checkpoint.full`): rank 0
  writes the gathered state with Lightning's keys, optimizer states keyed by parameter name.

:func:`consolidate` (``python -m lightning_moe.checkpoint consolidate CHECKPOINT OUT_FILE``) turns either into
one file of plain types that ``torch.load(path, weights_only=True)`` and
``LightningModule.load_from_checkpoint(path)`` read without any process group; :func:`average_checkpoints`
(``python -m lightning_moe.checkpoint average CHECKPOINT... --output FILE``) writes the mean of several.

Modules: :mod:`.files` (layouts on disk, the completeness rule, the atomic writer), :mod:`.state` (what goes
into a checkpoint), :mod:`.dcp` and :mod:`.full` (the two layouts), :mod:`.core` (save/load entry points),
:mod:`.consolidate`, :mod:`.average`, :mod:`.resume` (which checkpoint a run resumes from), :mod:`.retention` (pruning),
:mod:`.manifest` (files, sizes and SHA-256 of each checkpoint: truncation, flipped bytes and missing shards
are detected, and a resuming run falls back to the newest whole checkpoint).
"""

from lightning_moe.checkpoint.average import average_checkpoints, checkpoints_to_average
from lightning_moe.checkpoint.consolidate import consolidate, consolidate_main
from lightning_moe.checkpoint.core import load_checkpoint, save_checkpoint
from lightning_moe.checkpoint.files import (
    COMPLETE_MARKER,
    META_FILENAME,
    CheckpointWriteError,
    IncompleteCheckpointError,
    atomic_save,
    is_complete,
    is_complete_distributed_checkpoint,
    is_distributed_checkpoint,
)
from lightning_moe.checkpoint.manifest import DamagedCheckpointError, verify_checkpoint
from lightning_moe.checkpoint.resume import (
    AtomicCheckpointIO,
    check_loadable,
    checkpoint_step,
    find_latest_checkpoint,
    newest_loadable_checkpoint,
    resolve_resume,
)
from lightning_moe.checkpoint.retention import RetainingModelCheckpoint, prune_checkpoints
from lightning_moe.checkpoint.state import CheckpointMismatchError, model_state_dict, optimizer_state_dict

__all__ = [
    "COMPLETE_MARKER",
    "META_FILENAME",
    "AtomicCheckpointIO",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "DamagedCheckpointError",
    "IncompleteCheckpointError",
    "RetainingModelCheckpoint",
    "atomic_save",
    "check_loadable",
    "checkpoint_step",
    "average_checkpoints",
    "checkpoints_to_average",
    "consolidate",
    "consolidate_main",
    "find_latest_checkpoint",
    "is_complete",
    "is_complete_distributed_checkpoint",
    "is_distributed_checkpoint",
    "load_checkpoint",
    "model_state_dict",
    "newest_loadable_checkpoint",
    "optimizer_state_dict",
    "prune_checkpoints",
    "resolve_resume",
    "save_checkpoint",
    "verify_checkpoint",
]
