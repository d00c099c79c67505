"""Load balancing across ranks: global balance-loss statistics and the aux-loss-free router-bias update.

* :func:`apply_global_balance` gives every MoE layer with ``aux_loss_scope="global"`` a
  :class:`DataParallelBalanceStatistics`, which sums the layer's balance statistics over the data-parallel
  group, so its balance loss is the single-process value of the whole global batch.
* :func:`update_router_biases` moves the aux-loss-free balancing bias of every MoE layer that has one, with
  the loads of every rank (call it after each optimizer step; ``lightning_moe.callbacks.RouterBiasUpdate``
  does so in a Lightning run).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_moe.moe import MoE
from lightning_moe.moe.balance import BalanceStatistics
from lightning_moe.parallel.discovery import find_moe_layers

__all__ = ["DataParallelBalanceStatistics", "apply_global_balance", "update_router_biases"]


class DataParallelBalanceStatistics(BalanceStatistics):
    """Sums the balance statistics of an MoE layer over ``dp_mesh`` (one all-reduce per forward).

    Value: the sums over every rank. Gradient: only this rank's ``prob_sum`` depends on its router; it is
    scaled by the group size, because the data-parallel gradient reduction *averages* over that group, and
    the average of ``dp`` per-rank gradients must be the gradient of the global loss.
    """

    def __init__(self, dp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.dp_mesh = dp_mesh

    def forward(self, routed: Tensor, prob_sum: Tensor, num_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        size = self.dp_mesh.size()
        if size == 1:
            return routed, prob_sum, num_tokens
        num_experts = routed.numel()
        packed = torch.cat(
            [
                routed.detach().to(torch.float64),
                prob_sum.detach().to(torch.float64),
                num_tokens.detach().reshape(1).to(torch.float64),
            ]
        )  # [2E+1]; fp64 keeps token counts exact
        dist.all_reduce(packed, group=self.dp_mesh.get_group())
        total_routed = packed[:num_experts].round().to(routed.dtype)
        total_prob = packed[num_experts : 2 * num_experts].to(prob_sum.dtype)
        total_tokens = packed[-1].to(num_tokens.dtype)
        prob_with_grad = total_prob + size * (prob_sum - prob_sum.detach())  # value: global; gradient: size x local
        return total_routed, prob_with_grad, total_tokens

    def extra_repr(self) -> str:
        return f"dp={self.dp_mesh.size()}"


def apply_global_balance(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Sum the balance statistics of every MoE layer with ``aux_loss_scope="global"`` over ``dp_mesh`` (the
    flattened data-parallel mesh: every rank with tokens of its own)."""
    for _, layer in find_moe_layers(model):
        if layer.aux_loss_scope == "global" and dp_mesh.size() > 1:
            layer.balance_statistics = DataParallelBalanceStatistics(dp_mesh)
    return model


def update_router_biases(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """One aux-loss-free balancing step for every MoE layer with a router bias: its loads since the last
    call are summed over ``group`` (default: every rank, when a process group exists) in one all-reduce,
    and the bias moves by ``rate * sign(mean_load - load)``. Every rank must call it at the same point.

    Ranks that share a batch (tensor parallelism) count it once each, which scales every load alike and so
    does not change the signs. Returns the number of layers updated.
    """
    layers: list[MoE] = [layer for _, layer in find_moe_layers(model) if layer.balances_without_loss]
    if not layers:
        return 0
    loads = []
    for layer in layers:
        load = layer.take_router_load()
        bias = layer.gate.expert_bias
        loads.append(
            torch.zeros(layer.num_experts, dtype=torch.float64, device=bias.device)
            if load is None
            else load.to(torch.float64)
        )
    flat = torch.cat(loads)  # [sum of E]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    for layer, load in zip(layers, flat.split([layer.num_experts for layer in layers])):
        layer.update_router_bias(load)
    return len(layers)
