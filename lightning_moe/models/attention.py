"""Multi-head attention on ``scaled_dot_product_attention``, attention masks and key/value caches.

The projections are plain ``nn.Linear`` layers (``q_proj``, ``k_proj``, ``v_proj`` column-wise,
``out_proj`` row-wise in tensor-parallel terms); heads are inferred from the projected width, so a
tensor-parallel shard that holds fewer heads works unchanged.

Masks follow ``scaled_dot_product_attention``'s boolean convention: True = may attend. Padding masks
passed in follow the model's convention: True = padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.models.dropout import dropout

__all__ = [
    "MultiHeadAttention",
    "SelfAttentionCache",
    "CrossAttentionCache",
    "key_padding_keep_mask",
    "causal_keep_mask",
    "attend",
    "SHORT_ATTENTION_SCORES",
]


def key_padding_keep_mask(padding_mask: Tensor | None) -> Tensor | None:
    """``[B, S]`` (True = padding) -> ``[B, 1, 1, S]`` (True = attend), or None.

    A sequence made only of padding attends to all its positions instead of none, so that its (unused)
    outputs stay finite rather than NaN.
    """
    if padding_mask is None:
        return None
    keep = ~padding_mask | padding_mask.all(dim=-1, keepdim=True)  # [B, S]
    return keep[:, None, None, :]  # [B, 1, 1, S]


def causal_keep_mask(
    num_queries: int,
    num_keys: int,
    device: torch.device,
    offset: int = 0,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Causal mask for queries at positions ``offset .. offset+num_queries-1`` over keys ``0 .. num_keys-1``.

    Returns ``[Tq, Tk]`` (True = attend), or ``[B, 1, Tq, Tk]`` when a key ``padding_mask [B, Tk]``
    (True = padding) is given; a query then always sees its own position, so no row is empty.
    """
    q_pos = torch.arange(num_queries, device=device) + offset  # [Tq]
    k_pos = torch.arange(num_keys, device=device)  # [Tk]
    keep = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
    if padding_mask is None:
        return keep
    keep = keep & ~padding_mask[:, None, :]  # [B, Tq, Tk]
    keep = keep | (k_pos[None, :] == q_pos[:, None])  # own position always visible
    return keep[:, None]  # [B, 1, Tq, Tk]


SHORT_ATTENTION_SCORES = 256 * 256
"""On CPU, attention with at most this many scores per head (``Tq x Tk``) runs as explicit matrix products.

``scaled_dot_product_attention``'s fused CPU kernel (flash) walks the sequence in blocks built for long
sequences; for the translator's sentences (tens of tokens) its backward took 16 ms per layer on a batch of
64 x 64 tokens, 3-10x the two batched products and a softmax that compute the same thing (the ``[B, H, Tq,
Tk]`` scores then take little memory). Longer sequences, and every other device, keep the fused kernel."""


def attend(
    q: Tensor, k: Tensor, v: Tensor, keep_mask: Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False
) -> Tensor:
    """``softmax(q k^T / sqrt(hd)) v`` over ``q [B, H, Tq, hd]`` and ``k, v [B, H, Tk, hd]`` -> ``[B, H, Tq, hd]``.

    Same contract as ``F.scaled_dot_product_attention`` (``keep_mask`` boolean, True = attend; ``is_causal``
    without a mask, aligned top-left); short sequences on CPU take the explicit path
    (:data:`SHORT_ATTENTION_SCORES`).
    """
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    if q.device.type != "cpu" or num_queries * num_keys > SHORT_ATTENTION_SCORES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask, dropout_p=dropout_p, is_causal=is_causal)
    if is_causal:
        keep_mask = causal_keep_mask(num_queries, num_keys, q.device)  # [Tq, Tk]
    scores = torch.matmul(q, k.transpose(-2, -1))  # [B, H, Tq, Tk], unscaled
    scale = q.shape[-1] ** -0.5
    if keep_mask is None:
        scores = scores * scale  # out of place: in place on the product's output takes autograd a slower way
    else:
        # The mask as 0 / -inf added with the scale in one pass: a masked_fill with a mask broadcast over the
        # heads is 3-6x slower than this add on CPU.
        mask_bias = torch.zeros(keep_mask.shape, dtype=scores.dtype, device=scores.device)
        scores = torch.add(mask_bias.masked_fill_(~keep_mask, float("-inf")), scores, alpha=scale)
    # torch's CPU softmax accumulates reduced-precision (bf16) inputs in fp32 and rounds once on output: the
    # same result as an fp32 softmax cast back, without the fp32 [B, H, Tq, Tk] copy and the cast.
    weights = torch.softmax(scores, dim=-1).to(v.dtype)  # [B, H, Tq, Tk]
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p)
    return torch.matmul(weights, v)  # [B, H, Tq, hd]


class SelfAttentionCache:
    """Keys and values of the positions already decoded, for one decoder self-attention.

    Stored in buffers preallocated for ``capacity`` positions (grown if exceeded), so a decoding step
    writes one slice instead of concatenating. For inference only (no autograd through several steps).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.k: Tensor | None = None  # [N, H, capacity, hd]
        self.v: Tensor | None = None  # [N, H, capacity, hd]
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v [N, H, t, hd]`` after the cached positions; return all of them ``[N, H, length, hd]``."""
        end = self.length + k.shape[2]
        if self.k is None or self.v is None:
            n, h, _, d = k.shape
            size = max(self.capacity, end)
            self.k = k.new_zeros(n, h, size, d)
            self.v = v.new_zeros(n, h, size, d)
        elif end > self.k.shape[2]:
            grow = max(end, 2 * self.k.shape[2]) - self.k.shape[2]
            self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], grow, self.k.shape[3])], dim=2)
            self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], grow, self.v.shape[3])], dim=2)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index [N']`` of the batch, in that order (beam reordering, dropping finished rows)."""
        if self.k is not None and self.v is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class CrossAttentionCache:
    """Keys and values of the encoder memory for one decoder cross-attention, computed once."""

    def __init__(self) -> None:
        self.k: Tensor | None = None  # [N, H, S, hd]
        self.v: Tensor | None = None  # [N, H, S, hd]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index [N']`` of the batch, in that order."""
        if self.k is not None and self.v is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``.

    Args:
        d_model: model width.
        num_heads: heads; must divide ``d_model``.
        dropout: dropout on the attention probabilities (training only).
    """

    tensor_parallel_plan = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "out_proj": "rowwise"}
    """How tensor parallelism splits the projections (plain data, read by ``lightning_moe.parallel``): heads
    are split over the ranks, each holding ``num_heads / tp`` of them."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections, zero biases."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: SelfAttentionCache | CrossAttentionCache | None = None,
    ) -> Tensor:
        """Attend from ``x [B, Tq, D]`` to ``memory [B, Tk, D]`` (cross) or to ``x`` itself (``memory=None``).

        Args:
            attn_mask: boolean, True = attend, broadcastable to ``[B, H, Tq, Tk]``.
            is_causal: causal self-attention without an explicit mask (only without ``attn_mask``).
            cache: a :class:`SelfAttentionCache` (self-attention: the new keys/values are appended and
                the queries attend to all cached positions) or a :class:`CrossAttentionCache`
                (cross-attention: the memory's keys/values are computed on the first call only).

        Returns:
            ``[B, Tq, D]``.
        """
        batch, num_queries, _ = x.shape
        q = self._split_heads(self.q_proj(x))  # [B, H, Tq, hd]
        if memory is None:
            k = self._split_heads(self.k_proj(x))  # [B, H, Tq, hd]
            v = self._split_heads(self.v_proj(x))
            if isinstance(cache, SelfAttentionCache):
                k, v = cache.append(k, v)  # [B, H, Tk, hd]
        elif isinstance(cache, CrossAttentionCache) and cache.k is not None and cache.v is not None:
            k, v = cache.k, cache.v  # [B, H, S, hd]
        else:
            k = self._split_heads(self.k_proj(memory))  # [B, H, S, hd]
            v = self._split_heads(self.v_proj(memory))
            if isinstance(cache, CrossAttentionCache):
                cache.k, cache.v = k, v
        out = attend(q, k, v, attn_mask, self.dropout if self.training else 0.0, is_causal)  # [B, H, Tq, hd]
        out = out.transpose(1, 2).reshape(batch, num_queries, -1)  # [B, Tq, D]
        return self.out_proj(out)
