"""Checkpoints of sharded MoE models: save, load with resharding, consolidate.

Two layouts, both written atomically (a half-written checkpoint is never taken for a whole one):

* **Distributed (DCP) folder** (default)::

      ckpt/                       # one folder per checkpoint
        .metadata                 # torch.distributed.checkpoint index: every tensor's global shape + chunks
        __<rank>_0.distcp         # each rank's shards of parameters and optimizer state
        meta.pt                   # everything else: loops, epoch, global step, callbacks, hyper-parameters,
                                  # lr schedulers (written by rank 0 with ``torch.save``)
        .complete                 # marker written last; a folder without it is rejected on load

  Every rank writes into ``<path>.tmp-<uuid>``; after a barrier rank 0 writes ``meta.pt`` and the marker,
  and renames the folder into place. Parameters are saved as DTensors over their *global* shape (experts
  over ``[E, ...]``), so a folder saved on one layout (world size, expert-parallel size, ZeRO stage) loads
  on any other: ``torch.distributed.checkpoint`` reads each rank's new shards from whatever files hold them.
  Optimizer states are keyed by parameter name (``get_optimizer_state_dict``), so they reshard the same way.

* **Full file** (``save_distributed_checkpoint=False``): rank 0 gathers the full, unsharded state
  (``full_state_dict=True, cpu_offload=True``) and writes one ``torch.save`` file through a temporary
  file and ``os.replace``. Same keys as a Lightning checkpoint (``state_dict``, ``optimizer_states``,
  ``loops``, ...); optimizer states are keyed by parameter name, not by index.

:func:`consolidate` (CLI ``python -m lightning_moe.checkpoint consolidate IN_DIR OUT_FILE`` or
``lightning-moe-consolidate IN_DIR OUT_FILE``) turns a folder into one file of plain types that
``torch.load(path, weights_only=True)`` reads without any process group::

    {"state_dict": {name: Tensor}, "optimizer_states": [optimizer state dict, ...], "meta": {...}}

Such a file (or a full file) can also be resumed from: :func:`load_checkpoint` accepts both.

All functions that take a model are collective when a process group is initialised: every rank calls
them with its own shard of the model. Without a process group they run in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "COMPLETE_MARKER",
    "META_FILENAME",
    "CheckpointMismatchError",
    "IncompleteCheckpointError",
    "consolidate",
    "consolidate_main",
    "is_complete_distributed_checkpoint",
    "is_distributed_checkpoint",
    "load_checkpoint",
    "model_state_dict",
    "optimizer_state_dict",
    "save_checkpoint",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File holding everything but the tensors of the model and optimizers (Lightning's name for it).
META_FILENAME = "meta.pt"
#: Empty marker file written last into a distributed checkpoint folder.
COMPLETE_MARKER = ".complete"
_DCP_METADATA = ".metadata"
_MODEL_KEY = "state_dict"
_OPTIMIZERS_KEY = "optimizer_states"
_CONSOLIDATED_META_KEY = "meta"
# In a DCP folder each optimizer is a top-level entry of its own: ``optimizer_0``, ``optimizer_1``, ...
_OPTIMIZER_PREFIX = "optimizer_"
# Checkpoint keys that hold tensors and never go into ``meta.pt``.
_TENSOR_KEYS = (_MODEL_KEY, _OPTIMIZERS_KEY)
_MAX_LISTED = 20


class IncompleteCheckpointError(ValueError):
    """The folder is not a finished checkpoint (no completion marker / no index)."""


class CheckpointMismatchError(ValueError):
    """The checkpoint was saved from a model with other parameter names or shapes."""


# --------------------------------------------------------------------------------------------------
# small process-group helpers (all no-ops without a process group)
# --------------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def _dcp_call() -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``dcp.save`` / ``dcp.load``; silences their single-process warning when no
    process group is initialised (one process is then the intended case, not an accident)."""
    single = not _distributed()
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield {"no_dist": single}


def _all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (one tiny all-reduce)."""
    if not _distributed():
        return ok
    flag = [ok]
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag[0])
    return all(flags)


# --------------------------------------------------------------------------------------------------
# what goes into a checkpoint
# --------------------------------------------------------------------------------------------------


def _state_dict_options(full: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=True)


def model_state_dict(model: nn.Module, *, full: bool) -> dict[str, Any]:
    """The model's state dict for a checkpoint.

    Args:
        model: the (possibly sharded) model.
        full: ``False``: each rank's shards as DTensors over the global shapes (for a DCP folder).
            ``True``: the full tensors on CPU, on rank 0 only (other ranks get an empty dict).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_dict_options(full))


def optimizer_state_dict(model: nn.Module, optimizer: Optimizer, *, full: bool) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter name (so it reshards like the parameters).

    Args:
        model: the model whose parameters ``optimizer`` updates.
        optimizer: a plain torch optimizer (unwrap Lightning's ``LightningOptimizer`` first).
        full: as in :func:`model_state_dict`.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_dict_options(full))


def _split_meta(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Everything in a Lightning checkpoint dict except the model and optimizer tensors.

    Container subclasses (Lightning's ``AttributeDict`` hyper-parameters, named tuples, ...) become plain
    dicts / tuples, so ``meta.pt`` loads with ``torch.load(weights_only=True)`` unless a leaf is a custom
    object.
    """
    return {k: _plain_containers(v) for k, v in checkpoint.items() if k not in _TENSOR_KEYS}


def _plain_containers(obj: Any) -> Any:
    """Replace mapping / sequence subclasses by ``dict`` / ``list`` / ``tuple``; leaves are kept as they are."""
    if isinstance(obj, Mapping):
        return {k: _plain_containers(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain_containers(v) for v in obj)
    if isinstance(obj, list):
        return [_plain_containers(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------


def is_distributed_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a folder written by ``torch.distributed.checkpoint`` (complete or not)."""
    p = Path(path)
    return p.is_dir() and (p / _DCP_METADATA).is_file()


def is_complete_distributed_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a finished distributed checkpoint folder (index, meta and marker present)."""
    p = Path(path)
    return is_distributed_checkpoint(p) and (p / COMPLETE_MARKER).is_file() and (p / META_FILENAME).is_file()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_replaceable(path: Path) -> None:
    """Refuse to overwrite a folder that is not one of our checkpoints (it may hold the user's files)."""
    if path.is_dir() and not is_distributed_checkpoint(path):
        raise IsADirectoryError(
            f"The checkpoint path {str(path)!r} is an existing folder that is not a distributed checkpoint;"
            " refusing to replace it. Choose another path or remove the folder."
        )


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` (file or folder) to ``dst``, replacing an older checkpoint there; ``dst`` is never partial."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
    else:
        old = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex}")
        os.replace(dst, old)
        os.replace(src, dst)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    _fsync_dir(dst.parent)


def save_checkpoint(checkpoint: dict[str, Any], path: PathLike, *, distributed: bool = True) -> None:
    """Write a Lightning checkpoint dict atomically; collective (every rank calls it).

    Args:
        checkpoint: Lightning's checkpoint dict. ``checkpoint["state_dict"]`` and each entry of
            ``checkpoint["optimizer_states"]`` must come from :func:`model_state_dict` /
            :func:`optimizer_state_dict` with ``full=not distributed``. The dict is not modified.
        path: the checkpoint folder (``distributed=True``) or file (``distributed=False``). The same path
            must be passed on every rank (rank 0's is used).
        distributed: ``True``: a DCP folder with each rank's shards. ``False``: one full file written by
            rank 0 (the other ranks' ``checkpoint`` may hold empty state dicts).

    Raises:
        IsADirectoryError: ``path`` is an existing folder that is not a distributed checkpoint.
    """
    path = Path(_broadcast_object(os.fspath(path)))
    # every rank agrees on one temporary name next to the destination
    tmp = path.with_name(f"{path.name}.tmp-{_broadcast_object(uuid.uuid4().hex)}")
    rank = _rank()
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            _check_replaceable(path)
            path.parent.mkdir(parents=True, exist_ok=True)
        except BaseException as e:  # noqa: BLE001 - re-raised below after every rank learnt about it
            error = e
    if not _all_ok(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 could not prepare the checkpoint path {str(path)!r} (see rank 0's error)")

    if distributed:
        _save_distributed(checkpoint, path, tmp, rank)
    else:
        _save_full(checkpoint, path, tmp, rank)


def _save_distributed(checkpoint: dict[str, Any], path: Path, tmp: Path, rank: int) -> None:
    import torch.distributed.checkpoint as dcp

    tensors: dict[str, Any] = {_MODEL_KEY: checkpoint[_MODEL_KEY]}
    for idx, optim_state in enumerate(checkpoint.get(_OPTIMIZERS_KEY, [])):
        tensors[f"{_OPTIMIZER_PREFIX}{idx}"] = optim_state
    meta = _split_meta(checkpoint)
    meta[_OPTIMIZERS_KEY + "_count"] = len(checkpoint.get(_OPTIMIZERS_KEY, []))
    try:
        # collective: gathers the plans, every rank writes its file, rank 0 writes `.metadata`
        with _dcp_call() as kwargs:
            dcp.save(tensors, checkpoint_id=tmp, **kwargs)
        if rank == 0:
            torch.save(meta, tmp / META_FILENAME)
            _fsync_file(tmp / META_FILENAME)
            (tmp / COMPLETE_MARKER).write_text("complete\n")
            _fsync_file(tmp / COMPLETE_MARKER)
            _fsync_dir(tmp)
        _barrier()
        if rank == 0:
            _replace(tmp, path)
        _barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_full(checkpoint: dict[str, Any], path: Path, tmp: Path, rank: int) -> None:
    try:
        if rank == 0:
            payload = _split_meta(checkpoint)  # plain containers, like meta.pt
            payload.update({k: checkpoint[k] for k in _TENSOR_KEYS if k in checkpoint})
            torch.save(payload, tmp)
            _fsync_file(tmp)
            _replace(tmp, path)
        _barrier()
    except BaseException:
        if rank == 0:
            tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# validation against the model
# --------------------------------------------------------------------------------------------------


def _list(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return shown + more


def _check_model_keys(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    strict: bool,
    path: Path,
) -> None:
    """Raise :class:`CheckpointMismatchError` listing missing/unexpected keys and shape mismatches.

    Args:
        expected: parameter/buffer name -> global shape, from the model.
        found: name -> global shape, from the checkpoint.
        strict: whether missing and unexpected keys are errors (shape mismatches always are).
    """
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    shapes = sorted(
        f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    if shapes:
        problems.append(f"shape mismatch for {len(shapes)} key(s): {_list(shapes)}")
    if strict and missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): {_list(missing)}")
    if strict and unexpected:
        problems.append(f"not in the model ({len(unexpected)}): {_list(unexpected)}")
    if problems:
        hint = "" if not strict or shapes else " (set `LightningModule.strict_loading = False` to skip missing keys)"
        raise CheckpointMismatchError(
            f"The checkpoint {str(path)!r} does not match the model: " + "; ".join(problems) + hint + "."
        )


def _global_shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of the tensors of a (possibly sharded) state dict (DTensor.shape is global)."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, Tensor)}


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _load_meta(path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - the unpickler raises several types
        if weights_only is False:
            raise
        raise ValueError(
            f"Could not read {str(path)!r} with `weights_only=True`: it holds objects other than plain types"
            f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). If you trust this checkpoint, pass"
            " `weights_only=False` (e.g. `Trainer.fit(..., ckpt_path=..., weights_only=False)`)."
        ) from e


def _require_complete(path: Path) -> None:
    if not (path / _DCP_METADATA).is_file():
        raise IncompleteCheckpointError(
            f"{str(path)!r} is a folder without a `{_DCP_METADATA}` index, so it is not a distributed checkpoint"
            " (or its writing was interrupted). Pass a checkpoint folder or a full checkpoint file."
        )
    if not (path / COMPLETE_MARKER).is_file() or not (path / META_FILENAME).is_file():
        raise IncompleteCheckpointError(
            f"The checkpoint folder {str(path)!r} is incomplete: it has no `{COMPLETE_MARKER}` marker"
            f" (or no `{META_FILENAME}`), so its writing was interrupted. Resume from an earlier checkpoint."
        )


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


def _load_distributed(
    path: Path,
    model: nn.Module,
    optimizers: Sequence[Optimizer],
    *,
    strict: bool,
    weights_only: Optional[bool],
) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    _require_complete(path)
    metadata = dcp.FileSystemReader(path).read_metadata()

    model_state = get_model_state_dict(model)
    found = _dcp_shapes(metadata, _MODEL_KEY)
    _check_model_keys(_global_shapes(model_state), found, strict=strict, path=path)
    if not strict:  # load only what the checkpoint has
        model_state = {k: v for k, v in model_state.items() if k in found or not isinstance(v, Tensor)}
    box: dict[str, Any] = {_MODEL_KEY: model_state}
    with _dcp_call() as kwargs:
        dcp.load(box, checkpoint_id=path, **kwargs)
    set_model_state_dict(model, box[_MODEL_KEY], options=StateDictOptions(strict=strict))

    meta = _load_meta(path / META_FILENAME, weights_only)
    saved_optimizers = int(meta.pop(_OPTIMIZERS_KEY + "_count", 0))
    if optimizers and saved_optimizers:
        if saved_optimizers != len(optimizers):
            raise CheckpointMismatchError(
                f"The checkpoint {str(path)!r} holds the state of {saved_optimizers} optimizer(s) but"
                f" `configure_optimizers` returned {len(optimizers)}."
            )
        top_level = _dcp_top_level_keys(metadata)
        for idx, optimizer in enumerate(optimizers):
            key = f"{_OPTIMIZER_PREFIX}{idx}"
            if key not in top_level:
                raise CheckpointMismatchError(f"The checkpoint {str(path)!r} has no state for optimizer {idx}.")
            optim_state = get_optimizer_state_dict(model, optimizer)
            expected = _flat_tensor_keys(optim_state.get("state", {}), f"{key}.state")
            saved = set(metadata.state_dict_metadata)
            missing = sorted(k for k in expected if k not in saved)
            if missing:
                raise CheckpointMismatchError(
                    f"The checkpoint {str(path)!r} lacks optimizer state entries the current optimizer {idx}"
                    f" ({type(optimizer).__name__}) needs ({len(missing)}): {_list(missing)}. Was it saved with"
                    " another optimizer type or other parameters?"
                )
            box = {key: optim_state}
            with _dcp_call() as kwargs:
                dcp.load(box, checkpoint_id=path, **kwargs)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=box[key])
    if saved_optimizers:
        # Lightning's own optimizer restore is off for this strategy; keep the key so the connector knows
        # the checkpoint was not weights-only.
        meta[_OPTIMIZERS_KEY] = [{} for _ in range(saved_optimizers)]
    return meta


def _load_full(
    path: Path,
    model: nn.Module,
    optimizers: Sequence[Optimizer],
    *,
    strict: bool,
    weights_only: Optional[bool],
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # every rank maps the file (no copy per rank) and takes its own shards
    try:
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001
        if weights_only is False:
            raise
        raise ValueError(
            f"Could not read {str(path)!r} with `weights_only=True` ({type(e).__name__}). If you trust this"
            " checkpoint, pass `weights_only=False` (e.g. `Trainer.fit(..., weights_only=False)`)."
        ) from e
    if not isinstance(checkpoint, Mapping) or _MODEL_KEY not in checkpoint:
        raise ValueError(
            f"{str(path)!r} is not a checkpoint: expected a dict with a {_MODEL_KEY!r} key, got"
            f" {type(checkpoint).__name__} with keys {sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else '-'}."
        )
    checkpoint = dict(checkpoint)
    if isinstance(checkpoint.get(_CONSOLIDATED_META_KEY), Mapping):  # a consolidated file: meta nested
        checkpoint.update(checkpoint.pop(_CONSOLIDATED_META_KEY))
    full_model = checkpoint.pop(_MODEL_KEY)
    _check_model_keys(_global_shapes(get_model_state_dict(model)), _global_shapes(full_model), strict=strict, path=path)
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, full_model, options=options)

    optimizer_states = checkpoint.get(_OPTIMIZERS_KEY) or []
    if optimizers and optimizer_states:
        if len(optimizer_states) != len(optimizers):
            raise CheckpointMismatchError(
                f"The checkpoint {str(path)!r} holds the state of {len(optimizer_states)} optimizer(s) but"
                f" `configure_optimizers` returned {len(optimizers)}."
            )
        for optimizer, state in zip(optimizers, optimizer_states):
            state = _rekey_by_name_if_needed(state, model)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)
    if optimizer_states:
        checkpoint[_OPTIMIZERS_KEY] = [{} for _ in optimizer_states]
    return checkpoint


def _rekey_by_name_if_needed(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Accept optimizer states keyed by index (plain ``optimizer.state_dict()``) by renaming them to FQNs."""
    keys = list(state.get("state", {}).keys())
    if not keys or not isinstance(keys[0], int):
        return state
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    rename = dict(enumerate(names))
    return {
        "state": {rename[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [rename[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizers: Sequence[Optimizer] = (),
    *,
    strict: bool = True,
    weights_only: Optional[bool] = None,
) -> dict[str, Any]:
    """Load a checkpoint into a (sharded) model and its optimizers, resharding as needed; collective.

    Args:
        path: a distributed checkpoint folder, a full checkpoint file or a consolidated file.
        model: the model, already parallelised (its parameters may be DTensors on any mesh).
        optimizers: the optimizers to restore (plain torch optimizers, in ``configure_optimizers`` order);
            empty to load the weights only. Ignored when the checkpoint holds no optimizer state.
        strict: whether parameter names must match exactly (shapes must match regardless).
        weights_only: passed to ``torch.load`` for ``meta.pt`` / the full file (``None``: torch's default).

    Returns:
        The rest of the checkpoint (loops, epoch, global step, callbacks, hyper-parameters, lr schedulers, ...).
        ``"optimizer_states"`` holds one empty placeholder per saved optimizer (their tensors went straight
        into ``optimizers``); ``"state_dict"`` is absent (it went into ``model``).

    Raises:
        FileNotFoundError: nothing at ``path``.
        IncompleteCheckpointError: a folder whose writing did not finish.
        CheckpointMismatchError: names or shapes differ from the model's (the message lists them).
    """
    path = Path(path)
    if path.is_dir():
        return _load_distributed(path, model, optimizers, strict=strict, weights_only=weights_only)
    if path.is_file():
        return _load_full(path, model, optimizers, strict=strict, weights_only=weights_only)
    raise FileNotFoundError(f"No checkpoint at {str(path)!r}: expected a checkpoint folder or file.")


# --------------------------------------------------------------------------------------------------
# consolidation (offline, no process group)
# --------------------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    """Recursively turn ``obj`` into types that ``torch.load(weights_only=True)`` accepts.

    Mappings become dicts, lists/tuples stay lists/tuples, tensors are kept (on CPU), enums become
    their value, paths and every other object become their ``str``.
    """
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, enum.Enum):
        return _to_plain(obj.value)
    if isinstance(obj, Mapping):
        return {(_to_plain(k) if isinstance(k, (bool, int, float, str)) else str(k)): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_plain(v) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    return str(obj)


def consolidate(in_dir: PathLike, out_file: PathLike, *, trust_meta: bool = False) -> dict[str, Any]:
    """Gather a distributed checkpoint folder into one file loadable with ``torch.load(weights_only=True)``.

    Runs in one process, without a process group and without the model's code.

    Args:
        in_dir: a complete distributed checkpoint folder.
        out_file: the file to write (atomically; an existing file is replaced).
        trust_meta: read ``meta.pt`` with full unpickling (``weights_only=False``). Needed only when the
            hyper-parameters hold custom objects; those are written out as their ``str``.

    Returns:
        The consolidated dict: ``{"state_dict": {name: Tensor}, "optimizer_states": [...], "meta": {...}}``.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src = Path(in_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"in_dir={str(src)!r} is not a folder; pass a distributed checkpoint folder.")
    _require_complete(src)
    dst = Path(out_file)
    if dst.is_dir():
        raise IsADirectoryError(f"out_file={str(dst)!r} is a folder; pass a file path.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    raw_file = dst.with_name(f"{dst.name}.raw-{uuid.uuid4().hex}")
    tmp = dst.with_name(f"{dst.name}.tmp-{uuid.uuid4().hex}")
    try:
        dcp_to_torch_save(src, raw_file)  # every tensor gathered to its full, global shape
        raw = torch.load(raw_file, map_location="cpu", weights_only=True, mmap=True)
        meta = _load_meta(src / META_FILENAME, weights_only=not trust_meta)
        count = int(meta.pop(_OPTIMIZERS_KEY + "_count", 0))
        out: dict[str, Any] = {
            _MODEL_KEY: {k: v for k, v in raw[_MODEL_KEY].items()},
            _OPTIMIZERS_KEY: [_to_plain(raw[f"{_OPTIMIZER_PREFIX}{i}"]) for i in range(count)],
            _CONSOLIDATED_META_KEY: _to_plain(meta),
        }
        torch.save(out, tmp)
        _fsync_file(tmp)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
        return out
    finally:
        raw_file.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def consolidate_main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point: ``lightning-moe-consolidate [consolidate] IN_DIR OUT_FILE [--trust-meta]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "consolidate":
        args = args[1:]
    parser = argparse.ArgumentParser(
        prog="lightning-moe-consolidate",
        usage="%(prog)s [consolidate] IN_DIR OUT_FILE [--trust-meta]",
        description="Turn a distributed (DCP) checkpoint folder into one file that "
        "`torch.load(path, weights_only=True)` reads.",
    )
    parser.add_argument("in_dir", help="distributed checkpoint folder (with .metadata, meta.pt and .complete)")
    parser.add_argument("out_file", help="file to write")
    parser.add_argument(
        "--trust-meta",
        action="store_true",
        help="unpickle meta.pt fully (only for checkpoints you trust whose hyper-parameters hold custom objects)",
    )
    ns = parser.parse_args(args)
    try:
        out = consolidate(ns.in_dir, ns.out_file, trust_meta=ns.trust_meta)
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_params = sum(v.numel() for v in out[_MODEL_KEY].values() if isinstance(v, Tensor))
    print(
        f"wrote {ns.out_file}: {len(out[_MODEL_KEY])} tensors ({n_params:,} elements),"
        f" {len(out[_OPTIMIZERS_KEY])} optimizer state(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(consolidate_main())
