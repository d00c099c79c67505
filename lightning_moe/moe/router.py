"""Top-k router: gate logits in fp32, noisy gating, load-balancing and z-losses, router statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NOISY_GATE_POLICIES",
    "SCORE_FUNCS",
    "normalize_noisy_gate_policy",
    "RouterOutput",
    "TopKRouter",
    "router_losses",
    "check_score_func",
]

NOISY_GATE_POLICIES = (None, "jitter", "rsample")

SCORE_FUNCS = ("softmax", "sigmoid")
"""How the router turns logits into expert scores: a softmax over experts, or an independent sigmoid per
expert (DeepSeek-V3)."""


def check_score_func(score_func: str) -> None:
    """Raise a one-line ``ValueError`` unless ``score_func`` is one of :data:`SCORE_FUNCS`."""
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func={score_func!r} is not supported; use one of {list(SCORE_FUNCS)}")


def normalize_noisy_gate_policy(policy: str | None) -> str | None:
    """Accept DeepSpeed's spellings (``"Jitter"``, ``"RSample"``, ``"None"``) as well as lower case."""
    if policy is None:
        return None
    if not isinstance(policy, str) or policy.lower() not in ("none", "jitter", "rsample"):
        raise ValueError(f"noisy_gate_policy={policy!r} is not supported; use one of None, 'jitter', 'rsample'")
    lowered = policy.lower()
    return None if lowered == "none" else lowered


@dataclass
class RouterOutput:
    """What the router decided for ``T`` tokens.

    Attributes:
        logits: ``[T, E]`` fp32 gate logits (without selection noise).
        probs: ``[T, E]`` fp32 router distribution: the softmax of ``logits``, or with ``score_func="sigmoid"``
            the sigmoid scores normalised to sum to 1 (what the balance loss and the entropy read).
        expert_index: ``[T, k]`` chosen experts, best first.
        expert_weight: ``[T, k]`` fp32 combine weights of the chosen experts (differentiable).
    """

    logits: Tensor
    probs: Tensor
    expert_index: Tensor
    expert_weight: Tensor


class TopKRouter(nn.Module):
    """Linear gate ``x -> logits [E]`` followed by a top-k choice.

    By default the gate's product is computed in fp32 whatever the model's dtype (``fp32_gating``, as DeepSpeed
    does): routing decisions are sensitive to rounding. The softmax (or sigmoid), the choice and the losses
    are in fp32 either way.

    Args:
        hidden_size: model width d.
        num_experts: E.
        k: experts per token.
        noisy_gate_policy: ``None``; ``"jitter"`` multiplies the router input by ``U(1-eps, 1+eps)``;
            ``"rsample"`` adds Gumbel noise to the logits used for the *choice* (weights stay the clean
            softmax). Noise applies in training only.
        noise_eps: the jitter amplitude.
        normalize_weights: rescale the k chosen probabilities to sum to 1 (default: when ``k > 1``).
        score_func: ``"softmax"`` (scores are the softmax over experts) or ``"sigmoid"`` (each expert's score
            is ``sigmoid(logit)``, as in DeepSeek-V3).
        bias_update_rate: > 0 enables aux-loss-free balancing: a per-expert ``expert_bias`` buffer ``[E]`` is
            added to the scores for the *choice* of experts only (the combine weights stay the clean scores).
            The bias is moved by :meth:`update_bias` after each optimizer step; 0 = no bias (no buffer).
        fp32_gating: the gate's ``x @ W^T`` in fp32 (True) or in the compute dtype (False: bf16 under bf16
            autocast, like the model's other products; a bf16 model's own dtype without autocast).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int,
        noisy_gate_policy: str | None = None,
        noise_eps: float = 1e-2,
        normalize_weights: bool | None = None,
        score_func: str = "softmax",
        bias_update_rate: float = 0.0,
        fp32_gating: bool = True,
    ) -> None:
        super().__init__()
        check_score_func(score_func)
        self.fp32_gating = bool(fp32_gating)
        if not bias_update_rate >= 0:
            raise ValueError(f"router_bias_update_rate={bias_update_rate!r} must be >= 0 (0 disables the bias)")
        self.num_experts = num_experts
        self.score_func = score_func
        self.bias_update_rate = float(bias_update_rate)
        self.k = k
        self.noisy_gate_policy = normalize_noisy_gate_policy(noisy_gate_policy)
        self.noise_eps = noise_eps
        self.normalize_weights = (k > 1) if normalize_weights is None else normalize_weights
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # [E, d]
        self.expert_bias: Tensor | None
        if self.bias_update_rate > 0:
            # A buffer, not a parameter: no gradient, moved by update_bias; saved and restored with checkpoints.
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))  # [E]
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)
        if self.expert_bias is not None:
            nn.init.zeros_(self.expert_bias)

    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """Aux-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``.

        Args:
            load: ``[E]`` tokens routed to each expert since the last update, counted over every
                data-parallel rank (any common scale works: only the sign of the difference is used).
        """
        if self.expert_bias is None:
            raise ValueError("update_bias needs router_bias_update_rate > 0")
        load = load.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_update_rate)

    def forward(self, x: Tensor) -> RouterOutput:
        """``x [T, d]`` -> :class:`RouterOutput`."""
        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        gate_input = x.to(gate_dtype) if self.fp32_gating else x
        if self.training and self.noisy_gate_policy == "jitter":
            noise = torch.empty_like(gate_input).uniform_(1.0 - self.noise_eps, 1.0 + self.noise_eps)
            gate_input = gate_input * noise
        if self.fp32_gating:
            # Autocast (bf16-mixed) would run the gate in bf16: here it stays in fp32 whatever the precision.
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = F.linear(gate_input, self.weight.to(gate_dtype))  # [T, E] fp32 (at least)
        else:
            logits = F.linear(gate_input, self.weight).to(gate_dtype)  # [T, E]: product in the compute dtype
        scores, probs = self._scores(logits)  # [T, E] each
        choice_logits = logits
        if self.training and self.noisy_gate_policy == "rsample":
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0 - 1e-7)))
            choice_logits = logits + gumbel
        if self.expert_bias is None and choice_logits is logits:
            expert_weight, expert_index = torch.topk(scores, self.k, dim=-1)  # [T, k]
        else:
            # Noise and the balancing bias steer the choice only; the weights stay the clean scores. The bias
            # is added to the scores, not the logits (DeepSeek-V3).
            choice = choice_logits  # [T, E]
            if self.expert_bias is not None:
                noisy_scores = scores if choice_logits is logits else self._scores(choice_logits)[0]
                choice = noisy_scores + self.expert_bias.to(noisy_scores.dtype)
            expert_index = torch.topk(choice, self.k, dim=-1).indices  # [T, k]
            expert_weight = scores.gather(-1, expert_index)  # [T, k]
        if self.normalize_weights:
            expert_weight = expert_weight / expert_weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        return RouterOutput(logits, probs, expert_index, expert_weight)

    def _scores(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``logits [T, E]`` -> ``(scores, probs)``: the combine scores and the router distribution."""
        if self.score_func == "softmax":
            probs = torch.softmax(logits, dim=-1)
            return probs, probs
        scores = torch.sigmoid(logits)  # independent per expert
        return scores, scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, score_func={self.score_func!r}, "
            f"bias_update_rate={self.bias_update_rate}, fp32_gating={self.fp32_gating}"
        )


def router_losses(
    router: RouterOutput,
    routed_per_expert: Tensor,
    valid: Tensor | None,
    k: int,
    statistics: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Load-balancing loss, router z-loss and mean router entropy over the non-padding tokens.

    * balance (Switch/GShard form): ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of routed
      assignments that chose expert ``e`` (before capacity) and ``P_e`` the mean router probability of
      ``e``. It is 1 for a perfectly uniform router and grows with imbalance.
    * z-loss (ST-MoE): mean of ``logsumexp(logits)^2``, keeps the logits small.

    Args:
        router: the router output for ``T`` tokens.
        routed_per_expert: ``[E]`` assignments per expert before capacity (padding excluded).
        valid: ``[T]`` bool, False for padding; None when every token is real.
        k: experts per token.
        statistics: maps this batch's ``(routed [E], prob_sum [E], num_tokens)`` to those of the whole
            data-parallel batch (see :mod:`lightning_moe.moe.balance`); None = this batch only.

    Returns:
        ``(balance, z_loss, entropy)``, fp32 scalars (entropy detached).
    """
    logits, probs = router.logits, router.probs  # [T, E]
    num_experts = probs.shape[-1]
    token_entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # [T]
    if valid is None:
        num_valid = torch.full((), float(probs.shape[0]), dtype=probs.dtype, device=probs.device)  # no host copy
        prob_sum = probs.sum(dim=0)  # [E]
        z = torch.logsumexp(logits, dim=-1).square().mean()
        entropy = token_entropy.mean()
    else:
        weight = valid.to(probs.dtype)  # [T]
        num_valid = weight.sum()
        prob_sum = (probs * weight.unsqueeze(-1)).sum(dim=0)  # [E]
        z = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / num_valid.clamp_min(1.0)
        entropy = (token_entropy * weight).sum() / num_valid.clamp_min(1.0)
    routed = routed_per_expert
    if statistics is not None:
        routed, prob_sum, num_valid = statistics(routed, prob_sum, num_valid)
    num_valid = num_valid.clamp_min(1.0)
    mean_probs = prob_sum / num_valid  # [E]
    fraction_routed = routed.to(probs.dtype) / (num_valid * k)  # [E]
    balance = num_experts * torch.sum(fraction_routed * mean_probs)
    return balance, z, entropy.detach()
