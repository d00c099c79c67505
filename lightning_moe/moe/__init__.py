"""The Mixture-of-Experts layer. Plain tensor code: no torch.distributed, no Lightning."""

from lightning_moe.moe.balance import AUX_LOSS_SCOPES, BalanceStatistics
from lightning_moe.moe.dispatch import DispatchPlan, compute_capacity, plan_dispatch
from lightning_moe.moe.experts import (
    GroupedFFNExperts,
    GroupedGLUExperts,
    ReplicatedExperts,
    grouped_mm,
    local_tensor,
)
from lightning_moe.moe.layer import DROP_POLICIES, MoE, MoEOutput, MoEStats, dropless_routing, find_moe_layers
from lightning_moe.moe.router import SCORE_FUNCS, TopKRouter
from lightning_moe.moe.token_dispatcher import TokenDispatcher

__all__ = [
    "MoE",
    "MoEOutput",
    "MoEStats",
    "TopKRouter",
    "TokenDispatcher",
    "find_moe_layers",
    "dropless_routing",
    "GroupedFFNExperts",
    "GroupedGLUExperts",
    "ReplicatedExperts",
    "grouped_mm",
    "local_tensor",
    "DispatchPlan",
    "compute_capacity",
    "plan_dispatch",
    "BalanceStatistics",
    "AUX_LOSS_SCOPES",
    "DROP_POLICIES",
    "SCORE_FUNCS",
]
