"""The one ordered place where a model becomes parallel.

Order matters: tensor parallelism first splits the dense layers over ``tp`` (DTensors over ``tp``), expert
parallelism turns the expert weights into ``ep``-sharded DTensors and gives each MoE layer the all-to-all
token dispatcher (transformers MoE experts likewise, through their experts implementation:
``hf_moe.py``), the expert token split (``tp > 1``) wraps that dispatcher so that each ``tp`` rank
dispatches only its share of the rows, the MoE layers with a global balance loss get their statistics summed
over ``dp``, activation
checkpointing wraps blocks (FQNs unchanged), the CPU experts stop keeping full-size gradient memory under
ZeRO-2/3, and FSDP then shards whatever is there, bottom-up, over the
data-parallel axes (``dp`` for dense weights: FSDP2 over a 1-D submesh of TP DTensors is the standard 2-D
FSDP + TP composition; ``efsdp`` or ``efsdp x tp`` for experts).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from lightning_moe.parallel.balancing import apply_global_balance
from lightning_moe.parallel.dims import ParallelDims, submesh
from lightning_moe.parallel.discovery import expert_counts, find_blocks, find_moe_layers
from lightning_moe.parallel.expert_parallel import apply_expert_parallel
from lightning_moe.parallel.fsdp import apply_fsdp, is_data_parallel
from lightning_moe.parallel.hf_moe import (
    apply_hf_expert_parallel,
    disable_kv_cache,
    find_hf_experts,
    warn_unrecognised_moe_modules,
)
from lightning_moe.parallel.tensor_parallel import apply_expert_token_split, apply_tensor_parallel

__all__ = [
    "parallelize",
    "apply_activation_checkpointing",
    "apply_gradient_memory",
    "is_parallelized",
    "check_not_parallelized",
]


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every block's activations in backward (non-reentrant ``torch.utils.checkpoint``).

    Uses the composable ``checkpoint`` (hooks on the block), so parameter names do not change.
    Blocks are the direct children of the model's ``nn.ModuleList`` s; nested blocks inside a
    checkpointed block are not checkpointed again. transformers models get ``config.use_cache = False``
    (:func:`lightning_moe.parallel.hf_moe.disable_kv_cache`: a recomputed layer would fill the cache twice).
    """
    disable_kv_cache(model)
    from torch.distributed._composable import checkpoint

    covered: set[int] = set()  # modules inside an already checkpointed block
    for _, block in find_blocks(model):  # parents come before the blocks nested in them
        if id(block) in covered:
            continue
        checkpoint(block)
        covered |= {id(m) for m in block.modules()}
    return model


def apply_gradient_memory(model: nn.Module, zero_stage: int) -> nn.Module:
    """Let the MoE layers keep their experts' weight-gradient memory between steps only where gradients are not
    sharded: under ZeRO-2/3 the full-size gradients should exist only until they are reduce-scattered."""
    for _, layer in find_moe_layers(model):
        layer.keep_gradient_memory(zero_stage < 2)
    return model


def is_parallelized(model: nn.Module) -> bool:
    """Whether ``model`` is already data parallel or holds DTensor parameters (sharded by someone)."""
    from torch.distributed.tensor import DTensor

    return any(is_data_parallel(m) for m in model.modules()) or any(isinstance(p, DTensor) for p in model.parameters())


def check_not_parallelized(model: nn.Module, owner: str) -> None:
    """Refuse a model that was sharded before ``owner`` (a strategy) could apply its own layout."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            f"Found modules wrapped in FSDP1 (`FullyShardedDataParallel`); `{owner}` shards the model itself"
            " with FSDP2. Build the plain model in `__init__` or `configure_model`."
        )
    if is_parallelized(model):
        raise TypeError(
            f"The model is already sharded (`fully_shard` or DTensor parameters found). `{owner}` applies expert"
            " parallelism and ZeRO itself: only build the model in `__init__` or `configure_model`."
        )


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    dims: ParallelDims,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Make ``model`` parallel in place: tensor parallelism, expert parallelism, global balance statistics,
    activation checkpointing, gradient memory, ZeRO (FSDP2).

    Args:
        model: a model containing :class:`lightning_moe.moe.MoE` layers and/or transformers MoE models
            (or neither).
        mesh: from ``dims.build_mesh(device_type)``.
        dims: resolved parallel dims (``dims.resolve(expert_counts(model))``), checked here against the
            model's expert counts.
        mp_policy: FSDP2 mixed precision (see :func:`lightning_moe.parallel.fsdp.mixed_precision_policy`).
        activation_checkpointing: recompute each block in backward.

    Returns:
        ``model``.
    """
    if not dims.is_resolved:
        raise ValueError(
            "parallelize needs resolved dims (expert_parallel_size is 'auto'); pass"
            " dims.resolve(expert_counts(model)) and a mesh built from it"
        )
    dims.resolve(expert_counts(model))  # resolved dims: only checks every layer's expert count
    if tuple(mesh.mesh_dim_names or ()) != ("efsdp", "ep", "tp") or tuple(mesh.shape) != (dims.efsdp, dims.ep, dims.tp):
        raise ValueError(
            f"mesh {tuple(mesh.mesh_dim_names or ())} of shape {tuple(mesh.shape)} does not match dims "
            f"(efsdp={dims.efsdp}, ep={dims.ep}, tp={dims.tp}); build it with dims.build_mesh(device_type)"
        )
    if dims.tp > 1 and find_hf_experts(model):
        raise ValueError(
            f"tensor_parallel_size={dims.tp} is not supported for Hugging Face transformers MoE models; "
            "use tensor_parallel_size=1 (expert parallelism and ZeRO work)"
        )
    warn_unrecognised_moe_modules(model)
    tp_mesh = submesh(mesh, "tp")
    apply_tensor_parallel(model, tp_mesh)
    apply_expert_parallel(model, submesh(mesh, "ep"))
    apply_hf_expert_parallel(model, submesh(mesh, "ep"))
    apply_expert_token_split(model, tp_mesh)
    apply_global_balance(model, submesh(mesh, "dp"))
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_gradient_memory(model, dims.zero_stage)
    apply_fsdp(model, mesh, dims, mp_policy=mp_policy)
    return model
