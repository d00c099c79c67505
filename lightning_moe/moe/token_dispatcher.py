"""The seam between an MoE layer and its experts: who computes the expert-sorted token rows.

The layer routes and sorts its tokens (``plan_dispatch`` / ``permute_tokens``), then hands the rows to its
``token_dispatcher``, which runs the experts on them and returns their outputs in the same row order. The
default :class:`TokenDispatcher` calls the experts in place. Parallel code swaps the layer's dispatcher for
one that moves the rows between ranks first (``lightning_moe.parallel``: the all-to-all of expert
parallelism, the row split of tensor parallelism), so a parallel layer shows its dispatcher in
``print(model)`` and the experts module itself never changes. A dispatcher holds no parameters or buffers,
so swapping it leaves the state_dict keys unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TokenDispatcher"]


class TokenDispatcher(nn.Module):
    """Runs the experts on this process: ``experts(x, tokens_per_expert)``.

    Subclasses (the distributed dispatchers) keep the signature and the contract: rows in, rows out, in
    the same order, with ``tokens_per_expert`` counting the rows of every expert of the layer.
    """

    def forward(self, experts: nn.Module, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """``x [N, d]`` sorted by expert, ``tokens_per_expert [E]`` -> ``[N, d]``."""
        return experts(x, tokens_per_expert)
