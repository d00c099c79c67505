"""Grouped experts: every expert's weights live in one ``[E, ...]`` tensor.

The experts receive token rows already sorted by expert (rows of expert 0 first, then expert 1, ...)
and a ``[E]`` count of rows per expert. They compute only those rows: no capacity padding, no one-hot
dispatch. Keeping every weight as one grouped tensor lets the parallel code shard the experts over the
``ep`` mesh axis (``Shard(0)``) and run the all-to-all around :meth:`forward` without this module
knowing about it.

Parameters are read through :func:`local_tensor`, so a parameter that the parallel code turned into a
DTensor (sharded over ``ep``) is used through its local shard; the local expert count is the local
parameter's first dimension.

Two ways to compute the grouped products:

* fused: one ``torch._grouped_mm`` per expert matrix on CUDA sm90/sm100 in bf16 (bf16 operands, or
  autocast to bf16 as in ``bf16-mixed`` training), with every expert group padded to start at a 16-byte
  row boundary (:func:`native_group_layout`); no host synchronisation, and ``torch.compile`` traces it
  into one graph;
* loop: one matrix product per expert with a hand-written backward, everywhere else (CPU, fp32, widths
  that are not multiples of 16 bytes, other GPUs); it reads the group sizes on the host once per call
  and runs eagerly under ``torch.compile``. The FFN experts run their whole ``fc1 -> act -> fc2`` as one
  autograd node (:class:`_LoopExpertFFN`), expert after expert, so each expert's ``[n_e, h]``
  intermediates stay small and cache-resident.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "local_tensor",
    "grouped_mm",
    "native_grouped_mm_dtype",
    "native_group_layout",
    "NativeGroupLayout",
    "NATIVE_GROUP_ALIGNMENT",
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


_ACTIVATION_BACKWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gelu": lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre),
    "gelu_tanh": lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre, approximate="tanh"),
    "relu": lambda grad, pre: torch.ops.aten.threshold_backward(grad, pre, 0),
    "silu": lambda grad, pre: torch.ops.aten.silu_backward(grad, pre),
}
"""``d act(pre) / d pre`` applied to ``grad``, for each key of :data:`ACTIVATIONS` (used by :class:`_LoopExpertFFN`)."""


class _LoopExpertFFN(torch.autograd.Function):
    """The whole two-layer expert FFN ``act(x_e w1[e] + b1[e]) w2[e] + b2[e]`` as one autograd node.

    One expert after the other, forward and backward run the expert's products back to back on its rows,
    so the ``[n_e, h]`` intermediates are small, cache-resident and allocated per expert (never a full
    ``[N, h]`` buffer between separate grouped products). Only ``x`` and each expert's pre-activation are
    saved; the activation is recomputed per expert in backward. Weight and bias gradients are written
    straight into one ``[E, ...]`` tensor each (no per-expert zero gradients, no stacking).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        w1: Tensor,
        b1: Optional[Tensor],
        w2: Tensor,
        b2: Optional[Tensor],
        bounds: list[int],
        activation: str,
    ) -> Tensor:
        # x: [N, d], w1: [E, d, h], b1: [E, h] or None, w2: [E, h, d], b2: [E, d] or None
        act = ACTIVATIONS[activation]
        out = x.new_empty(x.shape[0], w2.shape[2])  # [N, d]
        pre_activations = []  # [n_e, h] for each expert with rows
        for e in range(w1.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            pre = torch.mm(x[lo:hi], w1[e]) if b1 is None else torch.addmm(b1[e], x[lo:hi], w1[e])  # [n_e, h]
            pre_activations.append(pre)
            if b2 is None:
                torch.mm(act(pre), w2[e], out=out[lo:hi])
            else:
                torch.addmm(b2[e], act(pre), w2[e], out=out[lo:hi])
        ctx.save_for_backward(x, w1, w2, *pre_activations)
        ctx.bounds, ctx.activation = bounds, activation
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w1, w2, *pre_activations = ctx.saved_tensors
        bounds: list[int] = ctx.bounds
        act, act_backward = ACTIVATIONS[ctx.activation], _ACTIVATION_BACKWARD[ctx.activation]
        grad_out = grad_out.contiguous()  # [N, d]; may arrive expanded (stride 0) from a sum()
        need = ctx.needs_input_grad
        num_experts, hidden_size = w1.shape[0], w1.shape[2]
        grad_x = torch.empty_like(x) if need[0] else None  # [N, d]
        grad_w1 = torch.empty_like(w1) if need[1] else None  # [E, d, h]
        grad_b1 = w1.new_empty(num_experts, hidden_size) if ctx.has_b1 and need[2] else None  # [E, h]
        grad_w2 = torch.empty_like(w2) if need[3] else None  # [E, h, d]
        grad_b2 = w2.new_empty(num_experts, w2.shape[2]) if ctx.has_b2 and need[4] else None  # [E, d]
        need_hidden_grad = grad_x is not None or grad_w1 is not None or grad_b1 is not None
        pre_of_expert = iter(pre_activations)
        for e in range(num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:  # an expert without rows has zero gradients
                for grad in (grad_w1, grad_b1, grad_w2, grad_b2):
                    if grad is not None:
                        grad[e].zero_()
                continue
            pre = next(pre_of_expert)  # [n_e, h]
            g = grad_out[lo:hi]  # [n_e, d]
            if grad_w2 is not None:
                torch.mm(act(pre).t(), g, out=grad_w2[e])  # [h, d]
            if grad_b2 is not None:
                torch.sum(g, dim=0, out=grad_b2[e])
            if not need_hidden_grad:
                continue
            grad_pre = act_backward(torch.mm(g, w2[e].t()), pre)  # [n_e, h]
            if grad_w1 is not None:
                torch.mm(x[lo:hi].t(), grad_pre, out=grad_w1[e])  # [d, h]
            if grad_b1 is not None:
                torch.sum(grad_pre, dim=0, out=grad_b1[e])
            if grad_x is not None:
                torch.mm(grad_pre, w1[e].t(), out=grad_x[lo:hi])  # [n_e, d]
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


NATIVE_GROUP_ALIGNMENT = 8
"""Rows of each expert group in the fused path start at a multiple of this many rows (16 bytes of bf16).

The fused kernel reads every group through TMA descriptors, which want 16-byte aligned addresses; in the
backward pass the weight gradient is a grouped product over the *token* dimension, so group starts are
aligned by padding each group with zero rows (as torchtitan does). 1 disables the padding."""

_NATIVE_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
"""Devices whose ``torch._grouped_mm`` is used (tests add ``"cpu"``, where torch runs its reference loop)."""

_NATIVE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
"""Compute dtypes of the fused kernel (tests add float32 for the CPU reference)."""


@functools.lru_cache(maxsize=None)
def _cuda_capability_major(device_index: Optional[int]) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


@torch.compiler.assume_constant_result  # evaluated once while tracing, not a graph break
def _fused_kernel_on(device: torch.device) -> bool:
    """Whether ``device`` has torch's fused grouped GEMM: CUDA sm90 or sm100 (elsewhere torch would loop
    over the groups after copying the offsets to the host, which the loop path does as well). Devices of
    other types in ``_NATIVE_DEVICE_TYPES`` (tests) count as having it."""
    if device.type != "cuda":
        return True
    return _cuda_capability_major(device.index) in (9, 10)


def _compute_dtype(x: Tensor, weights: Sequence[Tensor]) -> Optional[torch.dtype]:
    """The dtype the grouped products run in: the autocast dtype when autocast is on for ``x``'s device
    (activations often arrive in fp32 from a LayerNorm), else the common dtype of ``x`` and the weights."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    if all(w.dtype == x.dtype for w in weights):
        return x.dtype
    return None


def _aligned_rows(t: Tensor, alignment: int) -> bool:
    """Row-major last two dimensions with 16-byte aligned rows and start (``alignment`` elements = 16 bytes).

    The start is checked through the storage offset (allocations themselves are aligned far beyond 16
    bytes). While ``torch.compile`` traces, neither the offset nor the address can be read; the weights
    are parameters or their FSDP / expert-parallel shards, whose offsets are multiples of a whole row.
    """
    if t.stride(-1) != 1 or t.shape[-1] % alignment or any(s % alignment for s in t.stride()[:-1]):
        return False
    return torch.compiler.is_compiling() or t.storage_offset() % alignment == 0


def native_grouped_mm_dtype(x: Tensor, weights: Sequence[Tensor]) -> Optional[torch.dtype]:
    """The dtype in which ``torch._grouped_mm``'s fused kernel computes ``x`` against ``weights``, or None
    when the experts must use the loop path.

    Eligible: a device of ``_NATIVE_DEVICE_TYPES`` (CUDA sm90/sm100), a compute dtype of ``_NATIVE_DTYPES``
    (bf16, also reached through autocast from fp32 inputs), ``[N, a]`` inputs and ``[E, a, b]`` weights with
    ``a`` and ``b`` multiples of 16 bytes and row-major weights, and at least one row.
    """
    if not hasattr(torch, "_grouped_mm") or x.device.type not in _NATIVE_DEVICE_TYPES:
        return None
    if x.dim() != 2 or x.shape[0] == 0:
        return None
    if not _fused_kernel_on(x.device):
        return None
    dtype = _compute_dtype(x, weights)
    if dtype not in _NATIVE_DTYPES:
        return None
    alignment = 16 // dtype.itemsize
    if x.shape[1] % alignment:
        return None
    for w in weights:
        if w.dim() != 3 or w.device != x.device or not _aligned_rows(w, alignment) or w.shape[1] % alignment:
            return None
    return dtype


class NativeGroupLayout(NamedTuple):
    """Where the expert-sorted rows sit in the padded buffer that ``torch._grouped_mm`` reads.

    Attributes:
        rows: ``[N]`` long, the buffer row of each input row (None when the buffer is the input itself).
        num_rows: rows of the buffer, a multiple of the alignment; the last group runs to its end.
        offsets: ``[E]`` int32 end row of each group in the buffer (``offsets[-1] == num_rows``).
        expert_of_row: ``[num_rows]`` long, the group of each buffer row (for per-expert biases).
    """

    rows: Optional[Tensor]
    num_rows: int
    offsets: Tensor
    expert_of_row: Tensor


def native_group_layout(tokens_per_expert: Tensor, num_rows: int, alignment: Optional[int] = None) -> NativeGroupLayout:
    """The padded layout of ``num_rows`` expert-sorted rows with ``tokens_per_expert [E]`` rows per expert.

    Each group starts at a multiple of ``alignment`` (default :data:`NATIVE_GROUP_ALIGNMENT`, read at call
    time): group ``e`` takes ``max(ceil(n_e / alignment), 1) * alignment`` rows - never none, so that no
    grouped product has an empty contraction (the weight gradient of an expert without tokens is then a
    product with zero rows, not a kernel edge case) - and the last group also takes the slack up to the
    static bound ``num_rows + E * alignment`` (rounded up). The buffer size is thus known without reading
    the counts on the host, and every buffer row belongs to a group (the kernel writes all of them:
    nothing uninitialised reaches the gradients). ``alignment`` 1 leaves the rows as they are.
    """
    if alignment is None:
        alignment = NATIVE_GROUP_ALIGNMENT
    counts = tokens_per_expert.to(torch.long)
    num_experts = counts.shape[0]
    device = counts.device
    experts = torch.arange(num_experts, device=device)
    if alignment <= 1:
        offsets = torch.cumsum(counts, 0)  # ends at num_rows: the counts sum to it
        expert_of_row = torch.repeat_interleave(experts, counts, output_size=num_rows)
        return NativeGroupLayout(None, num_rows, offsets.to(torch.int32), expert_of_row)
    bound = num_rows + num_experts * alignment
    buffer_rows = (bound + alignment - 1) // alignment * alignment
    padded = ((counts + alignment - 1) // alignment).clamp_min(1) * alignment  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded
    sizes = torch.cat([padded[:-1], (buffer_rows - padded_start[-1:])])  # last group runs to the end
    offsets = torch.cat([padded_end[:-1], padded_end.new_full((1,), buffer_rows)])
    expert = torch.repeat_interleave(experts, counts, output_size=num_rows)  # [N] group of each input row
    start = torch.cumsum(counts, 0) - counts  # [E] first input row of each group
    rows = torch.arange(num_rows, device=device) - start[expert] + padded_start[expert]  # [N]
    expert_of_row = torch.repeat_interleave(experts, sizes, output_size=buffer_rows)
    return NativeGroupLayout(rows, buffer_rows, offsets.to(torch.int32), expert_of_row)


def _pad_rows(x: Tensor, layout: NativeGroupLayout) -> Tensor:
    """``[N, a]`` expert-sorted rows -> ``[num_rows, a]`` buffer (zeros between groups); differentiable."""
    if layout.rows is None:
        return x.contiguous()
    return x.new_zeros(layout.num_rows, x.shape[1]).index_copy(0, layout.rows, x)


def _unpad_rows(y: Tensor, layout: NativeGroupLayout) -> Tensor:
    """``[num_rows, b]`` buffer -> the ``[N, b]`` rows of the input (a fresh tensor)."""
    if layout.rows is None:
        return y
    return y.index_select(0, layout.rows)


class _GroupedBias(torch.autograd.Function):
    """``out + bias[expert_of_row]`` whose bias gradient, each group's row sum, accumulates in fp32.

    The backward of plain indexing adds the rows into the gradient in its own dtype, one row after the
    other (bf16 rounding at every step); here the row sums are one grouped product of a ones matrix with
    the output gradient, which accumulates in fp32 like the weight gradients.
    """

    @staticmethod
    def forward(ctx, out: Tensor, bias: Tensor, expert_of_row: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(offsets)
        return out + bias[expert_of_row]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (offsets,) = ctx.saved_tensors
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad = grad.contiguous()
            # [8, rows] column-major (16-byte aligned strides for any row count) times [rows, b], per group.
            ones = grad.new_ones(grad.shape[0], 8).t()
            grad_bias = torch._grouped_mm(ones, grad, offs=offsets)[:, 0].contiguous()  # [E, b]
        return grad, grad_bias, None, None


def _native_linear(x: Tensor, w: Tensor, layout: NativeGroupLayout, bias: Optional[Tensor]) -> Tensor:
    """One fused grouped product of the padded buffer ``x [num_rows, a]`` with ``w [E, a, b]`` (+ ``bias[e]``)."""
    out = torch._grouped_mm(x, w, offs=layout.offsets)  # [num_rows, b]
    if bias is not None:
        out = _GroupedBias.apply(out, bias, layout.expert_of_row, layout.offsets)
    return out


@torch.compiler.disable
def _loop_grouped_mm(x: Tensor, w: Tensor, tokens_per_expert: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The loop path (eager even under ``torch.compile``: the host-side group bounds would otherwise make
    every new routing a recompilation)."""
    return _LoopGroupedMM.apply(x, w, bias, _group_bounds(tokens_per_expert))


@torch.compiler.disable
def _loop_expert_ffn(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], tokens_per_expert: Tensor,
    activation: str,
) -> Tensor:
    """The loop path of :class:`GroupedFFNExperts` (eager under ``torch.compile``, as :func:`_loop_grouped_mm`).

    It computes in the dtype of its inputs, also under autocast (as :func:`grouped_mm`'s loop does)."""
    bounds = _group_bounds(tokens_per_expert)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _LoopExpertFFN.apply(x, w1, b1, w2, b2, bounds, activation)


def grouped_mm(x: Tensor, w: Tensor, tokens_per_expert: Tensor, bias: Tensor | None = None) -> Tensor:
    """Grouped matrix product of expert-sorted rows with per-expert weights.

    Args:
        x: ``[N, a]`` rows sorted by expert.
        w: ``[E, a, b]`` one weight per expert.
        tokens_per_expert: ``[E]`` rows per expert, summing to ``N``.
        bias: optional ``[E, b]``.

    Returns:
        ``[N, b]``. When :func:`native_grouped_mm_dtype` allows (CUDA sm90/sm100, bf16 or autocast to bf16,
        16-byte aligned widths) this is one ``torch._grouped_mm`` call on rows padded to
        :data:`NATIVE_GROUP_ALIGNMENT` (no host synchronisation); elsewhere a loop of matrix products over
        the groups with a hand-written backward (see :class:`_LoopGroupedMM`), one host read of the counts.
    """
    dtype = native_grouped_mm_dtype(x, (w,))
    if dtype is not None:
        layout = native_group_layout(tokens_per_expert, x.shape[0])
        b = None if bias is None else bias.to(dtype)
        return _unpad_rows(_native_linear(_pad_rows(x.to(dtype), layout), w.to(dtype), layout, b), layout)
    return _loop_grouped_mm(x, w, tokens_per_expert, bias)


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
        dtype = native_grouped_mm_dtype(x, (w1, w2))
        if dtype is not None:  # fused path: pad the groups once for both products
            layout = native_group_layout(tokens_per_expert, x.shape[0])
            cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
            h = _native_linear(_pad_rows(x.to(dtype), layout), cast(w1), layout, cast(b1))  # [rows, h]
            h = ACTIVATIONS[self.activation](h)
            return _unpad_rows(_native_linear(h, cast(w2), layout, cast(b2)), layout)  # [N, d]
        if x.dtype == w1.dtype == w2.dtype and self.activation in _ACTIVATION_BACKWARD:
            return _loop_expert_ffn(x, w1, b1, w2, b2, tokens_per_expert, self.activation)  # [N, d]
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
        dtype = native_grouped_mm_dtype(x, (w1, w3, w2))
        if dtype is not None:  # fused path: pad the groups once for the three products
            layout = native_group_layout(tokens_per_expert, x.shape[0])
            x_pad = _pad_rows(x.to(dtype), layout)  # [rows, d]
            gate = _native_linear(x_pad, w1.to(dtype), layout, None)  # [rows, h]
            up = _native_linear(x_pad, w3.to(dtype), layout, None)  # [rows, h]
            hidden = ACTIVATIONS[self.activation](gate) * up
            return _unpad_rows(_native_linear(hidden, w2.to(dtype), layout, None), layout)  # [N, d]
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
