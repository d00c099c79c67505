"""The encoder-decoder MoE transformer, its configuration and generation. No torch.distributed, no Lightning."""

from lightning_moe.models.config import PRESETS, MoEConfig, TransformerConfig, dense_twin, get_preset
from lightning_moe.models.generation import Hypothesis, beam_search, generate, greedy_decode, max_output_lengths
from lightning_moe.models.inspection import count_parameters, moe_layers
from lightning_moe.models.transformer import ModelOutput, MoETransformer, sequence_cross_entropy

__all__ = [
    "MoEConfig",
    "TransformerConfig",
    "PRESETS",
    "get_preset",
    "dense_twin",
    "MoETransformer",
    "ModelOutput",
    "sequence_cross_entropy",
    "moe_layers",
    "count_parameters",
    "Hypothesis",
    "greedy_decode",
    "beam_search",
    "generate",
    "max_output_lengths",
]
