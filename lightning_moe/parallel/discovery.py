"""Finding the parts of a model that the parallel code treats specially, without knowing the model.

* MoE layers: instances of :class:`lightning_moe.moe.MoE`; their ``experts`` module holds ``[E, ...]``
  parameters (see docs/INTERFACES.md).
* Blocks: the direct children of every ``nn.ModuleList`` (transformer layers, in practice). Each block is
  one FSDP unit and one activation-checkpointing region.
"""

from __future__ import annotations

from torch import nn

from lightning_moe.moe import find_moe_layers

__all__ = ["find_moe_layers", "find_blocks", "expert_counts"]


def expert_counts(model: nn.Module) -> list[int]:
    """The expert count of every MoE layer (what :meth:`ParallelDims.resolve` needs)."""
    return [layer.num_experts for _, layer in find_moe_layers(model)]


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
