"""Finding the parts of a model that the parallel code treats specially, without knowing the model.

* MoE layers: instances of :class:`lightning_moe.moe.MoE`; their ``experts`` module holds ``[E, ...]``
  parameters (see docs/INTERFACES.md).
* transformers MoE experts (Mixtral, Qwen-MoE, OLMoE, ...): see :mod:`lightning_moe.parallel.hf_moe`; their
  parameters are ``[E, ...]`` too.
* Blocks: the direct children of every ``nn.ModuleList`` (transformer layers, in practice). Each block is
  one FSDP unit and one activation-checkpointing region.
"""

from __future__ import annotations

from torch import nn

from lightning_moe.moe import find_moe_layers

__all__ = ["find_moe_layers", "find_blocks", "expert_counts", "expert_modules"]


def expert_counts(model: nn.Module) -> list[int]:
    """The expert count of every MoE layer and transformers experts module (what :meth:`ParallelDims.resolve`
    needs)."""
    from lightning_moe.parallel.hf_moe import find_hf_experts

    counts = [layer.num_experts for _, layer in find_moe_layers(model)]
    return counts + [int(experts.num_experts) for _, experts in find_hf_experts(model)]  # type: ignore[arg-type]


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, experts module)`` of every MoE layer's experts and every recognised transformers
    experts module: the modules whose ``[E, ...]`` parameters are split over ``ep`` and ZeRO-sharded over
    ``efsdp``."""
    from lightning_moe.parallel.hf_moe import find_hf_experts

    ours = [(f"{name}.experts" if name else "experts", layer.experts) for name, layer in find_moe_layers(model)]
    return ours + find_hf_experts(model)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of every direct child of an ``nn.ModuleList`` in ``model``.

    Listed in module order (a parent block before the blocks nested inside it).
    """
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for child_name, child in module.named_children():
                blocks.append((f"{name}.{child_name}" if name else child_name, child))
    return blocks
