"""Token cross entropy over a large vocabulary, computed in row chunks without ``[N, V]`` fp32 tensors.

The plain formula ``-log_softmax(logits.float()).gather(targets)`` materialises, per step, an fp32 copy of the
logits, the fp32 log-probabilities, and in backward a zero-filled ``[N, V]`` gradient for the gather, the
log-softmax gradient and the cast back: half a dozen passes over ``N x V`` floats in memory (with
``N = 8192`` target tokens and ``V = 8000`` that is 262 MB each). Under bf16-mixed on CPU this was the
largest single cost of a translator training step, more than the expert products.

:class:`TokenCrossEntropy` instead walks the logits in chunks of rows small enough to stay in cache. While a
chunk is in cache, forward computes its losses and its gradient for a unit weight per row (softmax minus the
smoothed target, fp32, written once in the logits' dtype); backward is then one pass that scales each row by
its weight, instead of a second conversion and exponential per element. Losses are fp32 maths on the given
logits and match the plain formula to fp32 rounding; the gradient carries one more rounding in the logits'
dtype (bf16: the unit gradient and the row weights, 2^-9 each), about the size of the one it already has.
The gradient can live in the logits' own memory (``overwrite_logits``) where nothing reads them afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["TokenCrossEntropy", "token_cross_entropy", "CHUNK_ELEMENTS_PER_THREAD"]

CHUNK_ELEMENTS_PER_THREAD = 1 << 18
"""Logits per chunk (rows x V) for each intra-op thread: every operation on a chunk is split over the threads, so
each core works on 1 MiB of fp32, which stays in its L2 cache (README, issue 15: a fixed 1 MiB chunk left two
threads 12% slower on the loss)."""


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS_PER_THREAD * torch.get_num_threads() // max(vocab, 1))


class TokenCrossEntropy(torch.autograd.Function):
    """``(nll, smoothed)`` per row of ``logits [N, V]`` for ``targets [N]``, both ``[N]`` fp32.

    ``nll = logsumexp(z) - z[target]``; ``smoothed = (1 - eps) * nll + eps * (logsumexp(z) - mean(z))``, the
    loss against the label-smoothed target ``(1 - eps) * onehot + eps / V`` (as ``F.cross_entropy`` defines it).
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, targets: Tensor, label_smoothing: float, overwrite_logits: bool
    ) -> tuple[Tensor, Tensor]:
        # logits: [N, V] any float dtype, targets: [N] long
        num_rows, vocab = logits.shape
        eps = label_smoothing
        nll = logits.new_empty(num_rows, dtype=torch.float32)  # [N]
        smoothed = nll if eps == 0.0 else logits.new_empty(num_rows, dtype=torch.float32)
        # d(smoothed)/d(logits) = softmax - target distribution, written while the chunk is in cache
        unit_grad = None  # [N, V] in the logits' dtype; each chunk's rows are read before they are written
        if ctx.needs_input_grad[0]:
            unit_grad = logits if overwrite_logits else torch.empty_like(logits)
        step = _chunk_rows(vocab)
        work = logits.new_empty(min(step, num_rows), vocab, dtype=torch.float32)  # [n, V] reused by every chunk
        for lo in range(0, num_rows, step):
            hi = min(lo + step, num_rows)
            rows_targets = targets[lo:hi, None]  # [n, 1]
            z = work[: hi - lo].copy_(logits[lo:hi])  # [n, V] fp32: the chunk's one conversion
            top = z.amax(dim=-1)  # [n]
            torch.sub(top, z.gather(-1, rows_targets).squeeze(-1), out=nll[lo:hi])
            if eps != 0.0:
                uniform = top - z.mean(dim=-1)  # [n]: CE against the uniform distribution, less lse
            exp = z.sub_(top[:, None]).exp_()  # [n, V]
            total = exp.sum(dim=-1)  # [n]
            log_total = total.log()  # [n]
            nll[lo:hi] += log_total
            if eps != 0.0:
                uniform += log_total
                torch.add(nll[lo:hi] * (1.0 - eps), uniform, alpha=eps, out=smoothed[lo:hi])
            if unit_grad is not None:
                probs = exp.mul_(total.reciprocal_()[:, None])  # [n, V] softmax
                probs.scatter_add_(-1, rows_targets, probs.new_full(rows_targets.shape, eps - 1.0))
                if eps != 0.0:
                    probs.sub_(eps / vocab)
                unit_grad[lo:hi].copy_(probs)
        ctx.label_smoothing = eps
        ctx.set_materialize_grads(False)  # an output that takes no part in the loss brings None, not zeros
        if unit_grad is not None:
            ctx.save_for_backward(unit_grad, targets)
        if smoothed is nll:
            smoothed = nll.clone()  # two distinct outputs for autograd
        return nll, smoothed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor | None, grad_smoothed: Tensor | None):
        # unit_grad is spent here: a second backward through the same graph fails on its version counter
        unit_grad, targets = ctx.saved_tensors  # [N, V], [N]
        eps: float = ctx.label_smoothing
        if grad_nll is None and grad_smoothed is None:
            return None, None, None, None
        g_nll = None if grad_nll is None else grad_nll.float()  # [N]
        g_all = g_nll if grad_smoothed is None else grad_smoothed.float() + (0.0 if g_nll is None else g_nll)
        # one pass over [N, V] in the logits' dtype; the row weights are rounded to it too (bf16: 2^-9)
        grad = unit_grad.mul_(g_all.to(unit_grad.dtype)[:, None])  # [N, V]
        if g_nll is not None and eps != 0.0:
            # nll's own gradient is softmax - onehot = unit_grad - eps * (onehot - 1/V), weighted by g_nll
            correction = g_nll * eps  # [N]
            grad.add_((correction / unit_grad.shape[-1]).to(grad.dtype)[:, None])
            grad.scatter_add_(-1, targets[:, None], -correction.to(grad.dtype)[:, None])
        return grad, None, None, None


def token_cross_entropy(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, overwrite_logits: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-token ``(nll, smoothed loss)``, ``[...]`` fp32 each, for ``logits [..., V]`` and ``targets [...]``.

    Chunked (see the module docstring) in eager mode on CPU; on other devices (where a chunk loop would be
    hundreds of small kernel launches and the memory is fast) and under ``torch.compile`` (which fuses it
    itself) the plain formula.

    ``overwrite_logits``: the chunked path keeps its gradient in the logits' own memory (no second ``[N, V]``
    block): for a caller that reads the logits no more after this call, e.g. a training loss. Ignored when the
    logits are a view of another tensor (e.g. a DTensor's local shard under tensor parallelism), whose memory
    autograd or another caller may still read.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # [N, V]
    flat_targets = targets.reshape(-1).long()  # [N]
    if torch.compiler.is_compiling() or logits.device.type != "cpu":
        lprobs = torch.log_softmax(flat_logits.float(), dim=-1)  # [N, V]
        nll = -lprobs.gather(-1, flat_targets[:, None]).squeeze(-1)  # [N]
        smoothed = nll if label_smoothing == 0.0 else (1.0 - label_smoothing) * nll - label_smoothing * lprobs.mean(-1)
    else:
        overwrite = overwrite_logits and logits._base is None
        nll, smoothed = TokenCrossEntropy.apply(
            flat_logits.contiguous(), flat_targets, float(label_smoothing), overwrite
        )
    return nll.view(targets.shape), smoothed.view(targets.shape)
