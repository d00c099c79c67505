"""Finding the checkpoint a (re)started run resumes from, and writing Lightning's own checkpoint files atomically.

Checkpoints are named ``step-<N>.ckpt`` (a file, or a DCP folder written by ``moe_zero``). Both are written
under a temporary name and renamed into place, so a run killed while writing leaves the previous
checkpoint as the newest complete one (:func:`~lightning_moe.checkpoint.files.is_complete`), and
``resume=auto`` picks it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_moe.checkpoint.files import (
    COMPLETE_MARKER,
    META_FILENAME,
    atomic_save,
    is_complete,
    needs_pickled_code,
    read_torch_file,
)
from lightning_moe.checkpoint.manifest import DamagedCheckpointError, verify_checkpoint

__all__ = [
    "AtomicCheckpointIO",
    "check_loadable",
    "checkpoint_step",
    "complete_checkpoints",
    "find_latest_checkpoint",
    "later_checkpoints",
    "newest_loadable_checkpoint",
    "read_checkpoint_meta",
    "resolve_resume",
]

log = logging.getLogger(__name__)

_STEP = re.compile(r"step-(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (:func:`~lightning_moe.checkpoint.files.atomic_save`)
    and ``weights_only=True`` reads by default."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        atomic_save(checkpoint, path, manifest=True)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if Path(path).is_dir():
            raise ValueError(
                f"{str(path)!r} is a sharded checkpoint folder, which only strategy=moe_zero resumes; resume with"
                " strategy=moe_zero, or consolidate it first (python -m lightning_moe.checkpoint consolidate)"
            )
        verify_checkpoint(Path(path), check_sums=False)  # sizes: cheap; resolve_resume compared the checksums
        return read_torch_file(Path(path), True if weights_only is None else weights_only, map_location=map_location)


def checkpoint_step(path: Path) -> int | None:
    """The step in a ``step-<N>.ckpt`` name, or None."""
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete ``step-<N>.ckpt`` in ``folder``, newest (largest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = [
        (checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None and is_complete(p)
    ]
    return [p for _, p in sorted(candidates, reverse=True)]


def find_latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The complete ``step-<N>.ckpt`` with the largest N in ``folder`` (None if there is none); not verified."""
    found = complete_checkpoints(folder)
    return found[0] if found else None


def check_loadable(path: Path) -> None:
    """Raise :class:`DamagedCheckpointError` (one line) unless ``path`` matches its manifest; a file without
    a manifest (written before manifests) must at least open with ``torch.load(weights_only=True)``.

    Raises:
        DamagedCheckpointError: truncated, corrupted, a shard missing.
        ValueError: the file needs pickled code (``weights_only=True`` refuses it).
    """
    if verify_checkpoint(path) or path.is_dir():
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if needs_pickled_code(err):  # not damage: refused with its own message
            read_torch_file(path, True)  # raises the message that says what to do
        raise DamagedCheckpointError(f"checkpoint {str(path)!r} is damaged: {_first_line(err)}") from err
    except Exception as err:  # noqa: BLE001 - a damaged zip fails in several ways
        raise DamagedCheckpointError(f"checkpoint {str(path)!r} is damaged: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def newest_loadable_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``folder`` that passes :func:`check_loadable`.

    Each damaged newer one is reported in one warning line; if there are checkpoints but none loads,
    this raises instead of returning None (a run never silently starts from scratch over a damaged one).

    Raises:
        DamagedCheckpointError: every complete checkpoint in ``folder`` is damaged.
    """
    found = complete_checkpoints(folder)
    problems = []
    for path in found:
        try:
            check_loadable(path)
        except DamagedCheckpointError as err:
            problems.append(str(err))
            log.warning("%s; trying the previous checkpoint", err)
            continue
        if problems:
            log.warning(
                "resuming from %s, the newest checkpoint that is whole (%d newer one(s) damaged)",
                path.name,
                len(problems),
            )
        return path
    if problems:
        raise DamagedCheckpointError(
            f"no checkpoint in {str(folder)!r} can be resumed ({len(problems)} damaged, newest: {problems[0]}). Remove"
            " them to start this run over, or start a new run with another name="
        )
    return None


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Everything but the tensors' values of a checkpoint (``meta.pt`` of a folder; a file is mapped, not read)."""
    path = Path(path)
    if path.is_dir():
        return read_torch_file(path / META_FILENAME, True)
    data = read_torch_file(path, True, mmap=True)
    return data if isinstance(data, dict) else {}


def resolve_resume(resume: str, folder: str | os.PathLike) -> str | None:
    """``ckpt_path`` for ``Trainer.fit`` from ``checkpoint.resume`` (``auto``, ``never`` or a path).

    ``auto`` takes the newest checkpoint that is whole (:func:`newest_loadable_checkpoint`); a path must
    be a complete checkpoint that matches its manifest.
    """
    if resume == "never":
        return None
    if resume == "auto":
        latest = newest_loadable_checkpoint(folder)
        return None if latest is None else str(latest)
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint.resume={resume!r} does not exist; use 'auto', 'never' or an existing checkpoint"
        )
    if not is_complete(path):
        raise ValueError(f"checkpoint.resume={resume!r} is an incomplete checkpoint (no {COMPLETE_MARKER} marker)")
    check_loadable(path)
    return str(path)


def later_checkpoints(folder: str | os.PathLike, start: str | None) -> list[Path]:
    """The complete checkpoints in ``folder`` of steps after ``start`` (a checkpoint path; None = step 0):
    what a run continuing from ``start`` would abandon, newest first."""
    start_step = -1 if start is None else (checkpoint_step(Path(start)) or -1)
    return [p for p in complete_checkpoints(folder) if (checkpoint_step(p) or -1) > start_step]
