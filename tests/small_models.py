"""The few-thousand-parameter ``MoETransformer`` config of the model and generation tests: fast on CPU,
dropout off, dropless MoE (outputs do not depend on which tokens share a batch)."""

from __future__ import annotations

from typing import Any

from lightning_moe.models import TransformerConfig, get_preset


def small_config(vocab_size: int, num_experts: int = 4, **overrides: Any) -> TransformerConfig:
    """d_model 32, 4 heads, FFN 48, 2 + 2 blocks, top-min(2, E) experts; ``overrides`` as in ``get_preset``."""
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
        k=min(2, max(num_experts, 1)),
        drop_tokens=False,
    )
    return get_preset("tiny", **{**base, **overrides})
