"""Per-rank bytes of parameters, gradients and optimizer state shrink as each ZeRO stage promises."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from lightning_moe.parallel import ParallelDims, expert_counts, no_gradient_sync, offload_optimizer, parallelize
from lightning_moe.parallel.memory import (
    gradient_bytes,
    optimizer_parameters,
    optimizer_state_bytes,
    parameter_bytes,
    unsharded_parameter_bytes,
)
from tests.distributed.harness import run_ranks
from tests.distributed.tiny_moe import TinyMoEModel, make_batches

pytestmark = pytest.mark.distributed

WORLD = 4


def _unsharded(model: torch.nn.Module, sharded: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters registered now that are not the resting (sharded) ones."""
    resting = {id(p) for p in sharded}
    return [p for p in model.parameters() if id(p) not in resting]


def _measure(rank: int, world_size: int, ep: int, stage: int, offload: str) -> dict:
    torch.manual_seed(0)
    model = TinyMoEModel(d=32, num_experts=8)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    root_owned = sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("blocks.")
    )
    experts = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name)
    dims = ParallelDims(world_size, ep, zero_stage=stage, offload=offload).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if offload == "optimizer":
        opt = offload_optimizer(opt)
    out = {
        "total": total,
        "root_owned": root_owned,
        "replicated": total - experts + experts // ep,  # dense weights + this ep rank's experts
        "params_at_rest": parameter_bytes(model),
    }
    (tokens, targets), (tokens2, targets2) = make_batches(2)
    local = slice(rank * 2, rank * 2 + 2)

    # A non-last accumulation micro-batch.
    with no_gradient_sync(model):
        loss = model(tokens[local], targets[local])
        # Between forward and backward:
        out["unsharded_in_step"] = unsharded_parameter_bytes(model, optimizer_parameters(opt))
        loss.backward()
    sharded = optimizer_parameters(opt)
    out["sharded_grads_after_accumulation_step"] = gradient_bytes(sharded)
    out["unsharded_grads_after_accumulation_step"] = gradient_bytes(_unsharded(model, sharded))
    # The last micro-batch, then the step.
    model(tokens2[local], targets2[local]).backward()
    out["grads_after_step_backward"] = gradient_bytes(sharded)
    out["unsharded_grads_after_step_backward"] = gradient_bytes(_unsharded(model, sharded))
    opt.step()
    out["optimizer_state"] = optimizer_state_bytes(opt)
    out["step_counters"] = sum(
        v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k == "step"
    )
    out["all_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
    return out


def _close(actual: int, expected: float, rel: float = 0.05) -> bool:
    return abs(actual - expected) <= rel * expected


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bytes_per_stage(stage: int) -> None:
    for r in run_ranks(_measure, WORLD, 2, stage, "none"):
        total, shard = r["total"], r["total"] / WORLD
        moments = r["optimizer_state"] - r["step_counters"]
        assert r["all_dtensor"]
        if stage == 0:  # dense weights replicated, experts split over ep only
            assert r["replicated"] < total
            assert r["params_at_rest"] == r["replicated"]
            assert r["sharded_grads_after_accumulation_step"] == 0  # all-reduce deferred (DDP's no_sync)
            assert r["unsharded_grads_after_accumulation_step"] == r["replicated"]
            assert r["grads_after_step_backward"] == r["replicated"]
            assert moments == 2 * r["replicated"]
            continue
        # Stages 1-3: optimizer state (two AdamW moments) and resting parameters sharded.
        assert _close(r["params_at_rest"], shard), (r["params_at_rest"], shard)
        assert _close(moments, 2 * shard), (moments, 2 * shard)
        assert _close(r["grads_after_step_backward"], shard)
        assert r["unsharded_grads_after_step_backward"] == 0  # freed once reduce-scattered
        if stage == 1:
            # Reduction deferred: full gradients accumulate on each rank, nothing is reduce-scattered.
            assert r["sharded_grads_after_accumulation_step"] == 0
            assert r["unsharded_grads_after_accumulation_step"] == r["replicated"]
        else:
            # Reduce-scattered every micro-batch; no unsharded gradient kept.
            assert _close(r["sharded_grads_after_accumulation_step"], shard)
            assert r["unsharded_grads_after_accumulation_step"] == 0
        if stage in (1, 2):
            # Every unit keeps its unsharded parameters (experts: this ep rank's) from forward to backward.
            assert r["unsharded_in_step"] == r["replicated"]
        else:
            # Only the root's own parameters (embedding, final norm, head) stay unsharded.
            assert r["unsharded_in_step"] == r["root_owned"]
            assert r["unsharded_in_step"] < total / 2


def test_offloaded_optimizer_keeps_sharded_state_and_masters() -> None:
    for r in run_ranks(_measure, WORLD, 4, 2, "optimizer"):
        shard = r["total"] / WORLD
        moments_and_masters = r["optimizer_state"] - r["step_counters"]
        assert _close(moments_and_masters, 3 * shard), (moments_and_masters, 3 * shard)
