"""Tensor (model) parallelism over the ``tp`` mesh axis: dense layers split, expert tokens de-duplicated.

Dense layers
    The model describes which of its layers split how, as plain data: a module may carry a
    ``tensor_parallel_plan`` (a ``dict`` or a property returning one) mapping a child's attribute name to
    a style name (:data:`TP_STYLES`). :func:`apply_tensor_parallel` turns those names into DTensor
    parallel styles on the ``tp`` mesh (Megatron's layout):

    ===============  ===================================================================================
    ``"colwise"``    ``nn.Linear`` split on its output features (``weight`` / ``bias`` ``Shard(0)``);
                     input replicated, output the local slice ``[..., out/tp]`` (q/k/v, ``fc1``, ``fc3``)
    ``"rowwise"``    ``nn.Linear`` split on its input features (``weight`` ``Shard(1)``, bias
                     replicated); input the local slice, output all-reduced (``out_proj``, ``fc2``)
    ``"embedding"``  ``nn.Embedding`` split over the vocabulary (``Shard(0)``); every rank looks up the
                     ids it holds, the rows are all-reduced
    ``"head"``       output ``nn.Linear`` split over the vocabulary (``Shard(0)``), logits all-gathered
    ``"tied_head"``  a parameter-free module projecting onto an embedding's table (its ``embedding``
                     attribute, which the plan must mark ``"embedding"``): the input becomes a
                     replicated DTensor, ``F.linear`` with the vocabulary-split table gives logits split
                     over the vocabulary (``Shard(-1)``), which are all-gathered
    ===============  ===================================================================================

    Everything else (norms, routers, biases of row-wise layers) is replicated over ``tp``. Attention
    with its q/k/v split column-wise holds ``num_heads / tp`` heads per rank; the attention code infers
    the local head count from the projected width. Activations between the split layers are replicated,
    so norms and dropout run the same computation on every ``tp`` rank: :func:`sync_rng_over_tp` gives the
    ``tp`` ranks one random stream, so dropout masks, router noise and random token selection agree.

Experts (:func:`apply_expert_token_split`)
    Experts are not split. The MoE layer's input is replicated over ``tp``, so every ``tp`` rank routes the
    same tokens to the same experts; each one then hands only its ``1/tp`` share of the expert-sorted rows
    to the experts (and to the expert-parallel all-to-all when ``ep > 1``), and one all-gather over ``tp``
    restores every row afterwards (DeepSpeed-MoE's token de-duplication). Why this instead of splitting
    each expert's FFN over ``tp``:

    * exact with any experts module: the experts' contract (rows sorted by expert + ``[E]`` counts) is
      unchanged, no bias is added ``tp`` times, user-module experts work;
    * the all-to-all carries ``1/tp`` of the rows instead of all of them on every ``tp`` rank;
    * the expert weights still get ``1/tp`` of the memory per rank: ZeRO shards them over
      ``efsdp x tp`` (:func:`lightning_moe.parallel.dims.expert_shard_mesh`), whose gradient reduction is
      also where the ``tp`` ranks' partial expert gradients (each from its share of the rows) are summed.

    Routing, capacity and aux losses are computed on the full (replicated) token set, so they equal the
    ``tp = 1`` values.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInputOutput,
    RowwiseParallel,
    parallelize_module,
)

from lightning_moe.moe import TokenDispatcher
from lightning_moe.parallel.discovery import find_moe_layers

__all__ = [
    "TP_STYLES",
    "tensor_parallel_plan",
    "apply_tensor_parallel",
    "apply_expert_token_split",
    "TokenSplitDispatcher",
    "sync_rng_over_tp",
    "row_split_sizes",
]

TP_STYLES = ("colwise", "rowwise", "embedding", "head", "tied_head")
"""Style names a model's ``tensor_parallel_plan`` may use (see the module docstring)."""

_PLAN_ATTR = "tensor_parallel_plan"


def _style(name: str) -> ParallelStyle:
    if name == "colwise":
        return ColwiseParallel()
    if name == "rowwise":
        return RowwiseParallel()
    if name == "embedding":
        return RowwiseParallel(input_layouts=Replicate())
    if name == "head":
        return ColwiseParallel(output_layouts=Replicate())
    if name == "tied_head":
        # No parameter of its own: only the layouts around F.linear(x, table [V/tp, D] on this rank).
        return PrepareModuleInputOutput(
            input_layouts=(Replicate(),),
            desired_input_layouts=(Replicate(),),
            use_local_input=False,  # a DTensor input, so F.linear meets the DTensor table
            output_layouts=(Shard(-1),),  # logits [..., V/tp]
            desired_output_layouts=(Replicate(),),  # all-gathered: [..., V]
            use_local_output=True,
        )
    raise ValueError(f"tensor-parallel style {name!r} is unknown; use one of {list(TP_STYLES)}")


def tensor_parallel_plan(model: nn.Module) -> dict[str, str]:
    """The fully qualified name -> style name of every layer the model's ``tensor_parallel_plan`` s name.

    Children that are ``None`` (e.g. the ``fc3`` of a non-GLU FFN) are skipped.
    """
    plan: dict[str, str] = {}
    for prefix, module in model.named_modules():
        local: Mapping[str, str] | None = getattr(module, _PLAN_ATTR, None)
        if not local:
            continue
        for child_name, style in local.items():
            if style not in TP_STYLES:
                raise ValueError(
                    f"{type(module).__name__}.{_PLAN_ATTR}[{child_name!r}]={style!r} is not a tensor-parallel "
                    f"style; use one of {list(TP_STYLES)}"
                )
            if getattr(module, child_name, None) is None:
                continue
            plan[f"{prefix}.{child_name}" if prefix else child_name] = style
    return plan


def _check_tied_head(model: nn.Module, plan: Mapping[str, str], fqn: str, head: nn.Module) -> None:
    """A ``"tied_head"`` must name (``embedding``) an ``nn.Embedding`` of the model that the plan splits."""
    embedding = getattr(head, "embedding", None)
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"{fqn!r} is marked 'tied_head' but has no `embedding` attribute holding the nn.Embedding it projects onto"
        )
    names = [name for name, module in model.named_modules() if module is embedding]
    if not names or plan.get(names[0]) != "embedding":
        raise ValueError(
            f"{fqn!r} is marked 'tied_head' but its embedding {names[0] if names else '(outside the model)'!r} is "
            f"not marked 'embedding' in the tensor_parallel_plan: the tied table must be split over the vocabulary"
        )


def _check_divisible(model: nn.Module, plan: Mapping[str, str], tp: int) -> None:
    """Every split dimension must divide by ``tp``; attention heads too (``num_heads`` attribute)."""
    for fqn, style in plan.items():
        layer = model.get_submodule(fqn)
        if style == "tied_head":
            _check_tied_head(model, plan, fqn, layer)  # its table is checked as an "embedding"
            continue
        if style in ("colwise", "rowwise", "head") and not isinstance(layer, nn.Linear):
            raise ValueError(f"{fqn!r} is marked {style!r} but is a {type(layer).__name__}, not an nn.Linear")
        if style == "embedding" and not isinstance(layer, nn.Embedding):
            raise ValueError(f"{fqn!r} is marked 'embedding' but is a {type(layer).__name__}, not an nn.Embedding")
        if style in ("colwise", "head"):
            size, what = layer.out_features, "output features"
        elif style == "rowwise":
            size, what = layer.in_features, "input features"
        else:
            size, what = layer.num_embeddings, "vocabulary rows"
        if size % tp != 0:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide the {size} {what} of {fqn!r} ({style}); "
                f"use a tensor_parallel_size dividing the model's widths (heads, FFN hidden size, vocabulary)"
            )
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None)
        if isinstance(heads, int) and getattr(module, _PLAN_ATTR, None) and heads % tp != 0:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide num_heads={heads} of {name or 'the model'!r}; "
                f"use a tensor_parallel_size dividing the number of attention heads"
            )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Split the layers named by the model's ``tensor_parallel_plan`` s over ``tp_mesh`` (in place).

    Parameter names do not change; split parameters become DTensors over ``tp``. Also gives every ``tp``
    rank the same random stream (:func:`sync_rng_over_tp`). Size 1: nothing changes.

    Raises:
        ValueError: ``tp`` does not divide a split width or the attention heads (naming the layer).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be the 1-D 'tp' mesh, got a {tp_mesh.ndim}-D mesh; pass submesh(mesh, 'tp')")
    tp = tp_mesh.size()
    if tp == 1:
        return model
    plan = tensor_parallel_plan(model)
    _check_divisible(model, plan, tp)
    if plan:
        parallelize_module(model, tp_mesh, {fqn: _style(style) for fqn, style in plan.items()})
    sync_rng_over_tp(tp_mesh)
    return model


# --------------------------------------------------------------------------------------------------
# random state
# --------------------------------------------------------------------------------------------------


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def sync_rng_over_tp(tp_mesh: DeviceMesh) -> None:
    """Copy the first ``tp`` rank's random state (CPU, and the accelerator's) to the other ``tp`` ranks.

    The ``tp`` ranks run the same replicated computation on the same batch; random ops there (dropout,
    router noise, random token selection) must draw the same numbers, or the replicas drift apart. They
    keep drawing the same numbers afterwards because they run the same ops on equal local shapes.
    Different data-parallel groups keep their own streams.
    """
    if tp_mesh.size() == 1:
        return
    device = _mesh_device(tp_mesh)
    group, src = tp_mesh.get_group(), dist.get_global_rank(tp_mesh.get_group(), 0)
    state = torch.get_rng_state().to(device)
    dist.broadcast(state, src=src, group=group)
    torch.set_rng_state(state.cpu())
    if device.type != "cpu":
        module = getattr(torch, device.type)
        device_state = module.get_rng_state().to(device)
        dist.broadcast(device_state, src=src, group=group)
        module.set_rng_state(device_state.cpu())


# --------------------------------------------------------------------------------------------------
# experts: rows split over tp (token de-duplication)
# --------------------------------------------------------------------------------------------------


def row_split_sizes(num_rows: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous row ranges covering ``num_rows`` (the first ones one row longer)."""
    base, extra = divmod(num_rows, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _gather_rows(local: Tensor, sizes: list[int], group: dist.ProcessGroup) -> Tensor:
    """All-gather ``[sizes[rank], ...]`` row blocks into ``[sum(sizes), ...]`` (padded to equal blocks)."""
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))  # [longest, ...]
    padded[: local.shape[0]] = local
    gathered = local.new_empty((len(sizes) * longest, *local.shape[1:]))  # [tp*longest, ...]
    dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
    blocks = gathered.split(longest)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes)])  # [sum(sizes), ...]


class _ScatterRows(torch.autograd.Function):
    """Forward: this rank's rows ``[lo, hi)``. Backward: the row gradients of every ``tp`` rank gathered,
    so the (replicated) input gets its full gradient on each rank."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.group = sizes, group
        lo = sum(sizes[:rank])
        return x[lo : lo + sizes[rank]].clone()  # [sizes[rank], d]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None, None


class _GatherRows(torch.autograd.Function):
    """Forward: every ``tp`` rank's rows gathered. Backward: this rank's rows of the gradient (the
    gradient of a replicated output is the same on every ``tp`` rank, so no reduction)."""

    @staticmethod
    def forward(ctx, y: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.lo, ctx.hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return _gather_rows(y, sizes, group)  # [sum(sizes), d]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad[ctx.lo : ctx.hi].contiguous(), None, None, None


def _local_counts(tokens_per_expert: Tensor, lo: int, hi: int) -> Tensor:
    """Rows of each expert inside the row range ``[lo, hi)`` of the expert-sorted rows: ``[E]`` long."""
    counts = tokens_per_expert.to(torch.long)  # [E]
    ends = torch.cumsum(counts, 0)  # [E]
    starts = ends - counts
    return (ends.clamp(max=hi) - starts.clamp(min=lo)).clamp_min(0)  # [E]


class TokenSplitDispatcher(TokenDispatcher):
    """The token dispatcher of an MoE layer under tensor parallelism (see the module docstring).

    ``x [N, d]`` (identical on every ``tp`` rank) -> this rank's ``1/tp`` of the rows, with their per-expert
    counts -> the ``inner`` dispatcher (the all-to-all of expert parallelism, or the local one) -> every
    rank's rows all-gathered -> ``[N, d]``.
    """

    def __init__(self, inner: TokenDispatcher, tp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.inner = inner
        self.tp_mesh = tp_mesh

    def forward(self, experts: nn.Module, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """``x [N, d]`` sorted by expert, ``tokens_per_expert [E]`` -> ``[N, d]``."""
        group, rank = self.tp_mesh.get_group(), self.tp_mesh.get_local_rank()
        sizes = row_split_sizes(x.shape[0], self.tp_mesh.size())
        lo = sum(sizes[:rank])
        local_counts = _local_counts(tokens_per_expert, lo, lo + sizes[rank])  # [E]
        x_local = _ScatterRows.apply(x, sizes, rank, group)  # [sizes[rank], d]
        # Without local rows the experts' output still depends on x_local and their parameters (their
        # contract), so this rank joins the backward collectives of its tp / ZeRO peers.
        y_local = self.inner(experts, x_local, local_counts)  # [sizes[rank], d]
        return _GatherRows.apply(y_local, sizes, rank, group)  # [N, d]

    def extra_repr(self) -> str:
        return f"tp={self.tp_mesh.size()}"


def apply_expert_token_split(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Make every MoE layer's experts process only this ``tp`` rank's share of the rows (in place).

    Call after :func:`lightning_moe.parallel.expert_parallel.apply_expert_parallel`, so the split happens
    before the all-to-all (it wraps the layer's dispatcher). Size 1: nothing changes.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be the 1-D 'tp' mesh, got a {tp_mesh.ndim}-D mesh; pass submesh(mesh, 'tp')")
    if tp_mesh.size() == 1:
        return model
    for name, layer in find_moe_layers(model):
        if isinstance(layer.token_dispatcher, TokenSplitDispatcher):
            raise ValueError(f"MoE layer {name!r} already splits its rows over tp; apply_expert_token_split once")
        layer.token_dispatcher = TokenSplitDispatcher(layer.token_dispatcher, tp_mesh)
    return model
