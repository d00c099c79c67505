"""The few-thousand-parameter ``MoETransformer`` config of the model and generation tests: fast on CPU,
dropout off, dropless MoE (outputs do not depend on which tokens share a batch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_moe.models import TransformerConfig, get_preset


def small_config(vocab_size: int, num_experts: int | list[int] = 4, **overrides: Any) -> TransformerConfig:
    """d_model 32, 4 heads, FFN 48, 2 + 2 blocks, top-min(2, E) experts; ``overrides`` as in ``get_preset``."""
    fewest = num_experts if isinstance(num_experts, int) else min(num_experts)
    base: dict[str, Any] = dict(
        vocab_size=vocab_size,
        d_model=32,
        num_heads=4,
        ffn_hidden_size=48,
        encoder_layers=2,
        decoder_layers=2,
        dropout=0.0,
        max_positions=32,
        num_experts=num_experts,
        k=min(2, max(fewest, 1)),
        drop_tokens=False,
    )
    return get_preset("tiny", **{**base, **overrides})


def padded_sources(lengths: list[int], vocab_size: int, pad_id: int = 0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random source rows of the given lengths (tokens 3..vocab-1), right-padded: ``(src [B, S], mask [B, S])``,
    mask True at padding."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, vocab_size, (n,), generator=g)
    return src, src == pad_id
