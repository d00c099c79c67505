"""The training loss's ``[tokens, vocab]`` logits in one block of host memory kept from step to step.

torch's CPU allocator is ``malloc``, and glibc maps every block over 32 MiB afresh and unmaps it on ``free``:
the logits of a translator step (4096 target tokens x 8000 pieces: 62.5 MiB in bf16, twice that in fp32) are
such a block, so every step paid a page fault for each of its 4 KiB pages, about 16,000 of them (on the
project's CPU about 18 ms of a 420 ms bf16 step). The training loss reads its logits once and writes their
gradient into the same memory (``overwrite_logits``); when that gradient has passed through the output
projection's backward nothing reads the memory any more, so the projection hands it back to a
:class:`LogitsBlock` and the next step's logits are written into it. Only there: logits that a caller may
keep (``forward``, generation, evaluation without gradients) are fresh tensors as before.

CPU only (GPU allocators cache freed blocks), eager only (``torch.compile`` plans its own buffers), and only
for a plain weight: a DTensor (tensor parallelism) keeps ``F.linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.moe.experts import compute_dtype

__all__ = ["LogitsBlock", "project_logits"]


class LogitsBlock:
    """One block of memory, lent to the logits of a forward pass and returned by their backward.

    At most one forward holds it at a time: a second forward before the first one's backward (two losses
    summed, for instance) gets fresh memory, and a forward whose backward never runs simply keeps it.
    Copies and pickles of a model start without a block.
    """

    def __init__(self) -> None:
        self._storage: torch.UntypedStorage | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the block waiting for the next forward (0 while lent out or before the first backward)."""
        return 0 if self._storage is None else self._storage.nbytes()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` on the block when it is free and large enough, else a fresh one.

        The tensor owns its memory like any other (it is not a view), so the loss may overwrite it.
        """
        storage, self._storage = self._storage, None
        needed = math.prod(shape) * dtype.itemsize
        if storage is None or storage.device != device or storage.nbytes() < needed:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)

    def give_back(self, tensor: Tensor) -> None:
        """Keep ``tensor``'s memory for the next :meth:`take` (the caller reads it no more)."""
        self._storage = tensor.untyped_storage()

    def __deepcopy__(self, memo: dict) -> LogitsBlock:
        return LogitsBlock()

    def __getstate__(self) -> dict:
        return {"_storage": None}


class _ProjectIntoBlock(torch.autograd.Function):
    """``hidden @ weight.T`` written into memory of a :class:`LogitsBlock`; returned to it by backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, block: LogitsBlock) -> Tensor:
        # hidden: [..., D], weight: [V, D] in one dtype
        rows = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
        logits = block.take((*hidden.shape[:-1], weight.shape[0]), hidden.dtype, hidden.device)  # [..., V]
        torch.mm(rows, weight.t(), out=logits.view(rows.shape[0], weight.shape[0]))
        ctx.save_for_backward(hidden, weight)
        ctx.block, ctx.logits_address = block, logits.untyped_storage().data_ptr()
        return logits

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])  # [N, V]
        grad_hidden = grad_rows.mm(weight).view(hidden.shape) if ctx.needs_input_grad[0] else None  # [..., D]
        grad_weight = grad_rows.t().mm(hidden.reshape(-1, hidden.shape[-1])) if ctx.needs_input_grad[1] else None
        # The loss wrote this gradient into the logits' own memory: after this node nothing reads it.
        if grad.is_contiguous() and grad.untyped_storage().data_ptr() == ctx.logits_address:
            ctx.block.give_back(grad)
        return grad_hidden, grad_weight, None


def project_logits(hidden: Tensor, weight: Tensor, block: LogitsBlock | None) -> Tensor:
    """``F.linear(hidden, weight)`` (``[..., D]`` by ``[V, D]`` -> ``[..., V]``), into ``block``'s memory where
    it can be: ``block`` given, gradients on, eager mode, CPU, plain tensors, and one compute dtype (the autocast
    dtype under autocast, as ``F.linear`` would compute in; else the common dtype of both)."""
    if (
        block is None
        or not torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or hidden.device.type != "cpu"
        or type(weight) not in (Tensor, torch.nn.Parameter)
        or type(hidden) is not Tensor
    ):
        return F.linear(hidden, weight)
    dtype = compute_dtype(hidden, (weight,))
    if dtype is None:
        return F.linear(hidden, weight)  # F.linear's own error for mixed dtypes
    with torch.autocast("cpu", enabled=False):
        # Differentiable casts, as autocast makes them: the weight's gradient arrives in its own dtype.
        return _ProjectIntoBlock.apply(hidden.to(dtype), weight.to(dtype), block)
