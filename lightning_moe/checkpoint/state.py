"""What goes into a checkpoint: state dicts keyed by name, plain-type metadata, and checks against a model."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "MODEL_KEY",
    "OPTIMIZERS_KEY",
    "CheckpointMismatchError",
    "check_model_keys",
    "global_shapes",
    "listed",
    "model_state_dict",
    "optimizer_state_dict",
    "split_meta",
    "to_plain",
]

#: Lightning's checkpoint keys of the model and optimizer tensors (never stored in ``meta.pt``).
MODEL_KEY = "state_dict"
OPTIMIZERS_KEY = "optimizer_states"
TENSOR_KEYS = (MODEL_KEY, OPTIMIZERS_KEY)
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """The checkpoint was saved from a model with other parameter names or shapes."""


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


def split_meta(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Everything in a Lightning checkpoint dict except the model and optimizer tensors.

    Container subclasses (Lightning's ``AttributeDict`` hyper-parameters, named tuples, ...) become plain
    dicts / tuples, so ``meta.pt`` loads with ``torch.load(weights_only=True)`` unless a leaf is a custom
    object.
    """
    return {k: _plain_containers(v) for k, v in checkpoint.items() if k not in TENSOR_KEYS}


def _plain_containers(obj: Any) -> Any:
    """Replace mapping / sequence subclasses by ``dict`` / ``list`` / ``tuple``; leaves are kept as they are."""
    if isinstance(obj, Mapping):
        return {k: _plain_containers(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain_containers(v) for v in obj)
    if isinstance(obj, list):
        return [_plain_containers(v) for v in obj]
    return obj


def to_plain(obj: Any) -> Any:
    """Recursively turn ``obj`` into types that ``torch.load(weights_only=True)`` accepts.

    Unlike :func:`split_meta` this is lossy: mappings become dicts, lists/tuples stay lists/tuples,
    tensors are kept (on CPU), enums become their value, paths and every other object become their ``str``.
    """
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value)
    if isinstance(obj, Mapping):
        return {
            (to_plain(k) if isinstance(k, (bool, int, float, str)) else str(k)): to_plain(v) for k, v in obj.items()
        }
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    return str(obj)


def listed(items: Sequence[str]) -> str:
    """``items`` joined for an error message, at most the first 20."""
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return shown + more


def global_shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of the tensors of a (possibly sharded) state dict (DTensor.shape is global)."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, Tensor)}


def check_model_keys(
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
        path: the checkpoint, named in the message.
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
        problems.append(f"shape mismatch for {len(shapes)} key(s): {listed(shapes)}")
    if strict and missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): {listed(missing)}")
    if strict and unexpected:
        problems.append(f"not in the model ({len(unexpected)}): {listed(unexpected)}")
    if problems:
        hint = "" if not strict or shapes else " (set `LightningModule.strict_loading = False` to skip missing keys)"
        raise CheckpointMismatchError(
            f"The checkpoint {str(path)!r} does not match the model: " + "; ".join(problems) + hint + "."
        )
