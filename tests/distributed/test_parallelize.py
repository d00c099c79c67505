"""parallelize(): ordering, unchanged parameter names, activation checkpointing, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_moe.parallel import (
    ParallelDims,
    apply_fsdp,
    expert_counts,
    find_blocks,
    find_moe_layers,
    mixed_precision_policy,
    no_gradient_sync,
    parallelize,
)
from tests.distributed.harness import run_ranks
from tests.distributed.tiny_moe import TinyMoEModel, make_batches


def test_discovery_finds_moe_layers_and_module_list_children() -> None:
    model = TinyMoEModel(num_experts=4, layers=2)
    model.extra = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)), nn.ModuleList([nn.Linear(2, 2)])])
    assert [name for name, _ in find_moe_layers(model)] == ["blocks.1.moe", "blocks.3.moe"]
    assert expert_counts(model) == [4, 4]
    names = [name for name, _ in find_blocks(model)]
    assert names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "extra.0", "extra.1", "extra.1.0"]


def test_mixed_precision_policy_from_precision_strings() -> None:
    policy = mixed_precision_policy("bf16-mixed")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision_policy("16-mixed").param_dtype == torch.float16
    assert mixed_precision_policy("32-true") is None and mixed_precision_policy(None) is None
    with pytest.raises(ValueError, match=r"precision='64-true' is not supported.*use one of"):
        mixed_precision_policy("64-true")


def _names_and_recompute(rank: int, world_size: int, activation_checkpointing: bool) -> dict:
    torch.manual_seed(0)
    model = TinyMoEModel()
    names_before = list(model.state_dict().keys())
    dims = ParallelDims(world_size, 2, zero_stage=2).resolve(expert_counts(model))
    mesh = dims.build_mesh("cpu")
    parallelize(model, mesh, dims, activation_checkpointing=activation_checkpointing)
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
    tokens, targets = make_batches(1)[0]
    model(tokens[rank * 4 : rank * 4 + 4], targets[rank * 4 : rank * 4 + 4]).backward()

    with pytest.raises(ValueError, match="call apply_fsdp once"):
        apply_fsdp(model, mesh, dims)
    other = ParallelDims(world_size, 1, zero_stage=2)
    with pytest.raises(ValueError, match=r"does not match dims \(efsdp=2, ep=1, tp=1\)"):
        parallelize(TinyMoEModel(), mesh, other)
    with pytest.raises(ValueError, match="needs a model returned by apply_fsdp"):
        with no_gradient_sync(TinyMoEModel()):
            pass
    return {
        "same_names": names_before == list(model.state_dict().keys()),
        "block_forwards": len(calls),
        # ZeRO-2: the experts' full-size gradients must not be kept between steps
        "gradient_memory_kept": [layer.experts.gradient_memory.nbytes() for _, layer in find_moe_layers(model)],
        "gradient_memory_on": [layer.experts.gradient_memory.enabled for _, layer in find_moe_layers(model)],
    }


@pytest.mark.distributed
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_parameter_names_unchanged_and_blocks_recomputed(activation_checkpointing: bool) -> None:
    for result in run_ranks(_names_and_recompute, 2, activation_checkpointing):
        assert result["same_names"]
        assert result["gradient_memory_kept"] == [0, 0] and result["gradient_memory_on"] == [False, False]
        # With checkpointing the block's forward runs again in backward.
        assert result["block_forwards"] == (2 if activation_checkpointing else 1)
