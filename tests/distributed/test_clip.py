"""Gradient clipping across the dense (dp) and expert (efsdp x ep) meshes == single-process clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed.tensor import DTensor

from lightning_moe.parallel import ParallelDims, clip_grad_norm_, clip_grad_value_, expert_counts, parallelize
from tests.distributed.harness import run_ranks
from tests.distributed.tiny_moe import TinyMoEModel, make_batches

NORM_TYPES = (2.0, 1.0, math.inf)

pytestmark = pytest.mark.distributed

MAX_NORM = 0.02  # well below the gradient norm, so clipping is active


def _reference_norm(norm_type: float) -> torch.Tensor:
    torch.manual_seed(0)
    model = TinyMoEModel()
    tokens, targets = make_batches(1)[0]
    model(tokens, targets).backward()
    return torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type=norm_type)


def _clip_rank(rank: int, world_size: int, ep: int, stage: int) -> dict:
    torch.manual_seed(0)
    model = TinyMoEModel()
    dims = ParallelDims(world_size, ep, zero_stage=stage).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    meshes = {p.device_mesh for p in model.parameters() if isinstance(p, DTensor)}
    tokens, targets = make_batches(1)[0]
    local = tokens.shape[0] // world_size
    model(tokens[rank * local : (rank + 1) * local], targets[rank * local : (rank + 1) * local]).backward()
    saved = {n: p.grad._local_tensor.clone() for n, p in model.named_parameters()}

    def restore() -> None:
        for n, p in model.named_parameters():
            p.grad._local_tensor.copy_(saved[n])

    def local_grads() -> dict[str, torch.Tensor]:
        return {n: p.grad._local_tensor.clone() for n, p in model.named_parameters()}

    result: dict = {"num_meshes": len(meshes), "saved": saved}
    for norm_type in NORM_TYPES:
        restore()
        result[norm_type] = (clip_grad_norm_(model.parameters(), MAX_NORM, norm_type=norm_type), local_grads())
    restore()
    clip_grad_value_(model.parameters(), 1e-4)
    result["value_clipped"] = local_grads()
    return result


@pytest.mark.parametrize(("world_size", "ep", "stage"), [(4, 2, 3), (2, 2, 1), (4, 4, 0)])
def test_clip_across_meshes_matches_single_process(world_size: int, ep: int, stage: int) -> None:
    results = run_ranks(_clip_rank, world_size, ep, stage)
    for norm_type in NORM_TYPES:
        ref_norm = _reference_norm(norm_type)
        assert ref_norm > MAX_NORM * 2
        coef = MAX_NORM / (ref_norm + 1e-6)  # what torch scales every gradient by
        for result in results:
            assert result["num_meshes"] == 2  # dense and expert parameters really live on different meshes
            norm, clipped = result[norm_type]
            torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-7)
            for name, grad in clipped.items():  # every local shard, on either mesh, scaled alike
                torch.testing.assert_close(grad, result["saved"][name] * coef, rtol=1e-5, atol=1e-9)
    for result in results:
        saved = result["saved"]
        assert any((g.abs() > 1e-4).any() for g in saved.values())  # clipping by value really changes something
        for name, grad in result["value_clipped"].items():
            torch.testing.assert_close(grad, saved[name].clamp(-1e-4, 1e-4))


def test_clip_plain_tensors_matches_torch() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, copies):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    params[1].grad = None
    copies[1].grad = None
    norm = clip_grad_norm_(params, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(copies, 0.5)
    torch.testing.assert_close(norm, ref)
    for p, q in zip(params, copies):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


def test_clip_rejects_bad_arguments() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([p], 0.0)
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value_([p], -1.0)
    p.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
