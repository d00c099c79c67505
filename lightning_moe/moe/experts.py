"""Grouped experts: every expert's weights live in one ``[E, ...]`` tensor.

The experts receive token rows already sorted by expert (rows of expert 0 first, then expert 1, ...)
and a ``[E]`` count of rows per expert. They compute only those rows: no capacity padding, no one-hot
dispatch. Keeping every weight as one grouped tensor lets the parallel code shard the experts over the
``ep`` mesh axis (``Shard(0)``) and move rows between ranks around :meth:`forward` (the layer's token
dispatcher) without this module knowing about it. The output depends on the input and on every parameter
even for zero rows, so that a rank which receives no rows still takes part in the backward collectives.

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
  and runs eagerly under ``torch.compile``. Under autocast it computes in the autocast dtype like an
  ``nn.Linear`` would (weights cast once per forward, fp32 gradients; bf16 on CPU uses the matrix units
  where the CPU has them), otherwise in the dtype of its inputs. The FFN and GLU experts run their whole
  expert as one autograd node, experts with few rows are spread over threads, and CPU weight gradients
  reuse the previous step's memory (:mod:`lightning_moe.moe.kernels.loop_experts`).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_moe.moe.activations import ACTIVATION_BACKWARD, ACTIVATIONS
from lightning_moe.moe.kernels.gradient_memory import GradientMemory, cast_in_kept_memory
from lightning_moe.moe.kernels.loop_experts import loop_expert_ffn, loop_expert_glu, loop_grouped_mm

__all__ = [
    "local_tensor",
    "grouped_mm",
    "compute_dtype",
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


def local_tensor(t: Tensor) -> Tensor:
    """The local part of ``t``: ``t.to_local()`` for a DTensor, ``t`` itself otherwise.

    Duck-typed so the model code does not import ``torch.distributed``.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


NATIVE_GROUP_ALIGNMENT = 8
"""Rows of each expert group in the fused path start at a multiple of this many rows (16 bytes of bf16).

The fused kernel reads every group through TMA descriptors, which want 16-byte aligned addresses; in the
backward pass the weight gradient is a grouped product over the *token* dimension, so group starts are
aligned by padding each group with zero rows (as torchtitan does). 1 disables the padding."""

_NATIVE_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
"""Devices whose ``torch._grouped_mm`` is used (tests add ``"cpu"``, where torch runs its reference loop)."""

_NATIVE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)
"""Compute dtypes of the fused kernel (tests add float32 for the CPU reference)."""


@functools.cache
def _cuda_capability_major(device_index: int | None) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


@torch.compiler.assume_constant_result  # evaluated once while tracing, not a graph break
def _fused_kernel_on(device: torch.device) -> bool:
    """Whether ``device`` has torch's fused grouped GEMM: CUDA sm90 or sm100 (elsewhere torch would loop
    over the groups after copying the offsets to the host, which the loop path does as well). Devices of
    other types in ``_NATIVE_DEVICE_TYPES`` (tests) count as having it."""
    if device.type != "cuda":
        return True
    return _cuda_capability_major(device.index) in (9, 10)


def compute_dtype(x: Tensor, weights: Sequence[Tensor]) -> torch.dtype | None:
    """The dtype a product of ``x`` with ``weights`` runs in, as ``nn.Linear`` would: the autocast dtype when autocast
    is on for ``x``'s device (activations often arrive in fp32 from a LayerNorm), else the common dtype of ``x`` and
    the weights (None when they differ). Used by the grouped experts and the output projection's logits block."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    if all(w.dtype == x.dtype for w in weights):
        return x.dtype
    return None


def _cast_for_loop(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` in the loop path's compute ``dtype`` (see :func:`compute_dtype`).

    Under autocast this is what autocast does to an ``nn.Linear``: the fp32 weights are cast once per forward
    (a differentiable cast, so their gradients arrive in fp32) and the products run in the autocast dtype, on
    the CPU's bf16 matrix units where it has them. The loop kernels themselves run with autocast off, in the
    dtype of what they are given. Without autocast every tensor already has ``dtype`` (nothing is copied).
    """
    return tuple(None if t is None else t.to(dtype) for t in tensors)  # .to() returns t itself when it has dtype


def _cast_weights_for_loop(dtype: torch.dtype, memory: GradientMemory, **weights: Tensor) -> tuple[Tensor, ...]:
    """The experts' ``[E, ...]`` weights cast like :func:`_cast_for_loop` does, each cast and its gradient in
    ``memory``'s blocks kept from step to step (:func:`cast_in_kept_memory`, keyed by the weight's name):
    blocks of the experts' size are mapped afresh by malloc, and their page faults cost more than the casts."""
    return tuple(cast_in_kept_memory(w, dtype, memory, name) for name, w in weights.items())


def _aligned_rows(t: Tensor, alignment: int) -> bool:
    """Row-major last two dimensions with 16-byte aligned rows and start (``alignment`` elements = 16 bytes).

    The start is checked through the storage offset (allocations themselves are aligned far beyond 16
    bytes). While ``torch.compile`` traces, neither the offset nor the address can be read; the weights
    are parameters or their FSDP / expert-parallel shards, whose offsets are multiples of a whole row.
    """
    if t.stride(-1) != 1 or t.shape[-1] % alignment or any(s % alignment for s in t.stride()[:-1]):
        return False
    return torch.compiler.is_compiling() or t.storage_offset() % alignment == 0


def native_grouped_mm_dtype(x: Tensor, weights: Sequence[Tensor]) -> torch.dtype | None:
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
    dtype = compute_dtype(x, weights)
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

    rows: Tensor | None
    num_rows: int
    offsets: Tensor
    expert_of_row: Tensor


def native_group_layout(tokens_per_expert: Tensor, num_rows: int, alignment: int | None = None) -> NativeGroupLayout:
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


def _native_linear(x: Tensor, w: Tensor, layout: NativeGroupLayout, bias: Tensor | None) -> Tensor:
    """One fused grouped product of the padded buffer ``x [num_rows, a]`` with ``w [E, a, b]`` (+ ``bias[e]``)."""
    out = torch._grouped_mm(x, w, offs=layout.offsets)  # [num_rows, b]
    if bias is not None:
        out = _GroupedBias.apply(out, bias, layout.expert_of_row, layout.offsets)
    return out


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
    dtype = compute_dtype(x, (w,))
    if dtype is not None:
        x, w, bias = _cast_for_loop(dtype, x, w, bias)
    return loop_grouped_mm(x, w, tokens_per_expert, bias)


def _init_grouped_linear_(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    """Initialise ``[E, fan_in, fan_out]`` like ``nn.Linear`` does for each expert."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class _GroupedExperts(nn.Module):
    """What the grouped expert kinds share: sizes, the activation (checked) and the CPU loop's gradient memory."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.gradient_memory = GradientMemory()

    def _weight(self, rows: int, cols: int) -> nn.Parameter:
        """An uninitialised grouped weight ``[E, rows, cols]``."""
        return nn.Parameter(torch.empty(self.num_experts, rows, cols))


class GroupedFFNExperts(_GroupedExperts):
    """``E`` two-layer FFN experts ``act(x W1[e] + b1[e]) W2[e] + b2[e]``.

    Args:
        num_experts: E.
        hidden_size: model width d.
        ffn_hidden_size: expert inner width h.
        activation: a key of :data:`ACTIVATIONS`.
        bias: whether the experts have biases (as ``nn.Linear`` does by default).

    Parameters: ``w1 [E, d, h]``, ``b1 [E, h]``, ``w2 [E, h, d]``, ``b2 [E, d]``.

    Attributes:
        gradient_memory: where the CPU loop path takes its weight gradients from
            (:class:`~lightning_moe.moe.kernels.gradient_memory.GradientMemory`; ``gradient_memory.enabled = False``
            frees the gradients' memory between steps instead of reusing it).
    """

    def __init__(
        self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu", bias: bool = True
    ) -> None:
        super().__init__(num_experts, hidden_size, ffn_hidden_size, activation)
        self.w1 = self._weight(hidden_size, ffn_hidden_size)
        self.w2 = self._weight(ffn_hidden_size, hidden_size)
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
        dtype = compute_dtype(x, (w1, w2))
        if dtype is not None and self.activation in ACTIVATION_BACKWARD:
            x, b1, b2 = _cast_for_loop(dtype, x, b1, b2)
            w1, w2 = _cast_weights_for_loop(dtype, self.gradient_memory, w1=w1, w2=w2)
            return loop_expert_ffn(x, w1, b1, w2, b2, tokens_per_expert, self.activation, self.gradient_memory)
        h = grouped_mm(x, w1, tokens_per_expert, b1)  # [N, h]
        h = ACTIVATIONS[self.activation](h)
        return grouped_mm(h, w2, tokens_per_expert, b2)  # [N, d]


class GroupedGLUExperts(_GroupedExperts):
    """``E`` gated (SwiGLU by default) experts ``(act(x W1[e]) * (x W3[e])) W2[e]``, no biases.

    Parameters: ``w1 [E, d, h]`` (gate), ``w3 [E, d, h]`` (up), ``w2 [E, h, d]`` (down).

    Attributes:
        gradient_memory: as in :class:`GroupedFFNExperts`.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "silu") -> None:
        super().__init__(num_experts, hidden_size, ffn_hidden_size, activation)
        self.w1 = self._weight(hidden_size, ffn_hidden_size)
        self.w3 = self._weight(hidden_size, ffn_hidden_size)
        self.w2 = self._weight(ffn_hidden_size, hidden_size)
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
        dtype = compute_dtype(x, (w1, w3, w2))
        if dtype is not None and self.activation in ACTIVATION_BACKWARD:
            (x,) = _cast_for_loop(dtype, x)
            w1, w3, w2 = _cast_weights_for_loop(dtype, self.gradient_memory, w1=w1, w3=w3, w2=w2)
            return loop_expert_glu(x, w1, w3, w2, tokens_per_expert, self.activation, self.gradient_memory)
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
            # No rows: still depend on x and every parameter (zero gradients), as the grouped experts do, so a
            # rank without rows joins the backward collectives of its peers (all-to-all, gradient reduction).
            zero = sum((p.sum() * 0 for p in stacked if p.requires_grad), x.sum() * 0)
            return x.new_zeros(x.shape) + zero.to(x.dtype)
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
