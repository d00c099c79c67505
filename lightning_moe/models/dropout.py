"""Dropout whose CPU mask costs a quarter of a random draw per element.

torch's CPU dropout fills its mask with ``bernoulli_``: one serial draw of the generator per element, which
no thread count speeds up; in the translator's bf16 training on the project's CPU it was the largest cost
after the matrix products (a dropout forward + backward over 4096 x 1024 bf16 values took 21 ms, one thread).
:func:`dropout` draws full-range 64-bit integers instead and compares each of their four 16-bit lanes with a
threshold: four mask elements per draw, the same generator (seeded and checkpointed as usual), and the same
arithmetic as ``torch.nn.functional.dropout`` afterwards (``x * mask * 1/(1-p)``, the scale applied in fp32):
10.5 ms for the same tensor. The drop probability is ``p`` rounded to a multiple of 2^-16 (0.1 -> 0.100006);
the scale uses that rounded value, so the output's expectation is still the input. Elsewhere (CUDA, whose
dropout draws in parallel; ``torch.compile``) :func:`dropout` is ``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Dropout", "dropout", "drop_probability"]

_LANES = 1 << 16
"""Values of one 16-bit lane: the resolution of the drop probability."""


def drop_probability(p: float) -> float:
    """The drop probability the CPU mask realises for ``p``: ``p`` rounded to a multiple of 2^-16."""
    return round(p * _LANES) / _LANES


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Boolean ``shape`` mask, True with probability ``1 - drop_probability(p)``, from 16-bit random lanes."""
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # the full 64-bit range: every lane uniform over [-2^15, 2^15)
    lanes = words.view(torch.int16)[:count].view(shape)
    return lanes >= round(p * _LANES) - _LANES // 2


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``torch.nn.functional.dropout(x, p, training)``, with the fast mask on CPU (module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    realised = drop_probability(p)
    if realised >= 1.0:
        return F.dropout(x, 1.0, training)
    keep = _keep_mask(x.shape, p, x.device).to(x.dtype)  # [...] 0 / 1 in x's dtype
    return x.mul(keep).mul_(1.0 / (1.0 - realised))


class Dropout(nn.Module):
    """``torch.nn.Dropout`` through :func:`dropout` (no parameters or buffers: checkpoints are unchanged)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
