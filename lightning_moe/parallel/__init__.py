"""Parallel engine: mesh dims, tensor and expert parallelism, ZeRO via FSDP2, CPU offload, clipping.

``torch.distributed`` lives here and nowhere in the model code; no Lightning imports.
See docs/INTERFACES.md ("Parallel code") for the contract.
"""

from lightning_moe.parallel.balancing import DataParallelBalanceStatistics, apply_global_balance, update_router_biases
from lightning_moe.parallel.clip import clip_grad_norm_, clip_grad_value_, grad_norm
from lightning_moe.parallel.dims import MESH_DIM_NAMES, ParallelDims, mesh_groups, submesh
from lightning_moe.parallel.discovery import expert_counts, find_blocks, find_moe_layers
from lightning_moe.parallel.expert_parallel import AllToAllTokenDispatcher, apply_expert_parallel, is_expert_parallel
from lightning_moe.parallel.fsdp import apply_fsdp, mixed_precision_policy, no_gradient_sync
from lightning_moe.parallel.local import local_shard
from lightning_moe.parallel.offload import CPUOffloadAdamW, offload_optimizer
from lightning_moe.parallel.optim import use_whole_list_update
from lightning_moe.parallel.parallelize import apply_activation_checkpointing, is_parallelized, parallelize
from lightning_moe.parallel.tensor_parallel import TokenSplitDispatcher, apply_expert_token_split, apply_tensor_parallel

__all__ = [
    "ParallelDims",
    "MESH_DIM_NAMES",
    "submesh",
    "mesh_groups",
    "parallelize",
    "is_parallelized",
    "AllToAllTokenDispatcher",
    "TokenSplitDispatcher",
    "apply_expert_parallel",
    "apply_tensor_parallel",
    "apply_expert_token_split",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "is_expert_parallel",
    "mixed_precision_policy",
    "no_gradient_sync",
    "clip_grad_norm_",
    "clip_grad_value_",
    "grad_norm",
    "CPUOffloadAdamW",
    "offload_optimizer",
    "use_whole_list_update",
    "local_shard",
    "expert_counts",
    "find_blocks",
    "find_moe_layers",
    "DataParallelBalanceStatistics",
    "apply_global_balance",
    "update_router_biases",
]
