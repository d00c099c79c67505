"""The loop path of the grouped experts: one matrix product per expert, with hand-written backwards.

Used everywhere the fused ``torch._grouped_mm`` is not (CPU, fp32, other GPUs; see ``experts.py``). The
group sizes are read on the host once per call. Three autograd functions:

* :class:`LoopExpertFFN`: the whole ``fc1 -> act -> fc2`` expert as one node;
* :class:`LoopExpertGLU`: the whole gated expert ``(act(x w1) * (x w3)) w2`` as one node;
* :class:`LoopGroupedMM`: one grouped product (other dtypes mixed in, user code).

Each runs its experts one after the other, so the ``[n_e, h]`` intermediates are small, cache-resident and
allocated per expert (never a full ``[N, h]`` buffer); only the inputs and each expert's pre-activations are
saved, the activation is recomputed in backward. Weight gradients are written straight into one ``[E, ...]``
tensor each: indexing ``w[e]`` under autograd would build a full-size zero gradient per expert (O(E^2 d h)).
When the experts get few rows each, whole experts run on separate threads
(:mod:`lightning_moe.moe.kernels.expert_threads`); weight gradients on CPU reuse the memory of the previous step's
(:mod:`lightning_moe.moe.kernels.gradient_memory`).

On CPU each expert's rows are padded with zero rows to a rounded count (:data:`CPU_ROW_SIGNIFICANT_BITS`, see there)
before the products, and the padding rows are dropped from the output; their gradients are zero, so nothing else
changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_moe.moe.activations import ACTIVATION_BACKWARD_OUT, ACTIVATION_OUT
from lightning_moe.moe.kernels.expert_threads import run_over_experts
from lightning_moe.moe.kernels.gradient_memory import GradientMemory
from lightning_moe.moe.kernels.product_layout import columns_of, experts_by_columns, whole_experts_per_thread

__all__ = [
    "CPU_ROW_SIGNIFICANT_BITS",
    "rounded_rows",
    "pad_groups",
    "LoopExpertFFN",
    "LoopExpertGLU",
    "LoopGroupedMM",
    "loop_expert_ffn",
    "loop_expert_glu",
    "loop_grouped_mm",
]


CPU_ROW_SIGNIFICANT_BITS = 6
"""On CPU, each expert's row count is rounded up to its first this many binary digits (0 disables it).

oneDNN, which runs torch's bf16 products on CPU, builds a kernel for every product shape and keeps the last 1,024
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). Routing gives every expert a new row count at every step, and an expert
runs six product shapes per count (forward and backward), so at a few hundred rows per expert the cache
thrashes and most products build their kernel anew: 20-50% slower than the same products at fixed shapes
(README, issue 15). Rounded, the counts of one octave take 32 values, at a cost of under 1/32 of the rows in
zero padding (1.6% on average); counts under 64 stay as they are."""


def rounded_rows(count: int, significant_bits: int = CPU_ROW_SIGNIFICANT_BITS) -> int:
    """``count`` rounded up to its first ``significant_bits`` binary digits (1000 -> 1008 for 6 bits)."""
    if significant_bits <= 0:
        return count
    step = 1 << max(count.bit_length() - significant_bits, 0)
    return -(-count // step) * step


def _weight_grad(memory: GradientMemory | None, key: str, w: Tensor) -> Tensor:
    """An uninitialised ``[E, ...]`` gradient for ``w`` (reused memory when ``memory`` has some)."""
    return torch.empty_like(w, memory_format=torch.contiguous_format) if memory is None else memory.empty(key, w)


def _rows_buffers(like: Tensor, bounds: list[int], width: int, per_expert: int) -> list[Tensor]:
    """``per_expert`` uninitialised ``[n_e, width]`` tensors for each expert with rows, allocated by the caller's
    thread (see :func:`~lightning_moe.moe.kernels.expert_threads.run_over_experts` on why)."""
    return [
        like.new_empty(bounds[e + 1] - bounds[e], width)
        for e in range(len(bounds) - 1)
        if bounds[e + 1] > bounds[e]
        for _ in range(per_expert)
    ]


def _scratch(like: Tensor, count: int, width: int) -> Callable[[int], Tensor]:
    """Maker of ``[count, rows, width]`` working memory for :func:`run_over_experts`."""
    return lambda rows: like.new_empty(count, rows, width)


class LoopGroupedMM(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ w[e] (+ bias[e])`` for every expert ``e``."""

    @staticmethod
    def forward(
        ctx, x: Tensor, w: Tensor, bias: Tensor | None, bounds: list[int], memory: GradientMemory | None
    ) -> Tensor:
        # x: [N, a], w: [E, a, b], bias: [E, b] or None
        out = x.new_empty(x.shape[0], w.shape[2])  # [N, b]

        def run(first: int, last: int, scratch: None) -> None:
            for e in range(first, last):
                lo, hi = bounds[e], bounds[e + 1]
                if hi == lo:
                    continue
                if bias is None:
                    torch.mm(x[lo:hi], w[e], out=out[lo:hi])
                else:
                    torch.addmm(bias[e], x[lo:hi], w[e], out=out[lo:hi])

        run_over_experts(run, bounds, w.shape[1] * w.shape[2], any_rows=whole_experts_per_thread(*w.shape[1:], w))
        ctx.save_for_backward(x, w)
        ctx.bounds, ctx.memory, ctx.has_bias = bounds, memory, bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, w = ctx.saved_tensors
        bounds: list[int] = ctx.bounds
        grad_out = grad_out.contiguous()  # [N, b]; may arrive expanded (stride 0) from a sum()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if need_x else None  # [N, a]
        grad_w = _weight_grad(ctx.memory, "w", w) if need_w else None  # [E, a, b]
        grad_b = w.new_empty(w.shape[0], w.shape[2]) if need_b else None  # [E, b]
        in_width, out_width = w.shape[1], w.shape[2]
        by_columns = experts_by_columns(bounds, in_width, out_width, w)

        def run(first: int, last: int, in_scratch: Tensor | None) -> None:
            for e in range(first, last):
                lo, hi = bounds[e], bounds[e + 1]
                if hi == lo:  # an expert without rows has zero gradients
                    for grad in (grad_w, grad_b):
                        if grad is not None:
                            grad[e].zero_()
                    continue
                g = grad_out[lo:hi]  # [n_e, b]
                if grad_b is not None:
                    torch.sum(g, dim=0, out=grad_b[e])
                if by_columns[e]:  # the weight read in place, the rows transposed (product_layout.py)
                    if grad_x is not None:
                        grad_x_t = torch.mm(w[e], g.t(), out=columns_of(in_scratch, hi - lo))  # [a, n_e]
                        grad_x[lo:hi].copy_(grad_x_t.t())
                    if grad_w is not None:
                        x_t = columns_of(in_scratch, hi - lo).copy_(x[lo:hi].t())  # [a, n_e]
                        torch.mm(x_t, g, out=grad_w[e])  # [a, b]
                    continue
                if grad_x is not None:
                    torch.mm(g, w[e].t(), out=grad_x[lo:hi])
                if grad_w is not None:
                    torch.mm(x[lo:hi].t(), g, out=grad_w[e])

        def scratch(rows: int) -> Tensor | None:
            return x.new_empty(rows, in_width) if any(by_columns) else None

        run_over_experts(run, bounds, in_width * out_width, scratch, whole_experts_per_thread(in_width, out_width, w))
        return grad_x, grad_w, grad_b, None, None


class LoopExpertFFN(torch.autograd.Function):
    """The two-layer expert FFN ``act(x_e w1[e] + b1[e]) w2[e] + b2[e]`` for every expert, as one node."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        bounds: list[int],
        activation: str,
        memory: GradientMemory | None,
    ) -> Tensor:
        # x: [N, d], w1: [E, d, h], b1: [E, h] or None, w2: [E, h, d], b2: [E, d] or None
        act_out = ACTIVATION_OUT[activation]
        hidden_size = w1.shape[2]
        out = x.new_empty(x.shape[0], w2.shape[2])  # [N, d]
        pre_activations = _rows_buffers(x, bounds, hidden_size, 1)  # [n_e, h] for each expert with rows
        first_saved = _first_saved_index(bounds)

        def run(first: int, last: int, scratch: Tensor) -> None:
            for e in range(first, last):
                lo, hi = bounds[e], bounds[e + 1]
                if hi == lo:
                    continue
                pre = pre_activations[first_saved[e]]  # [n_e, h]
                if b1 is None:
                    torch.mm(x[lo:hi], w1[e], out=pre)
                else:
                    torch.addmm(b1[e], x[lo:hi], w1[e], out=pre)
                activated = act_out(pre, scratch[0, : hi - lo])  # [n_e, h]
                if b2 is None:
                    torch.mm(activated, w2[e], out=out[lo:hi])
                else:
                    torch.addmm(b2[e], activated, w2[e], out=out[lo:hi])

        any_rows = whole_experts_per_thread(w1.shape[1], hidden_size, w1)
        run_over_experts(run, bounds, w1.shape[1] * hidden_size, _scratch(x, 1, hidden_size), any_rows)
        ctx.save_for_backward(x, w1, w2, *pre_activations)
        ctx.bounds, ctx.activation, ctx.memory = bounds, activation, memory
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, w1, w2, *pre_activations = ctx.saved_tensors
        bounds: list[int] = ctx.bounds
        act_out, act_backward_out = ACTIVATION_OUT[ctx.activation], ACTIVATION_BACKWARD_OUT[ctx.activation]
        grad_out = grad_out.contiguous()  # [N, d]; may arrive expanded (stride 0) from a sum()
        need = ctx.needs_input_grad
        num_experts, hidden_size = w1.shape[0], w1.shape[2]
        grad_x = torch.empty_like(x) if need[0] else None  # [N, d]
        grad_w1 = _weight_grad(ctx.memory, "w1", w1) if need[1] else None  # [E, d, h]
        grad_b1 = w1.new_empty(num_experts, hidden_size) if ctx.has_b1 and need[2] else None  # [E, h]
        grad_w2 = _weight_grad(ctx.memory, "w2", w2) if need[3] else None  # [E, h, d]
        grad_b2 = w2.new_empty(num_experts, w2.shape[2]) if ctx.has_b2 and need[4] else None  # [E, d]
        need_hidden_grad = grad_x is not None or grad_w1 is not None or grad_b1 is not None
        first_saved = _first_saved_index(bounds)
        model_size = w1.shape[1]
        by_columns = experts_by_columns(bounds, model_size, hidden_size, w1)

        def run(first: int, last: int, scratch: tuple[Tensor, Tensor | None]) -> None:
            hidden_scratch, model_scratch = scratch  # [3, rows, h], [rows, d] (None when no expert needs it)
            for e in range(first, last):
                lo, hi = bounds[e], bounds[e + 1]
                if hi == lo:  # an expert without rows has zero gradients
                    for grad in (grad_w1, grad_b1, grad_w2, grad_b2):
                        if grad is not None:
                            grad[e].zero_()
                    continue
                n = hi - lo
                pre = pre_activations[first_saved[e]]  # [n, h]
                g = grad_out[lo:hi]  # [n, d]
                if grad_b2 is not None:
                    torch.sum(g, dim=0, out=grad_b2[e])
                if by_columns[e]:  # transposed activations, weights read in place (product_layout.py)
                    pre_t = columns_of(hidden_scratch[0], n).copy_(pre.t())  # [h, n]
                    if grad_w2 is not None:
                        activated_t = act_out(pre_t, columns_of(hidden_scratch[1], n))  # [h, n]
                        torch.mm(activated_t, g, out=grad_w2[e])  # [h, d]
                    if not need_hidden_grad:
                        continue
                    grad_activated_t = torch.mm(w2[e], g.t(), out=columns_of(hidden_scratch[2], n))  # [h, n]
                    grad_pre_t = act_backward_out(grad_activated_t, pre_t, columns_of(hidden_scratch[1], n))
                    if grad_w1 is not None:
                        x_t = columns_of(model_scratch, n).copy_(x[lo:hi].t())  # [d, n]
                        torch.mm(x_t, grad_pre_t.t(), out=grad_w1[e])  # [d, h]
                    if grad_b1 is not None:
                        torch.sum(grad_pre_t, dim=1, out=grad_b1[e])
                    if grad_x is not None:
                        grad_x_t = torch.mm(w1[e], grad_pre_t, out=columns_of(model_scratch, n))  # [d, n]
                        grad_x[lo:hi].copy_(grad_x_t.t())
                    continue
                if grad_w2 is not None:
                    torch.mm(act_out(pre, hidden_scratch[0, :n]).t(), g, out=grad_w2[e])  # [h, d]
                if not need_hidden_grad:
                    continue
                grad_activated = torch.mm(g, w2[e].t(), out=hidden_scratch[1, :n])  # [n, h]
                grad_pre = act_backward_out(grad_activated, pre, hidden_scratch[0, :n])  # [n, h]
                if grad_w1 is not None:
                    torch.mm(x[lo:hi].t(), grad_pre, out=grad_w1[e])  # [d, h]
                if grad_b1 is not None:
                    torch.sum(grad_pre, dim=0, out=grad_b1[e])
                if grad_x is not None:
                    torch.mm(grad_pre, w1[e].t(), out=grad_x[lo:hi])  # [n, d]

        def scratch(rows: int) -> tuple[Tensor, Tensor | None]:
            return x.new_empty(3, rows, hidden_size), x.new_empty(rows, model_size) if any(by_columns) else None

        run_over_experts(
            run, bounds, model_size * hidden_size, scratch, whole_experts_per_thread(model_size, hidden_size, w1)
        )
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


class LoopExpertGLU(torch.autograd.Function):
    """The gated expert ``(act(x_e w1[e]) * (x_e w3[e])) w2[e]`` (SwiGLU with silu) for every expert, as one node."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        w1: Tensor,
        w3: Tensor,
        w2: Tensor,
        bounds: list[int],
        activation: str,
        memory: GradientMemory | None,
    ) -> Tensor:
        # x: [N, d], w1 (gate) and w3 (up): [E, d, h], w2 (down): [E, h, d]
        act_out = ACTIVATION_OUT[activation]
        hidden_size = w1.shape[2]
        out = x.new_empty(x.shape[0], w2.shape[2])  # [N, d]
        saved = _rows_buffers(x, bounds, hidden_size, 2)  # gate, up [n_e, h] of each expert with rows
        first_saved = _first_saved_index(bounds)

        def run(first: int, last: int, scratch: Tensor) -> None:
            for e in range(first, last):
                lo, hi = bounds[e], bounds[e + 1]
                if hi == lo:
                    continue
                gate, up = saved[2 * first_saved[e]], saved[2 * first_saved[e] + 1]  # [n_e, h] each
                torch.mm(x[lo:hi], w1[e], out=gate)
                torch.mm(x[lo:hi], w3[e], out=up)
                hidden = act_out(gate, scratch[0, : hi - lo]).mul_(up)  # [n_e, h]
                torch.mm(hidden, w2[e], out=out[lo:hi])

        any_rows = whole_experts_per_thread(w1.shape[1], hidden_size, w1)
        run_over_experts(run, bounds, w1.shape[1] * hidden_size, _scratch(x, 1, hidden_size), any_rows)
        ctx.save_for_backward(x, w1, w3, w2, *saved)
        ctx.bounds, ctx.activation, ctx.memory = bounds, activation, memory
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, w1, w3, w2, *saved = ctx.saved_tensors
        bounds: list[int] = ctx.bounds
        act_out, act_backward_out = ACTIVATION_OUT[ctx.activation], ACTIVATION_BACKWARD_OUT[ctx.activation]
        grad_out = grad_out.contiguous()  # [N, d]
        need = ctx.needs_input_grad
        hidden_size = w1.shape[2]
        grad_x = torch.empty_like(x) if need[0] else None  # [N, d]
        grad_w1 = _weight_grad(ctx.memory, "w1", w1) if need[1] else None  # [E, d, h]
        grad_w3 = _weight_grad(ctx.memory, "w3", w3) if need[2] else None  # [E, d, h]
        grad_w2 = _weight_grad(ctx.memory, "w2", w2) if need[3] else None  # [E, h, d]
        need_hidden_grad = grad_x is not None or grad_w1 is not None or grad_w3 is not None
        first_saved = _first_saved_index(bounds)
        model_size = w1.shape[1]
        by_columns = experts_by_columns(bounds, model_size, hidden_size, w1)

        def run(first: int, last: int, scratch: tuple[Tensor, Tensor | None]) -> None:
            hidden_scratch, model_scratch = scratch  # [4, rows, h], [rows, d] (None when no expert needs it)
            for e in range(first, last):
                lo, hi = bounds[e], bounds[e + 1]
                if hi == lo:  # an expert without rows has zero gradients
                    for grad in (grad_w1, grad_w3, grad_w2):
                        if grad is not None:
                            grad[e].zero_()
                    continue
                n = hi - lo
                gate, up = saved[2 * first_saved[e]], saved[2 * first_saved[e] + 1]  # [n_e, h] each
                g = grad_out[lo:hi]  # [n_e, d]
                if by_columns[e]:  # transposed activations, weights read in place (product_layout.py)
                    gate_t = columns_of(hidden_scratch[0], n).copy_(gate.t())  # [h, n]
                    up_t = columns_of(hidden_scratch[1], n).copy_(up.t())  # [h, n]
                    activated_t = act_out(gate_t, columns_of(hidden_scratch[2], n))  # [h, n]
                    if grad_w2 is not None:
                        hidden_t = torch.mul(activated_t, up_t, out=columns_of(hidden_scratch[3], n))  # [h, n]
                        torch.mm(hidden_t, g, out=grad_w2[e])  # [h, d]
                    if not need_hidden_grad:
                        continue
                    grad_hidden_t = torch.mm(w2[e], g.t(), out=columns_of(hidden_scratch[3], n))  # [h, n]
                    grad_up_t = activated_t.mul_(grad_hidden_t)  # [h, n] (overwrites the activation)
                    grad_gate_t = act_backward_out(grad_hidden_t.mul_(up_t), gate_t, up_t)  # [h, n] (over up)
                    if grad_w1 is not None or grad_w3 is not None:
                        x_t = columns_of(model_scratch, n).copy_(x[lo:hi].t())  # [d, n]
                        if grad_w1 is not None:
                            torch.mm(x_t, grad_gate_t.t(), out=grad_w1[e])  # [d, h]
                        if grad_w3 is not None:
                            torch.mm(x_t, grad_up_t.t(), out=grad_w3[e])  # [d, h]
                    if grad_x is not None:
                        grad_x_t = torch.mm(w1[e], grad_gate_t, out=columns_of(model_scratch, n))  # [d, n]
                        grad_x[lo:hi].copy_(grad_x_t.addmm_(w3[e], grad_up_t).t())
                    continue
                activated = act_out(gate, hidden_scratch[0, :n])  # [n_e, h]
                if grad_w2 is not None:
                    hidden = torch.mul(activated, up, out=hidden_scratch[1, :n])  # [n_e, h]
                    torch.mm(hidden.t(), g, out=grad_w2[e])  # [h, d]
                if not need_hidden_grad:
                    continue
                grad_hidden = torch.mm(g, w2[e].t(), out=hidden_scratch[2, :n])  # [n_e, h]
                grad_up = activated.mul_(grad_hidden)  # [n_e, h] (overwrites the activation)
                grad_gate = act_backward_out(grad_hidden.mul_(up), gate, hidden_scratch[1, :n])  # [n_e, h]
                if grad_w1 is not None:
                    torch.mm(x[lo:hi].t(), grad_gate, out=grad_w1[e])  # [d, h]
                if grad_w3 is not None:
                    torch.mm(x[lo:hi].t(), grad_up, out=grad_w3[e])  # [d, h]
                if grad_x is not None:
                    torch.mm(grad_gate, w1[e].t(), out=grad_x[lo:hi]).addmm_(grad_up, w3[e].t())  # [n_e, d]

        def scratch(rows: int) -> tuple[Tensor, Tensor | None]:
            return x.new_empty(4, rows, hidden_size), x.new_empty(rows, model_size) if any(by_columns) else None

        run_over_experts(
            run, bounds, model_size * hidden_size, scratch, whole_experts_per_thread(model_size, hidden_size, w1)
        )
        return grad_x, grad_w1, grad_w3, grad_w2, None, None, None


def _first_saved_index(bounds: list[int]) -> list[int]:
    """For each expert, how many experts before it have rows (where its saved tensors start)."""
    index = [0]
    for e in range(len(bounds) - 1):
        index.append(index[-1] + (bounds[e + 1] > bounds[e]))
    return index


class _PaddedGroups(NamedTuple):
    """Expert groups padded to rounded sizes (``rows`` etc. None when no group needs padding: nothing is copied).

    Attributes:
        bounds: group offsets in the padded buffer, ``[0, p_0, p_0+p_1, ..., P]``.
        rows: ``[N]`` long, the padded row of each input row.
        source: ``[P]`` long, the input row of each padded row (0 for padding rows).
        padding: ``[P - N]`` long, the padding rows.
    """

    bounds: list[int]
    rows: Tensor | None = None
    source: Tensor | None = None
    padding: Tensor | None = None


def pad_groups(tokens_per_expert: Tensor, significant_bits: int, device: torch.device) -> _PaddedGroups:
    """The padded layout of expert-sorted rows with ``tokens_per_expert [E]`` rows per expert, each group
    :func:`rounded_rows` long (one host read)."""
    counts = [int(c) for c in tokens_per_expert.tolist()]
    padded = [rounded_rows(c, significant_bits) for c in counts]
    bounds = [0]
    for size in padded:
        bounds.append(bounds[-1] + size)
    if padded == counts:
        return _PaddedGroups(bounds)
    # Each group's rows move by the padding of the groups before it.
    shift, unpadded_start = [], 0
    for start, count in zip(bounds, counts):
        shift.append(start - unpadded_start)
        unpadded_start += count
    shift = torch.tensor(shift, device=device)  # [E]
    num_rows = unpadded_start
    rows = torch.arange(num_rows, device=device) + torch.repeat_interleave(
        shift, torch.tensor(counts, device=device), output_size=num_rows
    )  # [N]
    source = torch.zeros(bounds[-1], dtype=torch.long, device=device).index_copy_(
        0, rows, torch.arange(num_rows, device=device)
    )  # [P]
    is_padding = torch.ones(bounds[-1], dtype=torch.bool, device=device).index_fill_(0, rows, False)  # [P]
    return _PaddedGroups(bounds, rows, source, is_padding.nonzero().squeeze(1))


class _MoveRows(torch.autograd.Function):
    """``out = x[index]`` with the rows ``zero`` of ``out`` set to 0; the gradient goes back by gathering too,
    ``grad_x = grad_out[back]`` with the rows ``back_zero`` set to 0. Valid where every row of ``x`` lands in one
    row of ``out`` and the other rows of ``out`` are zeroed (padding and unpadding): nothing is scattered."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, zero: Tensor | None, back: Tensor, back_zero: Tensor | None) -> Tensor:
        ctx.save_for_backward(back, back_zero)
        out = x.index_select(0, index)
        return out if zero is None else out.index_fill_(0, zero, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        back, back_zero = ctx.saved_tensors
        grad_x = grad_out.index_select(0, back)
        if back_zero is not None:
            grad_x.index_fill_(0, back_zero, 0)
        return grad_x, None, None, None, None


def _pad(x: Tensor, groups: _PaddedGroups) -> Tensor:
    """``x [N, a]`` -> ``[bounds[-1], a]`` with zero padding rows (differentiable)."""
    if groups.rows is None:
        return x
    return _MoveRows.apply(x, groups.source, groups.padding, groups.rows, None)


def _unpad(out: Tensor, groups: _PaddedGroups) -> Tensor:
    """The rows of ``out [bounds[-1], b]`` that belong to input rows: ``[N, b]`` (differentiable; the padding rows
    get zero gradients)."""
    if groups.rows is None:
        return out
    return _MoveRows.apply(out, groups.rows, None, groups.source, groups.padding)


def _groups(x: Tensor, tokens_per_expert: Tensor) -> _PaddedGroups:
    significant_bits = CPU_ROW_SIGNIFICANT_BITS if x.device.type == "cpu" else 0
    return pad_groups(tokens_per_expert, significant_bits, x.device)


@torch.compiler.disable
def loop_grouped_mm(
    x: Tensor, w: Tensor, tokens_per_expert: Tensor, bias: Tensor | None = None, memory: GradientMemory | None = None
) -> Tensor:
    """:class:`LoopGroupedMM` in the dtype of its inputs, also under autocast (eager even under
    ``torch.compile``: the host-side group bounds would otherwise make every new routing a recompilation)."""
    groups = _groups(x, tokens_per_expert)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _unpad(LoopGroupedMM.apply(_pad(x, groups), w, bias, groups.bounds, memory), groups)


@torch.compiler.disable
def loop_expert_ffn(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    tokens_per_expert: Tensor,
    activation: str,
    memory: GradientMemory | None = None,
) -> Tensor:
    """:class:`LoopExpertFFN` in the dtype of its inputs, also under autocast (eager under ``torch.compile``)."""
    groups = _groups(x, tokens_per_expert)
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = LoopExpertFFN.apply(_pad(x, groups), w1, b1, w2, b2, groups.bounds, activation, memory)
        return _unpad(out, groups)


@torch.compiler.disable
def loop_expert_glu(
    x: Tensor,
    w1: Tensor,
    w3: Tensor,
    w2: Tensor,
    tokens_per_expert: Tensor,
    activation: str,
    memory: GradientMemory | None = None,
) -> Tensor:
    """:class:`LoopExpertGLU` in the dtype of its inputs, also under autocast (eager under ``torch.compile``)."""
    groups = _groups(x, tokens_per_expert)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _unpad(LoopExpertGLU.apply(_pad(x, groups), w1, w3, w2, groups.bounds, activation, memory), groups)
