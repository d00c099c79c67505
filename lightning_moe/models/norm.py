"""Layer norm whose output is already in the autocast dtype.

Under autocast ``layer_norm`` runs in fp32 and returns fp32, and every matrix product that reads the result
casts it again: a self-attention block casts the same normalised input three times (queries, keys, values),
and each decoder block casts the encoder's output twice more (cross-attention keys and values). Handing the
normalised tensor on in the autocast dtype makes that one cast, and its gradient is summed over the readers
in that dtype before the single cast back. Outside autocast it is ``nn.LayerNorm`` exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LayerNorm"]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict keys) computed in fp32 under autocast and returned in
    the autocast dtype, since every reader is a matrix product that would cast it anyway."""

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``: the autocast dtype under autocast, else ``x``'s dtype."""
        out = super().forward(x)
        device_type = out.device.type
        if torch.is_autocast_enabled(device_type):
            return out.to(torch.get_autocast_dtype(device_type))
        return out
