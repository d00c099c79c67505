"""Top-k router: gate logits in fp32, noisy gating, load-balancing and z-losses, router statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NOISY_GATE_POLICIES", "normalize_noisy_gate_policy", "RouterOutput", "TopKRouter", "router_losses"]

NOISY_GATE_POLICIES = (None, "jitter", "rsample")


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
        probs: ``[T, E]`` fp32 softmax of ``logits``.
        expert_index: ``[T, k]`` chosen experts, best first.
        expert_weight: ``[T, k]`` fp32 combine weights of the chosen experts (differentiable).
    """

    logits: Tensor
    probs: Tensor
    expert_index: Tensor
    expert_weight: Tensor


class TopKRouter(nn.Module):
    """Linear gate ``x -> logits [E]`` followed by a top-k choice.

    The gate is computed in fp32 whatever the model's dtype: routing decisions are sensitive to
    rounding, and the softmax over experts is cheap.

    Args:
        hidden_size: model width d.
        num_experts: E.
        k: experts per token.
        noisy_gate_policy: ``None``; ``"jitter"`` multiplies the router input by ``U(1-eps, 1+eps)``;
            ``"rsample"`` adds Gumbel noise to the logits used for the *choice* (weights stay the clean
            softmax). Noise applies in training only.
        noise_eps: the jitter amplitude.
        normalize_weights: rescale the k chosen probabilities to sum to 1 (default: when ``k > 1``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int,
        noisy_gate_policy: str | None = None,
        noise_eps: float = 1e-2,
        normalize_weights: bool | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.noisy_gate_policy = normalize_noisy_gate_policy(noisy_gate_policy)
        self.noise_eps = noise_eps
        self.normalize_weights = (k > 1) if normalize_weights is None else normalize_weights
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # [E, d]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, x: Tensor) -> RouterOutput:
        """``x [T, d]`` -> :class:`RouterOutput`."""
        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        x32 = x.to(gate_dtype)
        if self.training and self.noisy_gate_policy == "jitter":
            noise = torch.empty_like(x32).uniform_(1.0 - self.noise_eps, 1.0 + self.noise_eps)
            x32 = x32 * noise
        # Autocast (bf16-mixed) would run the gate in bf16: routing stays in fp32 whatever the precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x32, self.weight.to(gate_dtype))  # [T, E] fp32 (at least)
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        if self.training and self.noisy_gate_policy == "rsample":
            gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(1e-20, 1.0 - 1e-7)))
            expert_index = torch.topk(logits + gumbel, self.k, dim=-1).indices  # [T, k]
            expert_weight = probs.gather(-1, expert_index)  # [T, k]
        else:
            expert_weight, expert_index = torch.topk(probs, self.k, dim=-1)  # [T, k]
        if self.normalize_weights:
            expert_weight = expert_weight / expert_weight.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        return RouterOutput(logits, probs, expert_index, expert_weight)


def router_losses(
    router: RouterOutput, routed_per_expert: Tensor, valid: Tensor | None, k: int
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

    Returns:
        ``(balance, z_loss, entropy)``, fp32 scalars (entropy detached).
    """
    logits, probs = router.logits, router.probs  # [T, E]
    num_experts = probs.shape[-1]
    if valid is None:
        num_valid = torch.full((), float(probs.shape[0]), dtype=probs.dtype, device=probs.device)  # no host copy
        mean_probs = probs.mean(dim=0)  # [E]
        z = torch.logsumexp(logits, dim=-1).square().mean()
        token_entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # [T]
        entropy = token_entropy.mean()
    else:
        weight = valid.to(probs.dtype)  # [T]
        num_valid = weight.sum().clamp_min(1.0)
        mean_probs = (probs * weight.unsqueeze(-1)).sum(dim=0) / num_valid  # [E]
        z = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / num_valid
        token_entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # [T]
        entropy = (token_entropy * weight).sum() / num_valid
    fraction_routed = routed_per_expert.to(probs.dtype) / (num_valid * k)  # [E]
    balance = num_experts * torch.sum(fraction_routed * mean_probs)
    return balance, z, entropy.detach()
