"""Small shared pieces of the CUDA tests (no tests here)."""

from __future__ import annotations

import torch


def fused_grouped_mm_device() -> bool:
    """Whether the current CUDA device has torch's fused grouped GEMM (sm90 / sm100)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64 (bf16 operands land between 1e-3 and 1e-2)."""
    got, ref = got.detach().double(), ref.detach().double().to(got.device)
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))
