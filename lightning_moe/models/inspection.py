"""Finding the MoE layers of a model and counting its parameters (total and active per token)."""

from __future__ import annotations

from torch import nn

from lightning_moe.moe import MoE

__all__ = ["moe_layers", "count_parameters"]


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every :class:`MoE` layer of ``model`` with its qualified name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, active_per_token)`` parameter counts of ``model``.

    ``total`` counts every parameter once (tied weights once). ``active_per_token`` counts the parameters
    one token uses: everything outside the experts (embeddings, attention, dense FFNs, routers, residual
    FFNs, shared experts), plus, in each MoE layer, ``k / E`` of its experts' parameters (``k`` of ``E`` experts). Sharded
    (DTensor) parameters count with their global size.
    """
    expert_ids: set[int] = set()
    active_experts = 0.0
    for _, layer in moe_layers(model):
        for param in layer.experts.parameters():
            if id(param) in expert_ids:
                continue
            expert_ids.add(id(param))
            active_experts += param.numel() * layer.k / layer.num_experts
    total = 0
    dense = 0
    for param in model.parameters():  # deduplicated by nn.Module
        total += param.numel()
        if id(param) not in expert_ids:
            dense += param.numel()
    return total, dense + round(active_experts)
