"""Hugging Face MoE models under the engine: expert parallelism (ep=2) + ZeRO-3 on 2 gloo ranks equals the
unparallelised transformers model (forward, backward, optimizer steps), with the experts truly split."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", minversion="5")

from lightning_moe.parallel import ParallelDims, parallelize  # noqa: E402
from lightning_moe.parallel.hf_moe import (  # noqa: E402
    find_hf_experts,
    find_unrecognised_moe_modules,
    is_hf_expert_parallel,
)
from tests.distributed.harness import run_ranks  # noqa: E402
from tests.distributed.hf_tiny import ARCHS, NUM_EXPERTS, VOCAB, experts_of, tiny_model  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3


def _batches(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    return ids, ids.clone()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _reference(arch: str, world: int = WORLD, **overrides: Any) -> dict[str, Any]:
    """One process, plain transformers: the loss on each step is the mean of the per-rank losses."""
    model = tiny_model(arch, **overrides)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits0, losses, grads0 = [], [], {}
    for step in range(STEPS):
        outs = [model(input_ids=ids, labels=labels) for ids, labels in (_batches(r, step) for r in range(world))]
        loss = sum(o.loss for o in outs) / world
        loss.backward()
        if step == 0:
            logits0 = [o.logits.detach() for o in outs]
            grads0 = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        losses.append([o.loss.item() for o in outs])
        optimizer.step()
        optimizer.zero_grad()
    return {
        "logits0": logits0,
        "losses": losses,
        "grads0": grads0,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def _parallel(
    rank: int,
    world_size: int,
    arch: str,
    zero_stage: int,
    checkpointing: bool = False,
    offload: str = "none",
    **overrides: Any,
) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    model = tiny_model(arch, **overrides)
    model.train()
    dims = ParallelDims(world_size=world_size, expert_parallel_size=2, zero_stage=zero_stage, offload=offload)
    parallelize(model, dims.build_mesh("cpu"), dims, activation_checkpointing=checkpointing)
    split = []
    for experts in experts_of(model):
        assert is_hf_expert_parallel(experts)
        for p in experts.parameters():
            assert isinstance(p, DTensor)
            # outside forward: the ep shard, further ZeRO-sharded over efsdp = world / ep
            split.append((tuple(p.shape), tuple(p.to_local().shape)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits0, losses, grads0 = None, [], {}
    for step in range(STEPS):
        ids, labels = _batches(rank, step)
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        if step == 0:
            logits0 = out.logits.detach().clone()
            grads0 = {n: _full(p.grad) for n, p in model.named_parameters()}
        losses.append(out.loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return {
        "split": split,
        "logits0": logits0,
        "losses": losses,
        "grads0": grads0,
        "params": {n: _full(p) for n, p in model.named_parameters()},
        "impl": model.config._experts_implementation,
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_parallel_zero3_matches_transformers(arch: str) -> None:
    _check(_reference(arch), run_ranks(_parallel, WORLD, arch, 3, timeout=90))


def test_expert_parallel_with_sharded_experts_and_eager_experts_matches_transformers() -> None:
    """4 ranks: ep=2 x efsdp=2 (each expert shard ZeRO-3-sharded over 2 ranks), the model's eager experts."""
    ref = _reference("mixtral", 4, _experts_implementation="eager")
    results = run_ranks(_parallel, 4, "mixtral", 3, _experts_implementation="eager", timeout=120)
    _check(ref, results, efsdp=2)


def _check(ref: dict[str, Any], results: list[dict[str, Any]], efsdp: int = 1) -> None:
    for rank, res in enumerate(results):
        assert res["impl"] == "lightning_moe_ep"
        assert res["split"], "no experts found"
        for full_shape, local_shape in res["split"]:
            assert full_shape[0] == NUM_EXPERTS
            held = local_shape[0] * (local_shape[1] if len(local_shape) > 1 else 1)
            assert held * 2 * efsdp == full_shape[0] * (full_shape[1] if len(full_shape) > 1 else 1)
        torch.testing.assert_close(res["logits0"], ref["logits0"][rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(res["losses"]), torch.tensor([step[rank] for step in ref["losses"]]), rtol=1e-5, atol=1e-6
        )
        assert res["grads0"].keys() == ref["grads0"].keys()
        for name, grad in ref["grads0"].items():
            torch.testing.assert_close(res["grads0"][name], grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
        # Adam turns a gradient near its eps (1e-8) into a step of about lr * g / (|g| + eps): there a rounding
        # difference of 1% in a 4e-9 gradient (well inside the gradient check above) moves the parameter by ~3e-5
        # per step at lr 1e-2, and which elements sit there depends on the CPU's kernels. A wrong gradient moves
        # parameters by up to lr per step, far above this tolerance.
        for name, param in ref["params"].items():
            torch.testing.assert_close(res["params"][name], param, rtol=1e-4, atol=1e-4, msg=f"rank {rank}: {name}")


@pytest.mark.parametrize(
    ("zero_stage", "checkpointing", "offload"),
    [(0, False, "none"), (1, False, "none"), (2, True, "none"), (3, False, "params")],
    ids=["stage0", "stage1", "stage2-activation_checkpointing", "stage3-offload_params"],
)
def test_expert_parallel_other_stages_match_transformers(zero_stage: int, checkpointing: bool, offload: str) -> None:
    ref = _reference("mixtral")
    results = run_ranks(_parallel, WORLD, "mixtral", zero_stage, checkpointing, offload, timeout=90)
    for rank, res in enumerate(results):
        for name, param in ref["params"].items():
            torch.testing.assert_close(res["params"][name], param, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")


def test_recognises_the_experts_of_each_architecture() -> None:
    for arch in ARCHS:
        model = tiny_model(arch)
        names = [name for name, _ in find_hf_experts(model)]
        assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)], arch
        assert find_unrecognised_moe_modules(model) == [], arch
    # Qwen2-MoE's shared expert stays a dense MLP
    qwen2 = tiny_model("qwen2_moe")
    assert all("shared_expert" not in name for name, _ in find_hf_experts(qwen2))


class _ListExperts(nn.Module):
    """An MoE block whose experts are a ModuleList of MLPs (no [E, ...] weights): not expert-parallelisable."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(x).softmax(-1)  # [N, 4]
        return sum(weights[:, i : i + 1] * expert(x) for i, expert in enumerate(self.experts))


def _unrecognised(rank: int, world_size: int) -> dict[str, Any]:
    model = nn.Sequential(nn.Linear(8, 8), _ListExperts())
    reference = copy.deepcopy(model)
    dims = ParallelDims(world_size=world_size, expert_parallel_size=1, zero_stage=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallelize(model, dims.build_mesh("cpu"), dims)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
    torch.testing.assert_close(model(x), reference(x))  # plain ZeRO-3 fallback still computes the same
    return {"warnings": [str(w.message) for w in caught if "moe_zero" in str(w.message)]}


def test_unrecognised_block_warns_once_naming_it_and_falls_back_to_zero() -> None:
    results = run_ranks(_unrecognised, WORLD, timeout=60)
    assert len(results[0]["warnings"]) == 1
    assert "'1' (_ListExperts)" in results[0]["warnings"][0]
    assert results[1]["warnings"] == []  # rank 0 only


def test_router_aux_loss_is_the_models_own_per_rank() -> None:
    """``output_router_logits=True``: the model adds its load-balancing loss, computed from each rank's tokens
    (the reference averages the per-rank losses, aux included)."""
    ref = _reference("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.5)
    plain = _reference("qwen3_moe")
    assert ref["losses"][0] != plain["losses"][0]  # the aux loss is really in the loss
    _check(ref, run_ranks(_parallel, WORLD, "qwen3_moe", 3, output_router_logits=True, router_aux_loss_coef=0.5))


def _with_tp(rank: int, world_size: int) -> str:
    model = tiny_model("mixtral")
    dims = ParallelDims(world_size=world_size, expert_parallel_size=1, tensor_parallel_size=2, zero_stage=3)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 is not supported") as err:
        parallelize(model, dims.build_mesh("cpu"), dims)
    return str(err.value)


def test_tensor_parallelism_with_transformers_experts_is_refused_with_a_fix() -> None:
    for message in run_ranks(_with_tp, WORLD, timeout=60):
        assert "tensor_parallel_size=1" in message


def _all_tokens_to_rank0_experts(rank: int, world_size: int, implementation: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_moe.parallel.hf_moe import apply_hf_expert_parallel

    model = tiny_model("mixtral", _experts_implementation=implementation)
    reference = copy.deepcopy(model.model.layers[0].mlp.experts)
    apply_hf_expert_parallel(model, init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",)))
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(rank)
    hidden = torch.randn(5, 16, generator=g)
    index = torch.randint(0, 2, (5, 2), generator=g)  # experts 0 and 1 only: rank 1 receives no rows
    index[:, 1] = 1 - index[:, 0]
    weights = torch.rand(5, 2, generator=g).requires_grad_(True)
    x = hidden.clone().requires_grad_(True)
    out = experts(x, index, weights)
    out.square().sum().backward()
    x_ref = hidden.clone().requires_grad_(True)
    w_ref = weights.detach().clone().requires_grad_(True)
    ref = reference(x_ref, index, w_ref)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    return {"local_grad": experts.gate_up_proj.grad.to_local().clone()}


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_a_rank_receiving_no_tokens_joins_forward_and_backward(implementation: str) -> None:
    """The eager experts return zeros unconnected to their inputs when no row arrives: the rank must still join
    the backward all-to-all and give its experts zero (not missing) gradients."""
    results = run_ranks(_all_tokens_to_rank0_experts, WORLD, implementation, timeout=60)
    assert results[0]["local_grad"].abs().sum() > 0  # experts 0-1 trained
    assert torch.equal(results[1]["local_grad"], torch.zeros_like(results[1]["local_grad"]))  # zero, not missing
