"""The seam through which the load-balancing statistics of an MoE layer may be summed over ranks.

The balance loss ``E * sum_e f_e * P_e`` multiplies two batch means (the fraction of assignments routed
to expert ``e`` and its mean router probability), so the mean of per-rank losses is not the loss of the
whole batch. With ``aux_loss_scope="global"`` the layer hands its per-expert sums to its
``balance_statistics`` module before forming the loss; the default :class:`BalanceStatistics` returns them
unchanged (this process is the whole batch), and ``lightning_moe.parallel`` swaps in one that sums them
over the data-parallel group, so the loss equals the single-process value. Like the token dispatcher, it
holds no parameters or buffers: swapping it leaves the state_dict keys unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["AUX_LOSS_SCOPES", "BalanceStatistics"]

AUX_LOSS_SCOPES = ("local", "global")
"""``local``: each rank's balance loss reads its own tokens; ``global``: the statistics of every data-parallel
rank (the single-process value)."""


class BalanceStatistics(nn.Module):
    """Identity: the statistics of this process are those of the whole batch.

    Subclasses keep the contract: ``forward(routed, prob_sum, num_tokens)`` returns the same three values
    summed over the ranks whose tokens form the batch. ``prob_sum`` must stay differentiable with respect
    to this rank's router, with gradients scaled so that the data-parallel *average* of gradients is the
    gradient of the global loss.
    """

    def forward(self, routed: Tensor, prob_sum: Tensor, num_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``routed [E]`` assignments per expert, ``prob_sum [E]`` summed router probabilities,
        ``num_tokens`` 0-dim real-token count -> the same, over every rank."""
        return routed, prob_sum, num_tokens
