"""Expert parallelism for Hugging Face transformers MoE models (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, DeepSeek-V3, ...

transformers 5 keeps each MoE block's experts in one module whose parameters are grouped tensors
(``experts.gate_up_proj [E, 2h, d]``, ``experts.down_proj [E, d, h]``, optional ``[E, ...]`` biases) and whose
class is decorated with ``transformers.integrations.use_experts_implementation``: its forward
``experts(hidden [T, d], top_k_index [T, k], top_k_weights [T, k]) -> [T, d]`` is looked up by name in the
``ExpertsInterface`` (``config._experts_implementation``: ``"eager"``, ``"grouped_mm"``, ...). That is the
seam used here, with no change to the model's code or routing::

    router (the model's own: softmax / sigmoid, top-k, its normalisation)  -> top_k_index, top_k_weights
    experts forward = "lightning_moe_ep" (registered in the ExpertsInterface):
        (token, k) pairs sorted by global expert                    x_sorted [T*k, d], tokens_per_expert [E]
        -> AllToAllTokenDispatcher (the engine's, expert_parallel.py): rows travel to the ep rank of their
           expert, run there by the model's previous implementation on the local experts [E/ep, ...],
           and come back in order                                    y_sorted [T*k, d]
        -> unsort, multiply by the routing weights, sum over k      [T, d]

The experts' parameters become DTensors ``Shard(0)`` over ``ep`` (as for :class:`lightning_moe.moe.MoE`), so
FSDP shards them over ``efsdp``, checkpoints store them at their global ``[E, ...]`` shape, and a checkpoint
written at one layout loads at any other (and into the plain HF model).

Recognised: any experts module of a ``use_experts_implementation`` class inside a ``PreTrainedModel`` (so the
implementation can be switched with ``set_experts_implementation``) whose parameters all have the expert
dimension first. Other MoE-looking modules (a child named ``experts``, a class named ``*Experts``) are named in
one warning and stay plain ZeRO-sharded weights.

The router's auxiliary loss (``output_router_logits=True``) is the model's own and sees only this rank's
tokens, as every data-parallel loss does.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_moe.moe import MoE, local_tensor
from lightning_moe.parallel.expert_parallel import AllToAllTokenDispatcher, _shard_experts_

__all__ = [
    "EP_IMPLEMENTATION",
    "find_hf_experts",
    "find_unrecognised_moe_modules",
    "apply_hf_expert_parallel",
    "warn_unrecognised_moe_modules",
    "is_hf_expert_parallel",
    "disable_kv_cache",
]

EP_IMPLEMENTATION = "lightning_moe_ep"
"""The name under which the expert-parallel experts forward is registered in transformers' ExpertsInterface."""


@dataclass
class _ExpertParallelState:
    dispatcher: AllToAllTokenDispatcher
    inner: str
    """The experts implementation the model used before (``"eager"``, ``"grouped_mm"``, ...): it runs the
    local experts."""


# Experts module -> its expert-parallel state. Kept outside the module (no attribute set on the model's
# instances); dies with the module.
_STATE: weakref.WeakKeyDictionary[nn.Module, _ExpertParallelState] = weakref.WeakKeyDictionary()


def _is_hf_experts_module(module: nn.Module) -> bool:
    """Duck-typed: an instance of a class decorated by ``use_experts_implementation`` (which sets these
    attributes in ``__init__`` and keeps the model's own forward as ``forward.__wrapped__``)."""
    num_experts = getattr(module, "num_experts", None)
    return (
        isinstance(num_experts, int)
        and hasattr(module, "_is_expert_parallel")
        and hasattr(module, "has_gate")
        and hasattr(getattr(module, "config", None), "_experts_implementation")
        and hasattr(type(module).forward, "__wrapped__")
    )


def _has_grouped_parameters(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and all(p.ndim >= 2 and p.shape[0] == module.num_experts for p in params)  # type: ignore[union-attr]


def _owning_pretrained_models(model: nn.Module) -> list[nn.Module]:
    """The outermost modules that can switch their experts implementation (``PreTrainedModel`` s)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for _, module in model.named_modules():
        if id(module) in inside:
            continue
        if callable(getattr(module, "set_experts_implementation", None)) and hasattr(module, "config"):
            found.append(module)
            inside |= {id(m) for m in module.modules()}
    return found


def find_hf_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, experts module)`` of every recognised transformers experts module, in module order.

    Recognised: a ``use_experts_implementation`` experts module inside a ``PreTrainedModel``, with every
    parameter ``[num_experts, ...]``. Needs no ``transformers`` import (nothing is found without it).
    """
    owned: set[int] = {id(m) for pm in _owning_pretrained_models(model) for m in pm.modules()}
    return [
        (name, m)
        for name, m in model.named_modules()
        if id(m) in owned and _is_hf_experts_module(m) and _has_grouped_parameters(m)
    ]


_EXPERTS_CLASS = re.compile(r"Experts$")


def find_unrecognised_moe_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MoE-looking modules that neither :func:`find_hf_experts` nor :class:`lightning_moe.moe.MoE` cover:
    a module with a child named ``experts`` or a class named ``*Experts`` (e.g. experts kept as an
    ``nn.ModuleList`` of per-expert MLPs, or a custom experts class)."""
    known: set[int] = {id(m) for _, m in find_hf_experts(model)}
    for _, module in model.named_modules():
        if isinstance(module, MoE):
            known |= {id(m) for m in module.modules()}
    unrecognised: list[tuple[str, nn.Module]] = []
    reported: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in known or id(module) in reported:
            continue
        experts = getattr(module, "experts", None)
        has_experts_child = isinstance(experts, nn.Module) and id(experts) not in known
        if has_experts_child or _EXPERTS_CLASS.search(type(module).__name__):
            unrecognised.append((name, module))
            reported |= {id(m) for m in module.modules()}
    return unrecognised


def warn_unrecognised_moe_modules(model: nn.Module) -> list[str]:
    """One warning (on rank 0) naming the MoE-looking modules that get no expert parallelism; returns their
    names."""
    names = [name for name, _ in find_unrecognised_moe_modules(model)]
    if names and (not dist.is_initialized() or dist.get_rank() == 0):
        shown = ", ".join(f"{n!r} ({type(model.get_submodule(n)).__name__})" for n in names[:3])
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        warnings.warn(
            f"moe_zero: MoE block {shown}{more} not recognised (expert parallelism needs a transformers"
            " `use_experts_implementation` experts module with [num_experts, ...] weights, or lightning_moe.MoE);"
            " its experts are ZeRO-sharded like dense weights (every rank runs every expert).",
            stacklevel=2,
        )
    return names


def disable_kv_cache(model: nn.Module) -> list[str]:
    """Set ``config.use_cache = False`` on every transformers ``PreTrainedModel`` in ``model`` (returns their
    names); under activation checkpointing. Why: a decoder layer recomputed in backward would append its keys
    and values to the forward's KV cache a second time (transformers' own gradient checkpointing turns the
    cache off in training the same way). Generation can still pass ``use_cache=True``."""
    names = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if callable(getattr(module, "set_experts_implementation", None)) and getattr(config, "use_cache", False):
            config.use_cache = False
            names.append(name)
    return names


def is_hf_expert_parallel(experts: nn.Module) -> bool:
    """Whether :func:`apply_hf_expert_parallel` made this transformers experts module expert-parallel."""
    return experts in _STATE


class _LocalExperts:
    """The experts module seen through its local shard: ``num_experts = E / ep`` and every grouped parameter
    replaced by its local ``[E/ep, ...]`` part (differentiable ``to_local``); everything else (activation,
    layout flags, ``_apply_gate``) is the module's own. Lets the model's own experts implementation run on
    the local experts unchanged."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor], num_experts: int) -> None:
        self.__dict__.update(params)
        self.__dict__["num_experts"] = num_experts
        self.__dict__["_module"] = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_module"], name)


def _inner_forward(module: nn.Module, name: str) -> Callable[..., Tensor]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    # "eager" is the class's own forward (kept by use_experts_implementation as forward.__wrapped__).
    return ALL_EXPERTS_FUNCTIONS.get_interface(name, type(module).forward.__wrapped__)


class _LocalRunner:
    """``(x_local [M, d] grouped by local expert, counts [E/ep]) -> [M, d]`` with the model's own
    implementation on the local experts: what :class:`AllToAllTokenDispatcher` calls as "the experts"."""

    def __init__(self, module: nn.Module, inner: str) -> None:
        self.module, self.inner = module, inner

    def __call__(self, x_local: Tensor, counts: Tensor) -> Tensor:
        params = {name: local_tensor(p) for name, p in self.module._parameters.items() if p is not None}
        num_local = counts.numel()
        view = _LocalExperts(self.module, params, num_local)
        num_rows = x_local.shape[0]
        expert_ids = torch.repeat_interleave(
            torch.arange(num_local, device=x_local.device), counts.to(torch.long), output_size=num_rows
        ).unsqueeze(1)  # [M, 1]
        ones = x_local.new_ones(num_rows, 1)  # routing weights are applied on the source rank
        y_local = _inner_forward(self.module, self.inner)(view, x_local, expert_ids, ones)  # [M, d]
        if num_rows == 0:
            # Keep x_local and the weights on the graph: this rank must still join the backward all-to-all
            # and produce (zero) expert gradients like its peers.
            y_local = y_local + 0.0 * (x_local.sum() + sum(p.sum() for p in params.values()))
        return y_local


def expert_parallel_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The ``"lightning_moe_ep"`` experts implementation: ``hidden [T, d]``, ``top_k_index [T, k]``,
    ``top_k_weights [T, k]`` -> ``[T, d]`` (see the module docstring)."""
    state = _STATE.get(self)
    if state is None:
        raise RuntimeError(
            f"{type(self).__name__} uses experts_implementation={EP_IMPLEMENTATION!r} but was not made expert-"
            "parallel by lightning_moe; set another implementation with model.set_experts_implementation(...)"
        )
    num_tokens, top_k = top_k_index.shape
    flat_ids = top_k_index.reshape(-1)  # [T*k]
    sorted_ids, perm = torch.sort(flat_ids, stable=True)  # pairs grouped by global expert
    x_sorted = hidden_states.index_select(0, perm // top_k)  # [T*k, d]
    tokens_per_expert = torch.bincount(sorted_ids, minlength=state.dispatcher.num_experts)  # [E]
    y_sorted = state.dispatcher(_LocalRunner(self, state.inner), x_sorted, tokens_per_expert)  # [T*k, d]
    y_pairs = torch.empty_like(y_sorted).index_copy(0, perm, y_sorted)  # [T*k, d] in (token, k) order
    # in the promoted dtype (fp32 routing weights under bf16 compute), as transformers' own implementations do
    weighted = y_pairs.view(num_tokens, top_k, -1) * top_k_weights.unsqueeze(-1)  # [T, k, d]
    return weighted.sum(dim=1).to(hidden_states.dtype)  # [T, d]


def _register_implementation() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EP_IMPLEMENTATION, expert_parallel_experts_forward)


def apply_hf_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[str]:
    """Shard every recognised transformers experts module over ``ep_mesh`` and route its tokens with
    all-to-alls, keeping the model's routing and expert math (module docstring).

    Args:
        model: any module containing transformers ``PreTrainedModel`` s (changed in place).
        ep_mesh: the 1-D ``ep`` mesh. Size 1: nothing changes.

    Returns:
        The qualified names of the experts modules made expert-parallel.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh must be the 1-D 'ep' mesh, got a {ep_mesh.ndim}-D mesh; pass submesh(mesh, 'ep')")
    ep = ep_mesh.size()
    found = find_hf_experts(model)
    if ep == 1 or not found:
        return []
    for name, experts in found:
        if experts in _STATE:
            raise ValueError(f"experts module {name!r} is already expert-parallel; apply expert parallelism once")
        if experts.num_experts % ep != 0:  # type: ignore[operator]
            raise ValueError(
                f"expert_parallel_size={ep} does not divide num_experts={experts.num_experts} of {name!r}; "
                f"use a size dividing every MoE block's expert count"
            )
    inner: dict[str, str] = {}
    for name, experts in found:
        inner[name] = experts.config._experts_implementation or "eager"  # type: ignore[union-attr]
        if inner[name] == EP_IMPLEMENTATION:
            raise ValueError(f"experts module {name!r} already uses {EP_IMPLEMENTATION!r}")
    _register_implementation()
    for pretrained in _owning_pretrained_models(model):
        pretrained.set_experts_implementation(EP_IMPLEMENTATION)  # type: ignore[operator]
    # Switch first, shard after: a model that refuses the switch (e.g. custom code without the experts
    # interface) must not be left with sharded experts running their plain forward.
    refused = [name for name, e in found if e.config._experts_implementation != EP_IMPLEMENTATION]  # type: ignore[union-attr]
    if refused:
        raise ValueError(
            f"the experts implementation of {refused[0]!r} could not be switched to {EP_IMPLEMENTATION!r} "
            "(set_experts_implementation did not apply to its config); use expert_parallel_size=1 (plain ZeRO)"
        )
    for name, experts in found:
        num_experts = int(experts.num_experts)  # type: ignore[arg-type]
        _shard_experts_(experts, num_experts, ep_mesh)
        _STATE[experts] = _ExpertParallelState(AllToAllTokenDispatcher(num_experts, ep_mesh), inner[name])
    return [name for name, _ in found]
