"""Full checkpoint files: rank 0 writes the gathered, unsharded state in one ``torch.save`` file.

Same keys as a Lightning checkpoint (``state_dict``, ``optimizer_states``, ``loops``, ...); optimizer states
are keyed by parameter name, not by index. Files written by ``consolidate`` before it wrote this layout
nest everything but the tensors under ``"meta"``; they are read the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_moe.checkpoint import collective
from lightning_moe.checkpoint.files import CheckpointWriteError, atomic_save, read_torch_file
from lightning_moe.checkpoint.state import (
    MODEL_KEY,
    OPTIMIZERS_KEY,
    TENSOR_KEYS,
    CheckpointMismatchError,
    check_model_keys,
    global_shapes,
    split_meta,
)

__all__ = ["LEGACY_META_KEY", "load_full", "read_full", "save_full"]

#: Key under which older consolidated files nest everything but the tensors.
LEGACY_META_KEY = "meta"


def save_full(checkpoint: dict[str, Any], path: Path) -> None:
    """Rank 0 writes ``checkpoint`` (full state dicts) atomically to the file ``path``; collective."""
    error: BaseException | None = None
    if collective.rank() == 0:
        payload = split_meta(checkpoint)  # plain containers, like meta.pt
        payload.update({k: checkpoint[k] for k in TENSOR_KEYS if k in checkpoint})
        try:
            atomic_save(payload, path, manifest=True)
        except Exception as err:  # noqa: BLE001 - re-raised below after every rank learnt about it
            error = err
    if not collective.all_ok(error is None):
        if error is not None:
            raise error
        raise CheckpointWriteError(None, f"rank 0 could not write the checkpoint {str(path)!r} (see rank 0's error)")


def read_full(path: Path, *, weights_only: bool | None, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file as one flat dict with a ``"state_dict"`` key (older consolidated files unnested)."""
    checkpoint = read_torch_file(path, weights_only, mmap=mmap)
    if not isinstance(checkpoint, Mapping) or MODEL_KEY not in checkpoint:
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else "-"
        raise ValueError(
            f"{str(path)!r} is not a checkpoint: expected a dict with a {MODEL_KEY!r} key, got"
            f" {type(checkpoint).__name__} with keys {keys}."
        )
    checkpoint = dict(checkpoint)
    if isinstance(checkpoint.get(LEGACY_META_KEY), Mapping):
        checkpoint.update(checkpoint.pop(LEGACY_META_KEY))
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


def load_full(
    path: Path,
    model: nn.Module,
    optimizers: Sequence[Optimizer],
    *,
    strict: bool,
    weights_only: bool | None,
) -> dict[str, Any]:
    """Load a file into ``model`` and ``optimizers`` (see :func:`lightning_moe.checkpoint.load_checkpoint`)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # every rank maps the file (no copy per rank) and takes its own shards
    checkpoint = read_full(path, weights_only=weights_only, mmap=True)
    full_model = checkpoint.pop(MODEL_KEY)
    check_model_keys(global_shapes(get_model_state_dict(model)), global_shapes(full_model), strict=strict, path=path)
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, full_model, options=options)

    optimizer_states = checkpoint.get(OPTIMIZERS_KEY) or []
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
        checkpoint[OPTIMIZERS_KEY] = [{} for _ in optimizer_states]
    return checkpoint
