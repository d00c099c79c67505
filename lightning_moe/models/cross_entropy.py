"""Token cross entropy over a large vocabulary, computed in row chunks without ``[N, V]`` fp32 tensors.

The plain formula ``-log_softmax(logits.float()).gather(targets)`` materialises, per step, an fp32 copy of the
logits, the fp32 log-probabilities, and in backward a zero-filled ``[N, V]`` gradient for the gather, the
log-softmax gradient and the cast back: half a dozen passes over ``N x V`` floats in memory (with
``N = 8192`` target tokens and ``V = 8000`` that is 262 MB each). Under bf16-mixed on CPU this was the
largest single cost of a translator training step, more than the expert products.

:class:`TokenCrossEntropy` instead walks the logits in chunks of rows small enough to stay in cache: forward
keeps only the ``[N]`` log-normalisers, backward recomputes each chunk's softmax in fp32 and writes the
gradient straight in the logits' dtype. The maths is the same (fp32 throughout, the inputs' values are not
rounded further), so results match the plain formula to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["TokenCrossEntropy", "token_cross_entropy", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 18
"""Logits per chunk (rows x V): 1 MiB of fp32 working memory, which stays in a core's L2 cache."""


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


class TokenCrossEntropy(torch.autograd.Function):
    """``(nll, smoothed)`` per row of ``logits [N, V]`` for ``targets [N]``, both ``[N]`` fp32.

    ``nll = logsumexp(z) - z[target]``; ``smoothed = (1 - eps) * nll + eps * (logsumexp(z) - mean(z))``, the
    loss against the label-smoothed target ``(1 - eps) * onehot + eps / V`` (as ``F.cross_entropy`` defines it).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
        # logits: [N, V] any float dtype, targets: [N] long
        num_rows, vocab = logits.shape
        lse = logits.new_empty(num_rows, dtype=torch.float32)  # [N]
        nll = logits.new_empty(num_rows, dtype=torch.float32)  # [N]
        smoothed = nll if label_smoothing == 0.0 else logits.new_empty(num_rows, dtype=torch.float32)
        step = _chunk_rows(vocab)
        work = logits.new_empty(min(step, num_rows), vocab, dtype=torch.float32)  # [n, V] reused by every chunk
        for lo in range(0, num_rows, step):
            hi = min(lo + step, num_rows)
            z = work[: hi - lo].copy_(logits[lo:hi])  # [n, V] fp32: the chunk's one conversion
            top = z.amax(dim=-1, keepdim=True)  # [n, 1]
            torch.sub(top.squeeze(-1), z.gather(-1, targets[lo:hi, None]).squeeze(-1), out=nll[lo:hi])
            if label_smoothing != 0.0:
                uniform = top.squeeze(-1) - z.mean(dim=-1)  # [n]: CE against the uniform distribution, less lse
            log_sum_exp = z.sub_(top).exp_().sum(dim=-1).log_()  # [n]
            torch.add(log_sum_exp, top.squeeze(-1), out=lse[lo:hi])
            nll[lo:hi] += log_sum_exp
            if label_smoothing != 0.0:
                uniform += log_sum_exp
                torch.add(nll[lo:hi] * (1.0 - label_smoothing), uniform, alpha=label_smoothing, out=smoothed[lo:hi])
        ctx.save_for_backward(logits, targets, lse)
        ctx.label_smoothing = label_smoothing
        if smoothed is nll:
            smoothed = nll.clone()  # two distinct outputs for autograd
        return nll, smoothed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor | None, grad_smoothed: Tensor | None):
        logits, targets, lse = ctx.saved_tensors
        eps: float = ctx.label_smoothing
        num_rows, vocab = logits.shape
        zeros = lse.new_zeros(num_rows)
        g_nll = zeros if grad_nll is None else grad_nll.float()  # [N]
        g_smooth = zeros if grad_smoothed is None else grad_smoothed.float()  # [N]
        g_all = g_nll + g_smooth  # [N]: weight of the softmax term
        g_target = g_nll + (1.0 - eps) * g_smooth  # [N]: weight of the one-hot term
        grad = torch.empty_like(logits)  # [N, V] in the logits' dtype
        step = _chunk_rows(vocab)
        work = lse.new_empty(min(step, num_rows), vocab)  # [n, V] fp32, reused by every chunk
        for lo in range(0, num_rows, step):
            hi = min(lo + step, num_rows)
            p = work[: hi - lo].copy_(logits[lo:hi])  # [n, V] fp32
            p.sub_(lse[lo:hi, None]).exp_().mul_(g_all[lo:hi, None])  # softmax, weighted
            p.scatter_add_(-1, targets[lo:hi, None], -g_target[lo:hi, None])
            if eps != 0.0:
                p.sub_(g_smooth[lo:hi, None], alpha=eps / vocab)
            grad[lo:hi].copy_(p)
        return grad, None, None


def token_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-token ``(nll, smoothed loss)``, ``[...]`` fp32 each, for ``logits [..., V]`` and ``targets [...]``.

    Chunked (see the module docstring) in eager mode on CPU; on other devices (where a chunk loop would be
    hundreds of small kernel launches and the memory is fast) and under ``torch.compile`` (which fuses it
    itself) the plain formula.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # [N, V]
    flat_targets = targets.reshape(-1).long()  # [N]
    if torch.compiler.is_compiling() or logits.device.type != "cpu":
        lprobs = torch.log_softmax(flat_logits.float(), dim=-1)  # [N, V]
        nll = -lprobs.gather(-1, flat_targets[:, None]).squeeze(-1)  # [N]
        smoothed = nll if label_smoothing == 0.0 else (1.0 - label_smoothing) * nll - label_smoothing * lprobs.mean(-1)
    else:
        nll, smoothed = TokenCrossEntropy.apply(flat_logits.contiguous(), flat_targets, float(label_smoothing))
    return nll.view(targets.shape), smoothed.view(targets.shape)
