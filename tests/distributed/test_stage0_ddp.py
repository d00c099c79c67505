"""ZeRO stage 0 with plain parameters runs on DDP (composable ``replicate``), not FSDP2's ``replicate``.

Parity of the trajectory with one process is in ``test_parity.py`` (ep=1, stage 0); here: which engine is
chosen, that accumulation micro-batches inside ``no_gradient_sync`` really skip the all-reduce, and that
accumulation still equals the single-process run.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_moe.parallel import ParallelDims, expert_counts, mixed_precision_policy, no_gradient_sync, parallelize
from lightning_moe.parallel.fsdp import is_data_parallel
from tests.distributed.harness import run_ranks
from tests.distributed.test_parity import _check, _train_rank
from tests.distributed.tiny_moe import TinyMoEModel, make_batches

pytestmark = pytest.mark.distributed


def _engine(rank: int, world_size: int, ep: int, precision: str | None) -> dict[str, bool]:
    torch.manual_seed(0)
    model = TinyMoEModel()
    dims = ParallelDims(world_size, ep, zero_stage=0).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims, mp_policy=mixed_precision_policy(precision))
    return {
        "data_parallel": is_data_parallel(model),
        "fsdp": isinstance(model, FSDPModule),
        "any_dtensor": any(isinstance(p, DTensor) for p in model.parameters()),
    }


@pytest.mark.parametrize(
    ("ep", "precision", "fsdp"),
    [(1, None, False), (2, None, True), (1, "bf16-mixed", True)],
    ids=["ep1-ddp", "ep2-dtensor-experts-fsdp", "bf16-mixed-fsdp"],
)
def test_engine_choice(ep: int, precision: str | None, fsdp: bool) -> None:
    for r in run_ranks(_engine, 2, ep, precision):
        assert r["data_parallel"]
        assert r["fsdp"] == fsdp
        assert r["any_dtensor"] == fsdp  # DDP: plain tensors, the optimizer's fast paths stay available


def _grads_after(rank: int, world_size: int, sync: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyMoEModel()
    dims = ParallelDims(world_size, 1, zero_stage=0).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    ((tokens, targets),) = make_batches(1)
    local = slice(rank * 4, rank * 4 + 4)  # different data on each rank
    if sync:
        model(tokens[local], targets[local]).backward()
    else:
        with no_gradient_sync(model):
            model(tokens[local], targets[local]).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    summed = {n: g.clone() for n, g in grads.items()}
    for g in summed.values():
        dist.all_reduce(g)
    return {"grads": grads, "mean": {n: g / world_size for n, g in summed.items()}}


@pytest.mark.parametrize("sync", [False, True], ids=["no_gradient_sync", "synced"])
def test_no_gradient_sync_skips_the_all_reduce(sync: bool) -> None:
    results = run_ranks(_grads_after, 2, sync)
    for name, mean in results[0]["mean"].items():
        per_rank = [r["grads"][name] for r in results]
        if sync:  # all-reduced: every rank holds the mean
            for g in per_rank:
                torch.testing.assert_close(g, mean, rtol=1e-5, atol=1e-7)
    if not sync:  # local gradients of different data: not reduced
        assert any(not torch.allclose(results[0]["grads"][n], results[1]["grads"][n]) for n in results[0]["grads"])


def test_gradient_accumulation_matches_one_process() -> None:
    _check(run_ranks(_train_rank, 2, ep=1, stage=0, steps=2, accum=2), steps=2, accum=2)


def test_activation_checkpointing_matches_one_process() -> None:
    _check(run_ranks(_train_rank, 2, ep=1, stage=0, activation_checkpointing=True))
