"""Consolidation: any checkpoint to one file of plain types, readable without a process group or this code.

The file has the layout of a Lightning checkpoint (``state_dict``, ``optimizer_states``,
``hyper_parameters``, ``global_step``, ...), so it loads with both ``torch.load(path, weights_only=True)``
and ``LightningModule.load_from_checkpoint(path)``, and it can be resumed from.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_moe.checkpoint.dcp import read_distributed_full
from lightning_moe.checkpoint.files import PathLike, atomic_save
from lightning_moe.checkpoint.full import read_full
from lightning_moe.checkpoint.manifest import verify_checkpoint
from lightning_moe.checkpoint.state import MODEL_KEY, OPTIMIZERS_KEY, to_plain

__all__ = ["consolidate", "consolidate_main", "read_any_layout"]


def read_any_layout(checkpoint: Path, scratch_dir: Path, *, weights_only: bool = True) -> dict[str, Any]:
    """A checkpoint of either layout (folder or file), verified against its manifest, as the flat dict of a
    full file: ``{"state_dict": {...}, "optimizer_states": [...], **meta}``.

    ``scratch_dir``: where a folder's gathered tensors are staged while it is read.
    """
    verify_checkpoint(checkpoint)
    if checkpoint.is_dir():
        return read_distributed_full(checkpoint, scratch_dir, weights_only=weights_only)
    return read_full(checkpoint, weights_only=weights_only)


def consolidate(checkpoint: PathLike, out_file: PathLike, *, trust_meta: bool = False) -> dict[str, Any]:
    """Write ``checkpoint`` as one full file of plain types (see the module docstring); one process.

    Args:
        checkpoint: a complete distributed checkpoint folder, or a checkpoint file (full, Lightning's own,
            or an earlier consolidated file).
        out_file: the file to write (atomically; an existing file is replaced).
        trust_meta: read the metadata with full unpickling (``weights_only=False``). Needed only when the
            hyper-parameters hold custom objects; those are written out as their ``str``.

    Returns:
        The dict written: ``{"state_dict": {name: Tensor}, "optimizer_states": [...], **the rest}``.

    Raises:
        FileNotFoundError: nothing at ``checkpoint``.
        IsADirectoryError: ``out_file`` is a folder.
        IncompleteCheckpointError: a folder whose writing did not finish.
        DamagedCheckpointError: the checkpoint's files differ from its manifest.
    """
    src, dst = Path(checkpoint), Path(out_file)
    if not src.exists():
        raise FileNotFoundError(
            f"checkpoint={str(src)!r} does not exist; pass a distributed checkpoint folder or a checkpoint file."
        )
    if dst.is_dir():
        raise IsADirectoryError(f"out_file={str(dst)!r} is a folder; pass a file path.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    full = read_any_layout(src, dst.parent, weights_only=not trust_meta)
    model = full.pop(MODEL_KEY)
    optimizers = full.pop(OPTIMIZERS_KEY, None) or []
    out: dict[str, Any] = {
        **to_plain(full),
        MODEL_KEY: {str(k): v for k, v in model.items()},
        OPTIMIZERS_KEY: [to_plain(state) for state in optimizers],
    }
    atomic_save(out, dst, manifest=True)
    return out


def consolidate_main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m lightning_moe.checkpoint [consolidate] CHECKPOINT OUT_FILE [--trust-meta]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "consolidate":
        args = args[1:]
    parser = argparse.ArgumentParser(
        prog="python -m lightning_moe.checkpoint consolidate",
        description="Turn a checkpoint (a distributed checkpoint folder or a file) into one file that both"
        " `torch.load(path, weights_only=True)` and `LightningModule.load_from_checkpoint(path)` read.",
    )
    parser.add_argument("checkpoint", help="distributed checkpoint folder (with .metadata, meta.pt, .complete) or file")
    parser.add_argument("out_file", help="file to write")
    parser.add_argument(
        "--trust-meta",
        action="store_true",
        help="unpickle the metadata fully (only for checkpoints you trust whose hyper-parameters hold custom objects)",
    )
    ns = parser.parse_args(args)
    try:
        out = consolidate(ns.checkpoint, ns.out_file, trust_meta=ns.trust_meta)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_params = sum(v.numel() for v in out[MODEL_KEY].values() if isinstance(v, Tensor))
    print(
        f"wrote {ns.out_file}: {len(out[MODEL_KEY])} tensors ({n_params:,} elements),"
        f" {len(out[OPTIMIZERS_KEY])} optimizer state(s)"
    )
    return 0
