"""Tiny random transformers MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V3) for the HF
tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")
VOCAB = 64
NUM_EXPERTS = 4


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A random-initialisable config of ``arch`` with 4 experts, top-2, 2 layers, width 16."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=NUM_EXPERTS, **common)
    elif arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=24,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=20,
            num_experts=NUM_EXPERTS,
            norm_topk_prob=False,
            **common,
        )
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=24, moe_intermediate_size=12, num_experts=NUM_EXPERTS, norm_topk_prob=True, **common
        )
    elif arch == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=12, num_experts=NUM_EXPERTS, **common)
    elif arch == "gpt_oss":  # experts with biases, transposed weights, clamped gate; sinks in attention
        cfg = transformers.GptOssConfig(
            intermediate_size=12, num_local_experts=NUM_EXPERTS, head_dim=8, sliding_window=8, **common
        )
    elif arch == "deepseek_v3":  # sigmoid routing with a correction bias, group top-k, shared experts, MLA
        common["num_key_value_heads"] = 2
        cfg = transformers.DeepseekV3Config(
            intermediate_size=24,
            moe_intermediate_size=12,
            n_routed_experts=NUM_EXPERTS,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            kv_lora_rank=8,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            **common,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` of :func:`tiny_config` in fp32 with eager attention, seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="eager")
    # Random init is tiny (std 0.02): widen the router so that tokens really spread over the experts.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.normal_(0.0, 1.0)
    return model.float()


def experts_of(model: nn.Module) -> list[nn.Module]:
    """The experts module of every decoder layer."""
    return [layer.mlp.experts for layer in model.model.layers]
