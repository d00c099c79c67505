"""Grouped experts: every expert's weights live in one ``[E, ...]`` tensor.

The experts receive token rows already sorted by expert (rows of expert 0 first, then expert 1, ...)
and a ``[E]`` count of rows per expert. They compute only those rows: no capacity padding, no one-hot
dispatch. Keeping every weight as one grouped tensor lets the parallel code shard the experts over the
``ep`` mesh axis (``Shard(0)``) and run the all-to-all around :meth:`forward` without this module
knowing about it.

Parameters are read through :func:`local_tensor`, so a parameter that the parallel code turned into a
DTensor (sharded over ``ep``) is used through its local shard; the local expert count is the local
parameter's first dimension.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "local_tensor",
    "grouped_mm",
    "GroupedFFNExperts",
    "GroupedGLUExperts",
    "ReplicatedExperts",
    "build_experts",
    "ACTIVATIONS",
]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def local_tensor(t: Tensor) -> Tensor:
    """The local part of ``t``: ``t.to_local()`` for a DTensor, ``t`` itself otherwise.

    Duck-typed so the model code does not import ``torch.distributed``.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _group_bounds(tokens_per_expert: Tensor) -> list[int]:
    """Row offsets ``[0, n_0, n_0+n_1, ..., N]`` on the host (one sync per layer, not per expert)."""
    counts = tokens_per_expert.tolist()
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + int(c))
    return bounds


class _LoopGroupedMM(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ w[e] (+ bias[e])`` for every expert ``e``.

    Forward and backward write each expert's product straight into its slice of one output buffer, and
    the weight gradient is built as one ``[E, a, b]`` tensor, so autograd never materialises a
    full-size zero gradient per expert (which indexing ``w[e]`` would do: O(E^2 a b) work).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, bounds: list[int]) -> Tensor:
        # x: [N, a], w: [E, a, b], bias: [E, b] or None
        out = x.new_empty(x.shape[0], w.shape[2])  # [N, b]
        for e in range(w.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            if bias is None:
                torch.mm(x[lo:hi], w[e], out=out[lo:hi])
            else:
                torch.addmm(bias[e], x[lo:hi], w[e], out=out[lo:hi])
        ctx.save_for_backward(x, w)
        ctx.bounds = bounds
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w = ctx.saved_tensors
        bounds: list[int] = ctx.bounds
        grad_out = grad_out.contiguous()  # may arrive expanded (stride 0) from a sum()
        num_experts = w.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if need_x else None  # [N, a]
        grad_w = torch.empty_like(w) if need_w else None  # [E, a, b]
        grad_b = w.new_empty(num_experts, w.shape[2]) if need_b else None  # [E, b]
        for e in range(num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                if grad_w is not None:
                    grad_w[e].zero_()
                if grad_b is not None:
                    grad_b[e].zero_()
                continue
            g = grad_out[lo:hi]  # [n_e, b]
            if grad_x is not None:
                torch.mm(g, w[e].t(), out=grad_x[lo:hi])
            if grad_w is not None:
                torch.mm(x[lo:hi].t(), g, out=grad_w[e])
            if grad_b is not None:
                torch.sum(g, dim=0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def _native_grouped_mm_available(x: Tensor, w: Tensor) -> bool:
    """Whether torch's fused grouped GEMM can run these operands (CUDA, bf16, aligned strides)."""
    if not x.is_cuda or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    if not hasattr(torch, "_grouped_mm"):
        return False
    # 16-byte aligned rows are required by the kernel: 8 bf16 elements.
    return x.shape[1] % 8 == 0 and w.shape[2] % 8 == 0


def grouped_mm(x: Tensor, w: Tensor, tokens_per_expert: Tensor, bias: Tensor | None = None) -> Tensor:
    """Grouped matrix product of expert-sorted rows with per-expert weights.

    Args:
        x: ``[N, a]`` rows sorted by expert.
        w: ``[E, a, b]`` one weight per expert.
        tokens_per_expert: ``[E]`` rows per expert, summing to ``N``.
        bias: optional ``[E, b]``.

    Returns:
        ``[N, b]``. On CUDA with bf16 operands this is one ``torch._grouped_mm`` call (no host
        synchronisation); elsewhere a loop of matrix products over the groups with a hand-written
        backward (see :class:`_LoopGroupedMM`).
    """
    if _native_grouped_mm_available(x, w):
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)  # [E]
        out = torch._grouped_mm(x, w, offs=offsets)  # [N, b]
        if bias is not None:
            expert_of_row = torch.repeat_interleave(
                torch.arange(w.shape[0], device=x.device), tokens_per_expert, output_size=x.shape[0]
            )
            out = out + bias[expert_of_row]
        return out
    return _LoopGroupedMM.apply(x, w, bias, _group_bounds(tokens_per_expert))


def _init_grouped_linear_(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    """Initialise ``[E, fan_in, fan_out]`` like ``nn.Linear`` does for each expert."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class GroupedFFNExperts(nn.Module):
    """``E`` two-layer FFN experts ``act(x W1[e] + b1[e]) W2[e] + b2[e]``.

    Args:
        num_experts: E.
        hidden_size: model width d.
        ffn_hidden_size: expert inner width h.
        activation: a key of :data:`ACTIVATIONS`.
        bias: whether the experts have biases (as ``nn.Linear`` does by default).

    Parameters: ``w1 [E, d, h]``, ``b1 [E, h]``, ``w2 [E, h, d]``, ``b2 [E, d]``.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu", bias: bool = True
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.b1 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_grouped_linear_(self.w1.data, None if self.b1 is None else self.b1.data, self.hidden_size)
        _init_grouped_linear_(self.w2.data, None if self.b2 is None else self.b2.data, self.ffn_hidden_size)

    def forward(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """``x [N, d]`` sorted by expert, ``tokens_per_expert [E_local]`` -> ``[N, d]``."""
        w1, w2 = local_tensor(self.w1), local_tensor(self.w2)
        b1 = None if self.b1 is None else local_tensor(self.b1)
        b2 = None if self.b2 is None else local_tensor(self.b2)
        h = grouped_mm(x, w1, tokens_per_expert, b1)  # [N, h]
        h = ACTIVATIONS[self.activation](h)
        return grouped_mm(h, w2, tokens_per_expert, b2)  # [N, d]


class GroupedGLUExperts(nn.Module):
    """``E`` gated (SwiGLU by default) experts ``(act(x W1[e]) * (x W3[e])) W2[e]``, no biases.

    Parameters: ``w1 [E, d, h]`` (gate), ``w3 [E, d, h]`` (up), ``w2 [E, h, d]`` (down).
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_grouped_linear_(self.w1.data, None, self.hidden_size)
        _init_grouped_linear_(self.w3.data, None, self.hidden_size)
        _init_grouped_linear_(self.w2.data, None, self.ffn_hidden_size)

    def forward(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """``x [N, d]`` sorted by expert, ``tokens_per_expert [E_local]`` -> ``[N, d]``."""
        w1, w3, w2 = local_tensor(self.w1), local_tensor(self.w3), local_tensor(self.w2)
        gate = grouped_mm(x, w1, tokens_per_expert)  # [N, h]
        up = grouped_mm(x, w3, tokens_per_expert)  # [N, h]
        return grouped_mm(ACTIVATIONS[self.activation](gate) * up, w2, tokens_per_expert)  # [N, d]


class ReplicatedExperts(nn.Module):
    """``E`` copies of a user ``nn.Module`` whose parameters are stacked into ``[E, ...]`` tensors.

    Each expert runs the template module with its own slice of the stacked parameters
    (``torch.func.functional_call``), one expert at a time: slower than the grouped experts, but any
    module mapping ``[n, d] -> [n, d]`` works, and the stacked layout keeps expert parallelism and
    sharding identical to the grouped experts. Buffers of the template are shared by all experts.

    Parameter names are the template's with ``.`` replaced by ``__`` (e.g. ``fc1__weight``).
    """

    def __init__(self, template: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        copies = []
        for _ in range(num_experts):
            fresh = copy.deepcopy(template)
            _reset_module_parameters(fresh)  # each expert gets its own initialisation
            copies.append(dict(fresh.named_parameters()))
        names = [name for name, _ in template.named_parameters()]
        for name in names:
            stacked = torch.stack([c[name].detach() for c in copies])  # [E, *shape]
            self.register_parameter(name.replace(".", "__"), nn.Parameter(stacked))
        self._param_names = names
        # The template is kept outside the module tree: its own parameters are never trained.
        self._template = [copy.deepcopy(template).requires_grad_(False)]

    def forward(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """``x [N, d]`` sorted by expert, ``tokens_per_expert [E_local]`` -> ``[N, d]``."""
        template = self._template[0]
        stacked = [local_tensor(getattr(self, n.replace(".", "__"))) for n in self._param_names]
        per_expert = [p.unbind(0) for p in stacked]  # one backward node per parameter, not per expert
        outputs = []
        start = 0
        for e, count in enumerate(tokens_per_expert.tolist()):
            if count == 0:
                continue
            params = {n: per_expert[i][e] for i, n in enumerate(self._param_names)}
            outputs.append(torch.func.functional_call(template, params, (x[start : start + count],)))
            start += count
        if not outputs:
            return x.new_zeros(x.shape)
        return torch.cat(outputs, dim=0)  # [N, d]


def _reset_module_parameters(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def build_experts(
    expert: str | nn.Module, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str | None
) -> nn.Module:
    """The experts module for an ``expert`` choice: ``"ffn"``, ``"glu"`` or an ``nn.Module`` template."""
    if isinstance(expert, nn.Module):
        return ReplicatedExperts(expert, num_experts)
    if expert == "ffn":
        return GroupedFFNExperts(num_experts, hidden_size, ffn_hidden_size, activation or "gelu")
    if expert == "glu":
        return GroupedGLUExperts(num_experts, hidden_size, ffn_hidden_size, activation or "silu")
    raise ValueError(f"expert={expert!r} is not supported; use 'ffn', 'glu' or an nn.Module instance to replicate")
