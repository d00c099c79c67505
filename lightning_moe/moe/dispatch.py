"""From router choices to expert-sorted token rows and back, by index (no one-hot dispatch tensors).

A *dispatch plan* lists the kept (token, expert) assignments grouped by expert. Permuting is one
``index_select`` of token rows, un-permuting one ``index_add_`` of weighted expert outputs: O(T k d)
memory traffic whatever the number of experts, and only the rows actually routed are computed.

Host synchronisation (CUDA): planning reads at most one small tensor back to the host per call, and
never one per expert. Group sizes come from a binary search in the sorted expert ids (a CUDA
``bincount`` would read the largest id back), and the kept assignments are compacted with a scatter
once their number is known. That number is the one read: with capacity it is the output size; with
padding the real-assignment count travels with it; dropless routing without padding reads nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["compute_capacity", "DispatchPlan", "plan_dispatch", "permute_tokens", "unpermute_tokens"]


def compute_capacity(
    num_tokens: int | Tensor, num_experts: int, k: int, capacity_factor: float, min_capacity: int
) -> int | Tensor:
    """Assignments one expert may take: ``max(min_capacity, ceil(k * num_tokens * capacity_factor / E))``.

    ``num_tokens`` may be a 0-dim integer tensor (the real tokens of a padded batch, counted on the device):
    the capacity is then a 0-dim long tensor computed with the same float64 operations, so no host read is
    needed to know it.
    """
    if isinstance(num_tokens, Tensor):
        share = (num_tokens * k).to(torch.float64) * capacity_factor / num_experts
        return torch.ceil(share).long().clamp_min(int(min_capacity))
    return max(int(min_capacity), math.ceil(k * num_tokens * capacity_factor / num_experts))


@dataclass
class DispatchPlan:
    """Kept assignments, grouped by expert.

    Attributes:
        token_index: ``[M]`` long, the source token of each kept assignment (rows of expert 0 first).
        combine_weight: ``[M]`` the router weight of each kept assignment (differentiable).
        tokens_per_expert: ``[E]`` long, kept assignments per expert (sums to ``M``).
        routed_per_expert: ``[E]`` long, assignments per expert before capacity (padding excluded).
        num_assignments: routed assignments before capacity (``k`` x non-padding tokens).
    """

    token_index: Tensor
    combine_weight: Tensor
    tokens_per_expert: Tensor
    routed_per_expert: Tensor
    num_assignments: int


def plan_dispatch(
    expert_index: Tensor,
    expert_weight: Tensor,
    num_experts: int,
    capacity: int | Tensor | None,
    valid: Tensor | None = None,
    random_priority: bool = False,
    priority_score: Tensor | None = None,
) -> DispatchPlan:
    """Group the ``[T, k]`` router choices by expert, keeping at most ``capacity`` per expert.

    Priority for capacity: every token's first choice before any second choice (and so on); within one
    choice rank, token order, or a random order when ``random_priority`` (Random Token Selection), so
    that capacity does not always favour the start of the batch; or, with ``priority_score``, the highest
    scores first.

    Args:
        expert_index: ``[T, k]`` chosen experts.
        expert_weight: ``[T, k]`` their combine weights.
        num_experts: E.
        capacity: the per-expert limit (an int or a 0-dim tensor), or None for dropless routing.
        valid: ``[T]`` bool, False for padding tokens (never routed); None when all are real.
        random_priority: Random Token Selection.
        priority_score: ``[T, k]``; when given, each expert keeps its assignments with the highest score
            (drop policy ``"probs"``), whatever their choice rank; ties keep the positional order. Overrides
            ``random_priority``.
    """
    num_tokens, k = expert_index.shape
    device = expert_index.device
    num_slots = num_tokens * k
    # Assignment a = c * T + t is choice c of token t ("choice-major"), so first choices come first.
    flat_expert = expert_index.t().reshape(-1)  # [k*T]
    flat_weight = expert_weight.t().reshape(-1)  # [k*T]
    if valid is not None:
        # Padding gets the sentinel expert id E: it sorts after every real expert and is never kept.
        flat_expert = torch.where(valid.repeat(k), flat_expert, torch.full_like(flat_expert, num_experts))

    if priority_score is not None:
        flat_score = priority_score.detach().t().reshape(-1)  # [k*T], choice-major like flat_expert
        priority = torch.sort(flat_score, descending=True, stable=True).indices  # [k*T] assignment ids
        expert_by_priority = flat_expert[priority]
    elif random_priority:
        token_order = torch.randperm(num_tokens, device=device)  # [T]
        choice_offset = torch.arange(k, device=device).unsqueeze(1) * num_tokens  # [k, 1]
        priority = (choice_offset + token_order.unsqueeze(0)).reshape(-1)  # [k*T] assignment ids by priority
        expert_by_priority = flat_expert[priority]
    else:
        priority = None
        expert_by_priority = flat_expert

    # A stable sort groups assignments by expert and keeps the priority order inside each group.
    sorted_expert, sort_order = torch.sort(expert_by_priority, stable=True)  # [k*T]
    assignment = sort_order if priority is None else priority[sort_order]  # [k*T] assignment ids

    # Group boundaries by binary search in the sorted ids: no host synchronisation (a CUDA bincount
    # reads the maximum id back to the host) and no data-dependent output shape under torch.compile.
    ids = torch.arange(num_experts + 2, device=device, dtype=sorted_expert.dtype)  # experts + sentinel + end
    group_start = torch.searchsorted(sorted_expert, ids)  # [E+2]; group_start[E] = real assignments
    routed = group_start[1 : num_experts + 1] - group_start[:num_experts]  # [E]
    if capacity is None:
        kept_per_expert = routed
        if valid is None:
            num_assignments = num_slots
            kept = assignment
        else:
            # Real assignments form a prefix of the sorted list (padding sorts last): one host read.
            num_assignments = int(group_start[num_experts])
            kept = assignment[:num_assignments]
    else:
        kept_per_expert = routed.clamp(max=capacity)
        position = torch.arange(num_slots, device=device) - group_start[sorted_expert]  # rank inside its group
        keep = position < capacity  # [k*T]
        if valid is None:
            num_assignments = num_slots
            num_kept = int(kept_per_expert.sum())  # the one host read of the layer: the output size
        else:
            keep &= sorted_expert < num_experts  # the padding sentinel is never kept
            # Both sizes in one host read.
            num_kept, num_assignments = torch.stack([kept_per_expert.sum(), group_start[num_experts]]).tolist()
        kept = _stable_compact(assignment, keep, num_kept)
    return DispatchPlan(
        token_index=kept % num_tokens,
        combine_weight=flat_weight[kept],
        tokens_per_expert=kept_per_expert,
        routed_per_expert=routed,
        num_assignments=num_assignments,
    )


def _stable_compact(values: Tensor, keep: Tensor, num_kept: int) -> Tensor:
    """``values[keep]`` (order kept) given ``num_kept = keep.sum()``, without a further host synchronisation.

    A stable partition: kept entries go to ``0 .. num_kept-1``, the others after them, each in order.
    Every destination is distinct, so the scatter is deterministic.
    """
    kept_rank = torch.cumsum(keep, dim=0) - 1  # [n] destination of a kept entry
    dropped_rank = num_kept + torch.cumsum(~keep, dim=0) - 1  # [n] destination of a dropped entry
    destination = torch.where(keep, kept_rank, dropped_rank)
    return torch.empty_like(values).scatter_(0, destination, values)[:num_kept]


def permute_tokens(x: Tensor, plan: DispatchPlan) -> Tensor:
    """``x [T, d]`` -> expert-sorted rows ``[M, d]``."""
    return x.index_select(0, plan.token_index)


def unpermute_tokens(expert_out: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weighted sum of each token's expert outputs: ``[M, d]`` -> ``[T, d]`` (dropped tokens get 0)."""
    weighted = expert_out * plan.combine_weight.to(expert_out.dtype).unsqueeze(-1)  # [M, d]
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])  # [T, d]
    return out.index_add_(0, plan.token_index, weighted)
