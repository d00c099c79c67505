"""Distributed (DCP) checkpoint folders: each rank writes its shards; loading reshards onto any layout.

Parameters are saved as DTensors over their *global* shape (experts over ``[E, ...]``), so a folder saved
on one layout (world size, expert-parallel size, ZeRO stage) loads on any other:
``torch.distributed.checkpoint`` reads each rank's new shards from whatever files hold them. Optimizer
states are keyed by parameter name, so they reshard the same way.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_moe.checkpoint import collective
from lightning_moe.checkpoint.files import (
    COMPLETE_MARKER,
    DCP_METADATA,
    META_FILENAME,
    CheckpointWriteError,
    fsync_dir,
    fsync_file,
    read_torch_file,
    replace_path,
    require_complete,
    temporary_sibling,
    write_torch_file,
)
from lightning_moe.checkpoint.manifest import FOLDER_MANIFEST, digest, rank_shards, write_manifest
from lightning_moe.checkpoint.state import (
    MODEL_KEY,
    OPTIMIZERS_KEY,
    CheckpointMismatchError,
    check_model_keys,
    global_shapes,
    listed,
    split_meta,
)

__all__ = ["OPTIMIZER_PREFIX", "OPTIMIZERS_COUNT_KEY", "load_distributed", "read_distributed_full", "save_distributed"]

#: In a folder each optimizer is a top-level entry of its own: ``optimizer_0``, ``optimizer_1``, ...
OPTIMIZER_PREFIX = "optimizer_"
#: Key of ``meta.pt`` holding how many optimizers the folder has state for.
OPTIMIZERS_COUNT_KEY = OPTIMIZERS_KEY + "_count"


def save_distributed(checkpoint: dict[str, Any], path: Path, tmp: Path) -> None:
    """Write ``checkpoint`` as a folder: every rank into ``tmp``, then rank 0 adds the meta and the marker
    and renames ``tmp`` to ``path``; collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    rank = collective.rank()
    tensors: dict[str, Any] = {MODEL_KEY: checkpoint[MODEL_KEY]}
    for idx, optim_state in enumerate(checkpoint.get(OPTIMIZERS_KEY, [])):
        tensors[f"{OPTIMIZER_PREFIX}{idx}"] = optim_state
    meta = split_meta(checkpoint)
    meta[OPTIMIZERS_COUNT_KEY] = len(checkpoint.get(OPTIMIZERS_KEY, []))
    try:
        # collective: gathers the plans, every rank writes its file, rank 0 writes `.metadata`
        try:
            with collective.dcp_call() as kwargs:
                dcp.save(tensors, checkpoint_id=tmp, **kwargs)
            # each rank hashes the shards it wrote (in parallel); rank 0 lists them all in the manifest
            own = {p.name: digest(p) for p in rank_shards(tmp, rank)}
        except (OSError, RuntimeError, CheckpointException) as err:  # DCP wraps a rank's failed write
            own, error = None, CheckpointWriteError.wrap(err, path)
        else:
            error = None
        gathered = collective.gather_objects(own)
        if any(entries is None for entries in gathered):
            if error is not None:
                raise error
            raise CheckpointWriteError(
                None, f"another rank could not write its shards of {str(path)!r} (see its error)"
            )
        if rank == 0:
            try:
                entries = {name: d for rank_entries in gathered for name, d in rank_entries.items()}
                write_torch_file(meta, tmp / META_FILENAME)
                for name in (DCP_METADATA, META_FILENAME):
                    entries[name] = digest(tmp / name)
                write_manifest(tmp / FOLDER_MANIFEST, entries)
                (tmp / COMPLETE_MARKER).write_text("complete\n")
                fsync_file(tmp / COMPLETE_MARKER)
                fsync_dir(tmp)
            except (OSError, RuntimeError) as err:
                error = CheckpointWriteError.wrap(err, path)
        if not collective.all_ok(error is None):
            if error is not None:
                raise error
            raise CheckpointWriteError(None, f"rank 0 could not finish the checkpoint {str(path)!r} (see its error)")
        if rank == 0:
            replace_path(tmp, path)
        collective.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dcp_shapes(metadata: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of the tensors saved under the top-level key ``prefix`` of a DCP index."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    planner_data = getattr(metadata, "planner_data", None) or {}
    out: dict[str, tuple[int, ...]] = {}
    for flat_key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        fqn_path = planner_data.get(flat_key)
        if fqn_path is not None:
            if len(fqn_path) < 2 or fqn_path[0] != prefix:
                continue
            name = ".".join(str(p) for p in fqn_path[1:])
        elif flat_key.startswith(prefix + "."):
            name = flat_key[len(prefix) + 1 :]
        else:
            continue
        out[name] = tuple(md.size)
    return out


def _dcp_top_level_keys(metadata: Any) -> set[str]:
    planner_data = getattr(metadata, "planner_data", None) or {}
    keys = set()
    for flat_key in metadata.state_dict_metadata:
        fqn_path = planner_data.get(flat_key)
        keys.add(str(fqn_path[0]) if fqn_path else flat_key.split(".", 1)[0])
    return keys


def _flat_tensor_keys(obj: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    """Flatten the tensors of a nested dict the way DCP names them (path joined with dots)."""
    out: dict[str, tuple[int, ...]] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flat_tensor_keys(v, f"{prefix}.{k}"))
    elif isinstance(obj, Tensor):
        out[prefix] = tuple(obj.shape)
    return out


def load_distributed(
    path: Path,
    model: nn.Module,
    optimizers: Sequence[Optimizer],
    *,
    strict: bool,
    weights_only: bool | None,
) -> dict[str, Any]:
    """Load a folder into ``model`` and ``optimizers`` (see :func:`lightning_moe.checkpoint.load_checkpoint`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    require_complete(path)
    metadata = dcp.FileSystemReader(path).read_metadata()

    model_state = get_model_state_dict(model)
    found = _dcp_shapes(metadata, MODEL_KEY)
    check_model_keys(global_shapes(model_state), found, strict=strict, path=path)
    if not strict:  # load only what the checkpoint has
        model_state = {k: v for k, v in model_state.items() if k in found or not isinstance(v, Tensor)}
    box: dict[str, Any] = {MODEL_KEY: model_state}
    with collective.dcp_call() as kwargs:
        dcp.load(box, checkpoint_id=path, **kwargs)
    set_model_state_dict(model, box[MODEL_KEY], options=StateDictOptions(strict=strict))

    meta = read_torch_file(path / META_FILENAME, weights_only)
    saved_optimizers = int(meta.pop(OPTIMIZERS_COUNT_KEY, 0))
    if optimizers and saved_optimizers:
        if saved_optimizers != len(optimizers):
            raise CheckpointMismatchError(
                f"The checkpoint {str(path)!r} holds the state of {saved_optimizers} optimizer(s) but"
                f" `configure_optimizers` returned {len(optimizers)}."
            )
        top_level = _dcp_top_level_keys(metadata)
        for idx, optimizer in enumerate(optimizers):
            key = f"{OPTIMIZER_PREFIX}{idx}"
            if key not in top_level:
                raise CheckpointMismatchError(f"The checkpoint {str(path)!r} has no state for optimizer {idx}.")
            optim_state = get_optimizer_state_dict(model, optimizer)
            expected = _flat_tensor_keys(optim_state.get("state", {}), f"{key}.state")
            saved = set(metadata.state_dict_metadata)
            missing = sorted(k for k in expected if k not in saved)
            if missing:
                raise CheckpointMismatchError(
                    f"The checkpoint {str(path)!r} lacks optimizer state entries the current optimizer {idx}"
                    f" ({type(optimizer).__name__}) needs ({len(missing)}): {listed(missing)}. Was it saved with"
                    " another optimizer type or other parameters?"
                )
            box = {key: optim_state}
            with collective.dcp_call() as kwargs:
                dcp.load(box, checkpoint_id=path, **kwargs)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=box[key])
    if saved_optimizers:
        # Lightning's own optimizer restore is off for this strategy; keep the key so the connector knows
        # the checkpoint was not weights-only.
        meta[OPTIMIZERS_KEY] = [{} for _ in range(saved_optimizers)]
    return meta


def read_distributed_full(path: Path, scratch_dir: Path, *, weights_only: bool | None) -> dict[str, Any]:
    """Every tensor of a folder gathered to its full shape, in one process and without the model's code.

    Returns the layout of a full file: ``{"state_dict": {...}, "optimizer_states": [...], **meta}``.

    Args:
        path: a complete folder.
        scratch_dir: where the gathered tensors are staged (a temporary file, removed before returning).
        weights_only: passed to ``torch.load`` for ``meta.pt``.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    require_complete(path)
    meta = read_torch_file(path / META_FILENAME, weights_only)
    count = int(meta.pop(OPTIMIZERS_COUNT_KEY, 0))
    raw_file = temporary_sibling(scratch_dir / path.name, "raw")
    try:
        dcp_to_torch_save(path, raw_file)
        # mapped, not read: the tensors stay on disk until written out again
        raw = torch.load(raw_file, map_location="cpu", weights_only=True, mmap=True)
    finally:
        raw_file.unlink(missing_ok=True)
    return {
        **meta,
        MODEL_KEY: raw[MODEL_KEY],
        OPTIMIZERS_KEY: [raw[f"{OPTIMIZER_PREFIX}{i}"] for i in range(count)],
    }
