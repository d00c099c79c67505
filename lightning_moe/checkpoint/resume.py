"""Finding the checkpoint a (re)started run resumes from, and writing Lightning's own checkpoint files atomically.

Checkpoints are named ``step-<N>.ckpt`` (a file, or a DCP folder written by ``moe_zero``). Both are written
under a temporary name and renamed into place, so a run killed while writing leaves the previous
checkpoint as the newest complete one (:func:`~lightning_moe.checkpoint.files.is_complete`), and
``resume=auto`` picks it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_moe.checkpoint.files import COMPLETE_MARKER, atomic_save, is_complete

__all__ = ["AtomicCheckpointIO", "checkpoint_step", "find_latest_checkpoint", "resolve_resume"]

_STEP = re.compile(r"step-(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (:func:`~lightning_moe.checkpoint.files.atomic_save`)
    and ``weights_only=True`` reads by default."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True if weights_only is None else weights_only)


def checkpoint_step(path: Path) -> int | None:
    """The step in a ``step-<N>.ckpt`` name, or None."""
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else None


def find_latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The complete ``step-<N>.ckpt`` with the largest N in ``folder`` (None if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [(checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
    return max(candidates)[1] if candidates else None


def resolve_resume(resume: str, folder: str | os.PathLike) -> str | None:
    """``ckpt_path`` for ``Trainer.fit`` from ``checkpoint.resume`` (``auto``, ``never`` or a path)."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = find_latest_checkpoint(folder)
        return None if latest is None else str(latest)
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} does not exist; use 'auto', 'never' or an existing checkpoint")
    if not is_complete(path):
        raise ValueError(f"checkpoint.resume={resume!r} is an incomplete checkpoint (no {COMPLETE_MARKER} marker)")
    return str(path)
