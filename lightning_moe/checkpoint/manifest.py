"""Manifests of checkpoints (files, sizes, SHA-256) and their verification.

A distributed checkpoint folder holds ``manifest.json`` (written before the ``.complete`` marker); a
checkpoint file ``step-N.ckpt`` has ``step-N.ckpt.manifest.json`` beside it. Verification catches a
truncated file, a flipped byte and a missing shard, and says which in one line. Checkpoints written
before manifests existed have none: they are accepted as they are (only the completeness rule applies).

Each rank hashes the shard files it wrote itself, so hashing runs in parallel over the ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "FOLDER_MANIFEST",
    "FILE_MANIFEST_SUFFIX",
    "DamagedCheckpointError",
    "digest",
    "file_manifest_path",
    "has_manifest",
    "rank_shards",
    "verify_checkpoint",
    "write_manifest",
]

#: Manifest file inside a distributed checkpoint folder.
FOLDER_MANIFEST = "manifest.json"
#: Suffix of the manifest beside a checkpoint file (``step-N.ckpt.manifest.json``).
FILE_MANIFEST_SUFFIX = ".manifest.json"
_VERSION = 1
_CHUNK = 1 << 22


class DamagedCheckpointError(ValueError):
    """A checkpoint's files differ from its manifest (truncated, corrupted, missing)."""


def digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def file_manifest_path(path: Path) -> Path:
    """Where the manifest of the checkpoint file ``path`` lives."""
    return path.with_name(path.name + FILE_MANIFEST_SUFFIX)


def _manifest_of(path: Path) -> Path:
    return path / FOLDER_MANIFEST if path.is_dir() else file_manifest_path(path)


def has_manifest(path: Path) -> bool:
    """Whether the checkpoint (file or folder) ``path`` has a manifest."""
    return _manifest_of(Path(path)).is_file()


def write_manifest(target: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write ``{"version", "files": {relative name: digest}}`` to ``target`` (a new file; flushed)."""
    text = json.dumps({"version": _VERSION, "files": dict(sorted(entries.items()))}, indent=1)
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_manifest(path: Path, manifest: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise TypeError("unexpected layout")
        return files
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpointError(
            f"checkpoint {str(path)!r} is damaged: its manifest {manifest.name} is unreadable ({type(err).__name__})"
        ) from err


def verify_checkpoint(path: Path, *, check_sums: bool = True) -> bool:
    """Check a checkpoint against its manifest; returns whether it had one.

    Args:
        path: a checkpoint file or a (complete) distributed checkpoint folder.
        check_sums: also compare SHA-256 (reads every byte); ``False`` checks presence and sizes only.

    Raises:
        DamagedCheckpointError: a listed file is missing, has another size or another checksum; the
            one-line message names the checkpoint and the file.
    """
    path = Path(path)
    manifest = _manifest_of(path)
    if not manifest.is_file():
        return False
    files = _read_manifest(path, manifest)
    for name, expected in files.items():
        target = path / name if path.is_dir() else path.parent / name
        if not target.is_file():
            raise DamagedCheckpointError(f"checkpoint {str(path)!r} is damaged: {name} is missing")
        size = target.stat().st_size
        if size != expected["size"]:
            raise DamagedCheckpointError(
                f"checkpoint {str(path)!r} is damaged: {name} has {size} bytes, its manifest says"
                f" {expected['size']} (truncated or overwritten)"
            )
    if check_sums:
        for name, expected in files.items():
            target = path / name if path.is_dir() else path.parent / name
            if digest(target)["sha256"] != expected["sha256"]:
                raise DamagedCheckpointError(
                    f"checkpoint {str(path)!r} is damaged: {name} has other bytes than when it was written"
                    " (SHA-256 differs from its manifest)"
                )
    return True


def rank_shards(folder: Path, rank: int) -> Iterable[Path]:
    """The shard files ``torch.distributed.checkpoint`` wrote for ``rank`` into ``folder`` (``__<rank>_*``)."""
    return sorted(folder.glob(f"__{rank}_*"))
