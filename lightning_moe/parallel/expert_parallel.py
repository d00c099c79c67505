"""Expert parallelism (EP): each rank of the ``ep`` mesh holds ``E / ep`` of every MoE layer's experts.

Token rows travel to the rank owning their expert and back with two all-to-alls per layer::

    x_sorted [N, d] (rows grouped by global expert)            on every ep rank
      -> counts all-to-all: tokens_per_expert [E] -> received counts [ep(src), E_local]
      -> dispatch all-to-all (uneven splits)      -> [M, d] grouped by (source rank, local expert)
      -> re-order to (local expert, source rank)  -> experts on the local shard -> undo the re-order
      -> combine all-to-all (the inverse splits)  -> y_sorted [N, d] in the input's row order

The layer's ``token_dispatcher`` becomes an :class:`AllToAllTokenDispatcher` that runs these steps; the
experts module keeps its FQNs and its forward contract, only its parameters become DTensors ``Shard(0)``
over ``ep`` (rank ``r`` holds global experts ``r*E/ep .. (r+1)*E/ep - 1``), read inside the experts
through ``local_tensor``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_moe.moe import MoE, TokenDispatcher
from lightning_moe.parallel.discovery import find_moe_layers

__all__ = [
    "AllToAll",
    "dispatch_tokens",
    "combine_tokens",
    "exchange_counts",
    "source_major_to_expert_major",
    "AllToAllTokenDispatcher",
    "apply_expert_parallel",
    "is_expert_parallel",
    "local_expert_range",
]


class AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` over dim 0 with uneven splits.

    Forward sends ``input_splits[j]`` rows to rank ``j`` and receives ``output_splits[i]`` rows from
    rank ``i``; backward is the same exchange with the splits swapped (each gradient row goes back to
    where its row came from).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
    ) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad_input = _all_to_all(grad_output, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_input, None, None, None


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    x = x.contiguous()  # [sum(input_splits), ...]
    out = x.new_empty((sum(output_splits), *x.shape[1:]))  # [sum(output_splits), ...]
    dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits, group=group)
    return out


def dispatch_tokens(x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Send ``send_splits[j]`` rows of ``x`` to rank ``j``; returns the ``sum(recv_splits)`` rows received."""
    return AllToAll.apply(x, recv_splits, send_splits, group)


def combine_tokens(y: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Inverse of :func:`dispatch_tokens` called with the same splits: rows go back to their source."""
    return AllToAll.apply(y, send_splits, recv_splits, group)


def exchange_counts(tokens_per_expert: Tensor, group: dist.ProcessGroup) -> Tensor:
    """One small all-to-all of the ``[E]`` counts: returns ``[ep, E_local]``, row ``i`` = what rank ``i``
    sends to each of this rank's local experts."""
    ep = dist.get_world_size(group)
    counts = tokens_per_expert.to(torch.long).contiguous()  # [E]
    received = torch.empty_like(counts)  # [E] = [ep(src) * E_local]
    dist.all_to_all_single(received, counts, group=group)
    return received.view(ep, -1)  # [ep, E_local]


def source_major_to_expert_major(counts: Tensor, num_rows: int) -> Tensor:
    """Row permutation from (source rank, local expert) order to (local expert, source rank) order.

    Args:
        counts: ``[ep, E_local]`` rows of block (source ``i``, expert ``j``), blocks laid out row-major.
        num_rows: ``counts.sum()`` (given so that no host synchronisation is needed).

    Returns:
        ``perm [num_rows]`` long with ``expert_major = source_major[perm]``.
    """
    flat = counts.reshape(-1)  # [ep*E_local], source-major
    src_start = (torch.cumsum(flat, 0) - flat).view_as(counts)  # [ep, E_local] start of each block
    sizes = counts.t().reshape(-1)  # [E_local*ep], expert-major
    starts = src_start.t().reshape(-1)  # [E_local*ep] where each expert-major block starts in the input
    dst_start = torch.cumsum(sizes, 0) - sizes  # [E_local*ep] where it starts in the output
    offset = torch.repeat_interleave(starts - dst_start, sizes, output_size=num_rows)  # [num_rows]
    return offset + torch.arange(num_rows, device=counts.device)


def _inverse_permutation(perm: Tensor) -> Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class AllToAllTokenDispatcher(TokenDispatcher):
    """The token dispatcher of an expert-parallel MoE layer (see the module docstring).

    Sends each row to the ``ep`` rank holding its expert, runs the experts on the local shard with local
    counts, and sends the outputs back, in the input's row order.
    """

    def __init__(self, num_experts: int, ep_mesh: DeviceMesh) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ep_mesh = ep_mesh

    def forward(self, experts: nn.Module, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """``x [N, d]`` sorted by global expert, ``tokens_per_expert [E]`` -> ``[N, d]``."""
        group = self.ep_mesh.get_group()
        ep = self.ep_mesh.size()
        if tokens_per_expert.numel() != self.num_experts:
            raise ValueError(
                f"tokens_per_expert has {tokens_per_expert.numel()} entries; the expert-parallel experts "
                f"expect one per global expert ({self.num_experts})"
            )
        recv_counts = exchange_counts(tokens_per_expert, group)  # [ep, E_local]
        # The only host synchronisation: the split sizes, agreed by both sides of every exchange.
        splits = torch.stack([tokens_per_expert.to(torch.long).view(ep, -1).sum(1), recv_counts.sum(1)])  # [2, ep]
        send_splits, recv_splits = splits.tolist()
        num_recv = int(sum(recv_splits))
        x_recv = dispatch_tokens(x, send_splits, recv_splits, group)  # [M, d] by (source, expert)
        local_counts = recv_counts.sum(0)  # [E_local]
        if recv_counts.shape[1] > 1:
            perm = source_major_to_expert_major(recv_counts, num_recv)  # [M]
            x_local = x_recv.index_select(0, perm)  # [M, d] by (expert, source)
        else:
            perm = None
            x_local = x_recv
        # With zero rows received the experts' output still depends on x_local and their parameters (their
        # contract), so this rank joins the backward all-to-all and gradient reduction of its peers.
        y_local = experts(x_local, local_counts)  # [M, d]
        y_recv = y_local if perm is None else y_local.index_select(0, _inverse_permutation(perm))  # [M, d]
        return combine_tokens(y_recv, send_splits, recv_splits, group)  # [N, d]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep={self.ep_mesh.size()}"


def is_expert_parallel(layer: MoE) -> bool:
    """Whether :func:`apply_expert_parallel` made this MoE layer expert-parallel."""
    dispatcher: nn.Module | None = layer.token_dispatcher
    while dispatcher is not None:  # the tensor-parallel row split wraps the all-to-all
        if isinstance(dispatcher, AllToAllTokenDispatcher):
            return True
        dispatcher = getattr(dispatcher, "inner", None)
    return False


def _shard_experts_(experts: nn.Module, num_experts: int, ep_mesh: DeviceMesh) -> None:
    ep = ep_mesh.size()
    for module_name, module in experts.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            fqn = f"{module_name}.{name}" if module_name else name
            if isinstance(param, DTensor):
                raise ValueError(f"experts parameter {fqn!r} is already a DTensor; apply expert parallelism first")
            if param.ndim == 0 or param.shape[0] != num_experts:
                raise ValueError(
                    f"experts parameter {fqn!r} has shape {tuple(param.shape)}; expert parallelism needs the "
                    f"expert dimension first ([{num_experts}, ...], see docs/INTERFACES.md)"
                )
            if param.is_meta:
                # No data to scatter: build the local shard directly.
                rank = ep_mesh.get_local_rank()
                local = param.detach().chunk(ep, dim=0)[rank]
                sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            else:
                # Scattered from the first ep rank, so every rank starts from the same experts.
                sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Shard every MoE layer's experts over ``ep_mesh`` and route tokens with all-to-alls.

    Args:
        model: any module containing :class:`lightning_moe.moe.MoE` layers (changed in place).
        ep_mesh: the 1-D ``ep`` mesh. Size 1: nothing changes.

    Returns:
        ``model``.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh must be the 1-D 'ep' mesh, got a {ep_mesh.ndim}-D mesh; pass submesh(mesh, 'ep')")
    ep = ep_mesh.size()
    if ep == 1:
        return model
    for name, layer in find_moe_layers(model):
        experts = layer.experts
        if is_expert_parallel(layer):
            raise ValueError(f"MoE layer {name!r} is already expert-parallel; apply_expert_parallel once")
        if layer.num_experts % ep != 0:
            raise ValueError(
                f"expert_parallel_size={ep} does not divide num_experts={layer.num_experts} of MoE layer {name!r}; "
                f"use a size dividing every layer's expert count"
            )
        _shard_experts_(experts, layer.num_experts, ep_mesh)
        layer.token_dispatcher = AllToAllTokenDispatcher(layer.num_experts, ep_mesh)
    return model


def local_expert_range(num_experts: int, ep_mesh: DeviceMesh | None) -> range:
    """Global indices of the experts this rank holds."""
    if ep_mesh is None or ep_mesh.size() == 1:
        return range(num_experts)
    per_rank = num_experts // ep_mesh.size()
    start = ep_mesh.get_local_rank() * per_rank
    return range(start, start + per_rank)
