"""ZeRO stages on FSDP2 (stage 0: DDP): one FSDP unit per expert module, per block (and free MoE layer), root last.

=====  ===========================================================  ==================================
stage  setting                                                      communication per optimizer step
=====  ===========================================================  ==================================
0      DDP (composable ``replicate``): plain full parameters,        bucketed all-reduce of gradients,
       gradients all-reduced in buckets while backward runs.         overlapped with backward
       With ``ep > 1`` (DTensor experts) or a mixed-precision
       policy: FSDP2's ``replicate`` (``Replicate()`` DTensors)
1      ``fully_shard(reshard_after_forward=False)``; gradient       all-gather of parameters, one
       sync deferred on accumulation micro-batches (unsharded       reduce-scatter of the accumulated
       gradients accumulate locally), see :func:`no_gradient_sync`  gradients
2      ``fully_shard(reshard_after_forward=False)``; gradients      all-gather, a reduce-scatter per
       reduce-scattered every micro-batch                           micro-batch
3      ``fully_shard(reshard_after_forward=True)``: parameters      all-gather in forward and in
       sharded again after each unit's forward                      backward, a reduce-scatter per
                                                                    micro-batch
=====  ===========================================================  ==================================

Experts are sharded over ``efsdp`` (the ranks that hold the same experts), dense weights over ``dp``.
Expert gradients are divided by the full data-parallel size: the all-to-all already summed the
contributions of the whole ``ep`` group, so dividing by ``efsdp`` alone would scale them by ``ep``.

Why DDP at stage 0: FSDP2's ``replicate`` keeps parameters as ``Replicate()`` DTensors and copies every
unit's gradients into and out of a flat buffer per step, which made stage 0 slower than Lightning's ``ddp``
(README "Stage 0 against Lightning's DDP", ``benchmarks/strategy_step_time.py``). DDP reduces the
gradients in place from buckets while backward runs, and the optimizer updates plain tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, Shard

from lightning_moe.parallel.dims import ParallelDims, expert_shard_mesh, submesh
from lightning_moe.parallel.discovery import expert_modules, find_blocks, find_moe_layers
from lightning_moe.parallel.local import local_shard

__all__ = [
    "apply_fsdp",
    "is_data_parallel",
    "mixed_precision_policy",
    "no_gradient_sync",
    "no_inference_mode",
    "PRECISIONS",
]

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true")


def mixed_precision_policy(precision: str | None) -> MixedPrecisionPolicy | None:
    """The FSDP2 mixed-precision policy for a Lightning precision string.

    ``"bf16-mixed"`` / ``"16-mixed"``: compute in bf16 / fp16 from fp32 sharded parameters, reduce
    gradients in fp32. ``"32-true"``, ``"bf16-true"`` (the model itself is bf16) or None: no policy.
    """
    if precision is None or precision in ("32-true", "32", "bf16-true"):
        return None
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    raise ValueError(f"precision={precision!r} is not supported by the ZeRO engine; use one of {list(PRECISIONS)}")


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _supports_premul_sum(mesh: DeviceMesh) -> bool:
    return dist.get_backend(mesh.get_group()) == "nccl"


def _replicate_fn():
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError as err:  # pragma: no cover - torch >= 2.11 has it
        raise ValueError(
            "zero_stage=0 needs torch.distributed._composable.replicate_with_fsdp (torch >= 2.11); "
            "upgrade torch or use zero_stage >= 1"
        ) from err
    return replicate


def _apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Stage 0 with plain parameters and no mixed-precision policy: DDP over ``dp``.

    Composable ``replicate`` (DDP under the hood; parameter names and the module's class behaviour are
    kept) builds its ``DistributedDataParallel`` at the model's first forward, so meta parameters may be
    materialised after this call; DDP then broadcasts rank 0's parameters, which every rank already has.
    """
    from torch.distributed._composable.replicate import replicate as ddp_replicate

    # broadcast_buffers=False: buffers are computed identically on every rank (FSDP2 never broadcasts them
    # either); it saves a broadcast per forward. gradient_as_bucket_view: ``.grad`` are views into DDP's
    # all-reduce buckets, no copy between the two and no second copy of the gradients in memory.
    ddp_replicate(model, process_group=dp_mesh.get_group(), broadcast_buffers=False, gradient_as_bucket_view=True)


def _is_ddp(module: nn.Module) -> bool:
    from torch.distributed._composable.replicate import DDP

    return isinstance(module, DDP)


def is_data_parallel(model: nn.Module) -> bool:
    """Whether :func:`apply_fsdp` made ``model`` data parallel (FSDP2 or, at stage 0, DDP).

    Its ``forward`` then runs the hooks of the data-parallel root (FSDP2's lazy init and root
    all-gathers, DDP's bucket preparation): a step must enter through ``forward``.
    """
    return isinstance(model, FSDPModule) or _is_ddp(model)


def _expert_shard_placement(efsdp: int):
    """Shard expert weights on dim 0 (experts) when the local experts split evenly over ``efsdp``,
    else on dim 1 (e.g. 2 local experts over 4 ranks), else dim 0 with FSDP's padding."""

    def placement(param: nn.Parameter) -> Shard:
        local = local_shard(param)
        if local.shape[0] % efsdp == 0:
            return Shard(0)
        if local.ndim > 1 and local.shape[1] % efsdp == 0:
            return Shard(1)
        return Shard(0)

    return placement


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    dims: ParallelDims,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """Apply the ZeRO stage of ``dims`` with FSDP2, bottom-up, in place.

    Units: every MoE layer's ``experts`` and every transformers experts module (over ``efsdp``, gradient divide factor = dp size), every
    block (direct child of an ``nn.ModuleList``) and every MoE layer outside a block (over ``dp``),
    then the root (over ``dp``) with the remaining parameters (embeddings, head, ...).

    Args:
        model: the model, after :func:`apply_expert_parallel` if ``ep > 1``.
        mesh: the mesh from :meth:`ParallelDims.build_mesh`.
        dims: zero stage and offload choice.
        mp_policy: FSDP2 mixed precision (see :func:`mixed_precision_policy`); None = full precision.
    """
    if isinstance(model, FSDPModule):
        raise ValueError("model already has FSDP applied; call apply_fsdp once")
    # experts: over efsdp, or efsdp x tp under tensor parallelism (see dims.expert_shard_mesh)
    dp_mesh, efsdp_mesh = submesh(mesh, "dp"), expert_shard_mesh(mesh)
    stage = dims.zero_stage
    mp = mp_policy if mp_policy is not None else MixedPrecisionPolicy()

    if (
        stage == 0
        and mp_policy is None
        and dims.tp == 1
        and not any(isinstance(p, DTensor) for p in model.parameters())
    ):
        # ep == 1 (and tp == 1): every parameter is a plain tensor. DDP takes plain tensors only, and with
        # ep > 1 the experts are DTensors over ep: an optimizer's fused/foreach update cannot mix both types.
        _apply_ddp(model, dp_mesh)
        model._zero_stage = stage  # type: ignore[attr-defined]  # read by no_gradient_sync
        return model
    if stage == 0:
        replicate = _replicate_fn()

        def wrap(module: nn.Module, unit_mesh: DeviceMesh, *, experts: bool, root: bool) -> None:
            replicate(module, mesh=unit_mesh, mp_policy=mp)

    else:
        offload: OffloadPolicy = (
            CPUOffloadPolicy(pin_memory=_accelerator_available()) if dims.offload == "params" else OffloadPolicy()
        )

        def wrap(module: nn.Module, unit_mesh: DeviceMesh, *, experts: bool, root: bool) -> None:
            # Stage 3 reshards every unit after forward except the root, whose parameters backward
            # needs first (FSDP's own recommendation); stages 1-2 keep them until after backward.
            fully_shard(
                module,
                mesh=unit_mesh,
                reshard_after_forward=(stage == 3 and not root),
                shard_placement_fn=_expert_shard_placement(unit_mesh.size()) if experts else None,
                mp_policy=mp,
                offload_policy=offload,
            )

    experts_modules = {id(experts) for _, experts in expert_modules(model)}
    blocks = [block for _, block in find_blocks(model)]
    block_ids = {id(b) for b in blocks}
    inside_block = {id(m) for b in blocks for m in b.modules()}
    units = set(block_ids)
    units |= {id(layer) for _, layer in find_moe_layers(model) if id(layer) not in inside_block}
    # A module that is called through methods other than forward (``forward_methods``, e.g. the
    # transformer's ``encode``/``decode_step`` for generation) is its own unit, so those calls can
    # gather its parameters too.
    with_methods = [m for m in model.modules() if getattr(m, "forward_methods", None)]
    units |= {id(m) for m in with_methods}
    units.discard(id(model))

    # Reversed pre-order visits every module after all of its descendants: bottom-up, as FSDP needs.
    for _, module in reversed(list(model.named_modules())):
        if module is model:
            continue
        if id(module) in experts_modules:
            wrap(module, efsdp_mesh, experts=True, root=False)
            module.set_gradient_divide_factor(float(dims.data_parallel_size))  # type: ignore[operator]
            if stage > 0 and efsdp_mesh.size() > 1 and not _supports_premul_sum(efsdp_mesh):
                # A divide factor other than the group size makes the reduce-scatter a PREMUL_SUM,
                # which only NCCL has: elsewhere reduce with SUM and divide after. (Not with one rank
                # or replicate: FSDP then divides while copying, and forcing SUM would divide twice.)
                module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
        elif id(module) in units:
            wrap(module, dp_mesh, experts=False, root=False)
    wrap(model, dp_mesh, experts=False, root=True)
    for module in with_methods:
        for name in module.forward_methods:
            register_fsdp_forward_method(module, name)
    model._zero_stage = stage  # type: ignore[attr-defined]  # read by no_gradient_sync
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, zero_stage: int | None = None) -> Iterator[None]:
    """Context for the forward/backward of a gradient-accumulation micro-batch that is not the last.

    * stages 0-1: gradients accumulate unsharded on each rank, with no communication; the last
      micro-batch (outside this context) reduces them once: ZeRO-1's pattern.
    * stage 2: gradients are still reduce-scattered, but parameters stay unsharded between
      micro-batches (no all-gather per micro-batch).
    * stage 3: no change (gradients reduce-scattered, parameters resharded, every micro-batch).

    Args:
        model: the model after :func:`apply_fsdp`.
        zero_stage: defaults to the stage :func:`apply_fsdp` used.
    """
    stage = getattr(model, "_zero_stage", None) if zero_stage is None else zero_stage
    if not is_data_parallel(model) or stage is None:
        raise ValueError("no_gradient_sync needs a model returned by apply_fsdp (or parallelize)")
    defer_reduction = stage <= 1
    keep_unsharded = stage <= 2 and isinstance(model, FSDPModule)  # DDP keeps no sharded state
    try:
        if defer_reduction:
            _set_requires_gradient_sync(model, False)
        if keep_unsharded:
            model.set_reshard_after_backward(False, recurse=True)  # type: ignore[operator]
        yield
    finally:
        if defer_reduction:
            _set_requires_gradient_sync(model, True)
        if keep_unsharded:
            model.set_reshard_after_backward(True, recurse=True)  # type: ignore[operator]


def _set_requires_gradient_sync(model: nn.Module, enabled: bool) -> None:
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled, recurse=True)
    else:  # composable DDP: one flag for the whole model
        model.set_requires_gradient_sync(enabled)  # type: ignore[operator]


@contextlib.contextmanager
def no_inference_mode() -> Iterator[None]:
    """Run evaluation steps under ``no_grad`` instead of ``inference_mode``.

    FSDP2 keeps unsharded parameters between uses (stages 1-2); allocating them as inference tensors would
    break the next training step.
    """
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            yield
    else:
        yield
