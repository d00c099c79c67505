"""A tiny MoE language model for the distributed tests: embedding -> [dense block, MoE block] x L -> head.

Built from ``torch.nn`` and :class:`lightning_moe.moe.MoE` only. Parity-test settings:

* ``drop_tokens=False``: with capacity, each rank computes capacity from its *local* token count, so a
  sharded batch drops different tokens than the single-process batch; dropless routing does not.
* ``aux_loss_coef=0``: the load-balancing loss multiplies two batch means (fraction routed x mean
  probability), so the mean of per-rank values is not the global value. The z-loss is a plain mean
  over tokens and stays on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.moe import MoE


class DenseBlock(nn.Module):
    """Pre-norm residual FFN."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)))), x.new_zeros((), dtype=torch.float32)


class MoEBlock(nn.Module):
    """Pre-norm residual MoE layer."""

    def __init__(self, d: int, num_experts: int, k: int, expert: str, **moe_kwargs: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        kwargs: dict[str, Any] = {"drop_tokens": False, "aux_loss_coef": 0.0, "z_loss_coef": 1e-3, **moe_kwargs}
        self.moe = MoE(d, num_experts, 2 * d, k=k, expert=expert, **kwargs)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.moe(self.norm(x))
        return x + out.output, out.aux_loss


class TinyMoEModel(nn.Module):
    """``forward(tokens [B, T], targets [B, T]) -> loss`` (mean cross-entropy + MoE aux losses).

    ``num_experts``: one count for every MoE layer, or one per layer (PR-MoE); ``moe_kwargs`` override the
    MoE arguments above (e.g. ``aux_loss_coef`` with ``aux_loss_scope="global"``)."""

    def __init__(
        self,
        vocab: int = 32,
        d: int = 16,
        num_experts: int | list[int] = 4,
        k: int = 2,
        layers: int = 2,
        expert: str = "ffn",
        **moe_kwargs: Any,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        counts = num_experts if isinstance(num_experts, list) else [num_experts] * layers
        if len(counts) != layers:
            raise ValueError(f"num_experts={num_experts} needs one count per MoE layer ({layers})")
        blocks: list[nn.Module] = []
        for count in counts:
            blocks += [DenseBlock(d), MoEBlock(d, count, k, expert, **moe_kwargs)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        x = self.embed(tokens)  # [B, T, d]
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, block_aux = block(x)
            aux = aux + block_aux
        logits = self.head(self.norm(x))  # [B, T, vocab]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) + aux


def make_batches(
    steps: int, batch: int = 8, seq: int = 6, vocab: int = 32, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """Deterministic global batches ``(tokens [batch, seq], targets [batch, seq])``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (batch, seq), generator=gen), torch.randint(0, vocab, (batch, seq), generator=gen))
        for _ in range(steps)
    ]
