"""A float64 grouped product and its per-expert reference, shared by the tests of the CPU loop path."""

from __future__ import annotations

import torch
from torch import Tensor


def grouped_mm_inputs(counts: list[int], width: int, hidden: int) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded float64 ``x [sum(counts), width]``, ``w [E, width, hidden]``, ``bias [E, hidden]``, all requiring grad."""
    torch.manual_seed(0)
    x = torch.randn(sum(counts), width, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(counts), width, hidden, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(len(counts), hidden, dtype=torch.float64, requires_grad=True)
    return x, w, bias


def assert_matches_per_expert_products(out: Tensor, x: Tensor, w: Tensor, bias: Tensor, counts: list[int]) -> None:
    """``out`` and its gradients equal ``x[rows of e] @ w[e] + bias[e]``, expert by expert."""
    bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
    reference = torch.cat([x[bounds[e] : bounds[e + 1]] @ w[e] + bias[e] for e in range(len(counts))])
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, w, bias], grad)
    want = torch.autograd.grad(reference, [x, w, bias], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
