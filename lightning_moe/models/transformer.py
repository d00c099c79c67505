"""Pre-LayerNorm encoder-decoder transformer whose FFNs are dense or Mixture-of-Experts layers.

Plain tensor code: no ``torch.distributed`` and no Lightning. The encoder and decoder blocks are direct
children of ``nn.ModuleList``s (``encoder_layers``, ``decoder_layers``), the units the parallel code wraps
for FSDP and activation checkpointing; a block returns a tuple ``(x, aux_loss or None, expert_counts or
None)`` so that hooks which walk outputs as pytrees see every tensor.

Conventions: token ids are ``long``; padding masks are ``bool`` with True = padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.models.attention import (
    CrossAttentionCache,
    MultiHeadAttention,
    SelfAttentionCache,
    causal_keep_mask,
    key_padding_keep_mask,
)
from lightning_moe.models.config import TransformerConfig
from lightning_moe.models.cross_entropy import token_cross_entropy
from lightning_moe.models.dropout import Dropout
from lightning_moe.models.logits_block import LogitsBlock, project_logits
from lightning_moe.models.norm import LayerNorm
from lightning_moe.moe import MoE
from lightning_moe.moe.experts import ACTIVATIONS

__all__ = [
    "ModelOutput",
    "FeedForward",
    "TiedOutputHead",
    "OutputProjection",
    "EncoderLayer",
    "DecoderLayer",
    "DecoderCache",
    "MoETransformer",
    "sinusoidal_positions",
    "sequence_cross_entropy",
    "BATCH_KEYS",
]

BATCH_KEYS = ("src", "src_padding_mask", "tgt_in", "tgt_out", "tgt_padding_mask")
"""Keys of the batch mapping read by :meth:`MoETransformer.loss` (extra keys are ignored)."""


class ModelOutput(NamedTuple):
    """What :meth:`MoETransformer.forward` returns (a NamedTuple, so pytree-aware hooks see its tensors).

    Attributes:
        logits: ``[B, T, V]`` in the model's compute dtype.
        aux_loss: fp32 scalar, the sum of every MoE layer's weighted aux loss (0 for a dense model).
        expert_counts: one ``[E]`` long tensor per MoE layer (encoder first, then decoder): tokens routed
            to each expert in this call, padding excluded.
    """

    logits: Tensor
    aux_loss: Tensor
    expert_counts: list[Tensor]


BlockOutput = tuple[Tensor, Tensor | None, Tensor | None]
"""``(x [B, T, D], aux_loss scalar or None, expert_counts [E] or None)``: None for a dense block."""


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """Fixed position encodings ``[..., dim]`` (fp32) of integer ``positions [...]``.

    The first half of the features is ``sin(pos * w_i)``, the second half ``cos(pos * w_i)``, with
    ``w_i = 10000^(-2i/dim)`` (Vaswani et al., in the concatenated layout); an odd ``dim`` gets a zero
    last feature.
    """
    half = dim // 2
    inv_freq = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32) * (-2.0 * math.log(10000.0) / dim)
    )  # [half]
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., half]
    enc = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # [..., 2*half]
    if dim % 2:
        enc = F.pad(enc, (0, 1))
    return enc


class FeedForward(nn.Module):
    """Dense FFN: ``fc2(act(fc1 x))`` (``kind="ffn"``, with biases) or ``fc2(act(fc1 x) * fc3 x)``
    (``"glu"``, no biases).

    The same functions as the experts of the same kind, so a dense twin computes what one expert would.
    ``fc1``/``fc3`` split column-wise and ``fc2`` row-wise under tensor parallelism.
    """

    tensor_parallel_plan = {"fc1": "colwise", "fc3": "colwise", "fc2": "rowwise"}
    """How tensor parallelism splits the layers (plain data, read by ``lightning_moe.parallel``)."""

    def __init__(
        self, d_model: int, hidden_size: int, kind: str = "ffn", activation: str = "gelu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if kind not in ("ffn", "glu"):
            raise ValueError(f"kind={kind!r} is not supported: use 'ffn' or 'glu'")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported: use one of {sorted(ACTIVATIONS)}")
        bias = kind == "ffn"
        self.activation = activation
        self.fc1 = nn.Linear(d_model, hidden_size, bias=bias)
        self.fc3: nn.Linear | None = nn.Linear(d_model, hidden_size, bias=False) if kind == "glu" else None
        self.fc2 = nn.Linear(hidden_size, d_model, bias=bias)
        self.dropout = Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights, zero biases."""
        for linear in (self.fc1, self.fc2, self.fc3):
            if linear is None:
                continue
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``."""
        h = ACTIVATIONS[self.activation](self.fc1(x))  # [..., H]
        if self.fc3 is not None:
            h = h * self.fc3(x)
        return self.fc2(self.dropout(h))


class TiedOutputHead(nn.Module):
    """Output projection onto the vocabulary with an embedding's table: ``[..., D] -> [..., V]``.

    Holds no parameter of its own: the table stays registered (and saved) only under the embedding, so
    state dict keys and ``named_parameters`` list it once. The embedding is referenced, not registered as
    a child, and its ``weight`` is read at every call, so whatever replaced it since (a meta tensor
    materialised, a DTensor shard, FSDP's gathered parameter) is used. Being a module of its own lets a
    parallel plan wrap the projection (style ``"tied_head"``) without the model knowing how.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = (embedding,)  # a tuple: nn.Module does not register it as a child

    @property
    def embedding(self) -> nn.Embedding:
        """The embedding whose ``weight [V, D]`` is the projection."""
        return self._embedding[0]

    def forward(self, hidden: Tensor, logits_block: LogitsBlock | None = None) -> Tensor:
        """``hidden [..., D]`` -> logits ``[..., V]`` (in ``logits_block``'s memory where it can be)."""
        return project_logits(hidden, self.embedding.weight, logits_block)


class OutputProjection(nn.Linear):
    """The untied output projection ``[..., D] -> [..., V]``: an ``nn.Linear`` without bias whose logits can
    go into a :class:`~lightning_moe.models.logits_block.LogitsBlock`."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, hidden: Tensor, logits_block: LogitsBlock | None = None) -> Tensor:
        """``hidden [..., D]`` -> logits ``[..., V]`` (in ``logits_block``'s memory where it can be)."""
        return project_logits(hidden, self.weight, logits_block)


def _build_ffn(config: TransformerConfig, index: int, decoder: bool = False) -> nn.Module:
    """The FFN of block ``index`` (of the encoder, or the decoder): an MoE layer at MoE positions of an MoE
    model, else a dense FFN."""
    moe = config.moe
    if moe.enabled and config.is_moe_position(index):
        num_experts = config.num_experts_at(index, decoder)
        return MoE(config.d_model, num_experts, config.ffn_hidden_size, **moe.layer_kwargs())
    return FeedForward(
        config.d_model,
        config.dense_ffn_hidden_size(index),
        kind=moe.expert,
        activation=moe.resolved_activation,
        dropout=config.activation_dropout,
    )


def _apply_ffn(ffn: nn.Module, x: Tensor, padding_mask: Tensor | None) -> BlockOutput:
    """Run a block's FFN; an MoE layer gets the padding mask (padding is not routed)."""
    if isinstance(ffn, MoE):
        out = ffn(x, padding_mask=padding_mask)
        return out.output, out.aux_loss, out.expert_counts
    return ffn(x), None, None


class EncoderLayer(nn.Module):
    """Pre-LN encoder block: ``x + attn(ln(x))``, then ``x + ffn(ln(x))`` (dense FFN or MoE)."""

    def __init__(self, config: TransformerConfig, index: int) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn_norm = LayerNorm(d, eps=config.norm_eps)
        self.self_attn = MultiHeadAttention(d, config.num_heads, config.attention_dropout)
        self.ffn_norm = LayerNorm(d, eps=config.norm_eps)
        self.ffn = _build_ffn(config, index)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> BlockOutput:
        """``x [B, S, D]``, ``padding_mask [B, S]`` -> ``(x, aux_loss, expert_counts)``."""
        attn_mask = key_padding_keep_mask(padding_mask)  # [B, 1, 1, S]
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), attn_mask=attn_mask))
        h, aux, counts = _apply_ffn(self.ffn, self.ffn_norm(x), padding_mask)
        return x + self.dropout(h), aux, counts


class LayerCache(NamedTuple):
    """Caches of one decoder block."""

    self_attn: SelfAttentionCache
    cross_attn: CrossAttentionCache


class DecoderCache:
    """Key/value caches of every decoder block, for incremental decoding.

    Args:
        num_layers: decoder blocks.
        capacity: positions to preallocate (grown if exceeded).
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.layers = [LayerCache(SelfAttentionCache(capacity), CrossAttentionCache()) for _ in range(num_layers)]

    @property
    def position(self) -> int:
        """Target positions already decoded (the position of the next input token)."""
        return self.layers[0].self_attn.length

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index [N']`` in that order (beam reordering and dropping finished rows)."""
        self.reorder_self_attention(index)
        self.reorder_cross_attention(index)

    def reorder_self_attention(self, index: Tensor) -> None:
        """Reorder only the self-attention caches (beams of one source share their cross-attention keys)."""
        for layer in self.layers:
            layer.self_attn.reorder(index)

    def reorder_cross_attention(self, index: Tensor) -> None:
        """Reorder only the cross-attention caches."""
        for layer in self.layers:
            layer.cross_attn.reorder(index)


class DecoderLayer(nn.Module):
    """Pre-LN decoder block: causal self-attention, cross-attention to the encoder memory, FFN or MoE."""

    def __init__(self, config: TransformerConfig, index: int) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn_norm = LayerNorm(d, eps=config.norm_eps)
        self.self_attn = MultiHeadAttention(d, config.num_heads, config.attention_dropout)
        self.cross_attn_norm = LayerNorm(d, eps=config.norm_eps)
        self.cross_attn = MultiHeadAttention(d, config.num_heads, config.attention_dropout)
        self.ffn_norm = LayerNorm(d, eps=config.norm_eps)
        self.ffn = _build_ffn(config, index, decoder=True)
        self.dropout = Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> BlockOutput:
        """``x [B, T, D]``, ``memory [B, S, D]``, masks ``[B, S]`` / ``[B, T]`` -> ``(x, aux_loss, expert_counts)``.

        With a ``cache``, ``x`` holds only the new positions; they attend to the cached ones too.
        """
        num_new = x.shape[1]
        h = self.self_attn_norm(x)
        if cache is None:
            if padding_mask is None:
                h = self.self_attn(h, is_causal=True)
            else:
                h = self.self_attn(h, attn_mask=causal_keep_mask(num_new, num_new, x.device, 0, padding_mask))
        else:
            past = cache.self_attn.length
            # One new token sees every cached position: no mask needed.
            mask = None if num_new == 1 else causal_keep_mask(num_new, past + num_new, x.device, past)
            h = self.self_attn(h, attn_mask=mask, cache=cache.self_attn)
        x = x + self.dropout(h)
        h = self.cross_attn(
            self.cross_attn_norm(x),
            memory,
            attn_mask=key_padding_keep_mask(memory_padding_mask),
            cache=None if cache is None else cache.cross_attn,
        )
        x = x + self.dropout(h)
        h, aux, counts = _apply_ffn(self.ffn, self.ffn_norm(x), padding_mask)
        return x + self.dropout(h), aux, counts


def sequence_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    padding_mask: Tensor | None = None,
    label_smoothing: float = 0.0,
    overwrite_logits: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Token-level cross entropy over the non-padding positions, in fp32.

    Args:
        logits: ``[B, T, V]``.
        targets: ``[B, T]`` token ids (any valid id at padding positions).
        padding_mask: ``[B, T]``, True = padding (ignored).
        label_smoothing: ``eps`` in ``[0, 1)``; the target distribution is ``(1-eps)*onehot + eps/V``, as in
            ``torch.nn.functional.cross_entropy``.
        overwrite_logits: the gradient may reuse the logits' memory (the logits are not read afterwards).

    Returns:
        ``(loss, nll, num_tokens)``: the smoothed loss and the plain negative log-likelihood, both means
        over real tokens, and the number of real tokens.
    """
    loss, nll, num_tokens, _ = _sequence_losses(logits, targets, padding_mask, label_smoothing, overwrite_logits)
    return loss, nll, num_tokens


def _sequence_losses(
    logits: Tensor, targets: Tensor, padding_mask: Tensor | None, label_smoothing: float, overwrite_logits: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`sequence_cross_entropy`'s three results and the per-token nll ``[B, T]`` (0 at padding)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} is invalid: use a number in [0, 1)")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have logits' shape without V, {tuple(logits.shape[:-1])}; got {tuple(targets.shape)}"
        )
    if padding_mask is None:
        valid = torch.ones_like(targets, dtype=torch.bool)  # [B, T]
    else:
        valid = ~padding_mask
        targets = targets.masked_fill(padding_mask, 0)
    # fp32 maths in cache-sized chunks: no [B, T, V] fp32 tensor (models/cross_entropy.py)
    nll, per_token = token_cross_entropy(logits, targets, label_smoothing, overwrite_logits)  # [B, T] each
    num_tokens = valid.sum()
    denom = num_tokens.clamp_min(1).to(torch.float32)
    token_nll = nll * valid  # [B, T]
    return (per_token * valid).sum() / denom, token_nll.sum() / denom, num_tokens, token_nll


def _check_tokens(name: str, tokens: Tensor) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32):
        raise ValueError(
            f"{name} must be a [batch, length] tensor of int64 token ids, got {tokens.dtype} {tuple(tokens.shape)}"
        )


def _check_mask(name: str, mask: Tensor | None, tokens: Tensor, tokens_name: str) -> None:
    if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape):
        raise ValueError(
            f"{name} must be a bool tensor shaped like {tokens_name} {tuple(tokens.shape)} (True = padding), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


class MoETransformer(nn.Module):
    """Encoder-decoder transformer with dense or MoE FFNs (see :class:`TransformerConfig`).

    Call :meth:`forward` for training (teacher forcing) or :meth:`loss` for the loss of a batch;
    :meth:`encode`, :meth:`new_cache` and :meth:`decode_step` serve incremental generation
    (``lightning_moe.models.generation``).
    """

    forward_methods: tuple[str, ...] = ("encode", "decode_step")
    """Methods other than ``forward`` that run the model from outside ``forward`` (generation). A sharding
    wrapper must treat them as forward passes (FSDP2: ``register_fsdp_forward_method(model, name)``),
    or the root's sharded parameters (embeddings, final norms) are not gathered for them."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        vocab, d = config.vocab_size, config.d_model
        self.src_embed = nn.Embedding(vocab, d)
        # Tied: src_embed serves source, target and output projection.
        self.tgt_embed: nn.Embedding | None = None if config.tie_embeddings else nn.Embedding(vocab, d)
        self.output_proj: OutputProjection | None = None if config.tie_embeddings else OutputProjection(d, vocab)
        self.tied_head: TiedOutputHead | None = TiedOutputHead(self.src_embed) if config.tie_embeddings else None
        learned = config.positional == "learned"
        self.encoder_pos_embed: nn.Embedding | None = nn.Embedding(config.max_positions, d) if learned else None
        self.decoder_pos_embed: nn.Embedding | None = nn.Embedding(config.max_positions, d) if learned else None
        self.embed_dropout = Dropout(config.dropout)
        self.embed_scale = math.sqrt(d) if config.scale_embeddings else 1.0
        self.encoder_layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.encoder_layers))
        self.encoder_norm = LayerNorm(d, eps=config.norm_eps)
        self.decoder_layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.decoder_layers))
        self.decoder_norm = LayerNorm(d, eps=config.norm_eps)
        # Memory that the training loss's logits reuse from step to step (models/logits_block.py)
        self.loss_logits_block = LogitsBlock()
        self.init_weights()

    # ----------------------------------------------------------------------------------------- setup

    @property
    def tensor_parallel_plan(self) -> dict[str, str]:
        """How tensor parallelism splits the embeddings and the output head (plain data, read by
        ``lightning_moe.parallel``): the token embeddings are split over the vocabulary and the head's
        logits gathered, whether the head is its own ``output_proj`` or the tied table (``tied_head``)."""
        if self.config.tie_embeddings:
            return {"src_embed": "embedding", "tied_head": "tied_head"}
        return {"src_embed": "embedding", "tgt_embed": "embedding", "output_proj": "head"}

    @property
    def has_moe(self) -> bool:
        """Whether any block has an MoE layer."""
        return self.config.moe.enabled

    def init_weights(self) -> None:
        """(Re-)initialise every parameter: embeddings ``N(0, d^-1/2)``, Xavier projections, unit norms.

        Call after materialising a model built on the meta device. MoE layers are re-initialised through
        their ``reset_parameters`` when they have one (otherwise through their submodules' methods).
        """
        std = self.config.d_model**-0.5
        for embedding in (self.src_embed, self.tgt_embed, self.encoder_pos_embed, self.decoder_pos_embed):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=std)
        if self.output_proj is not None:
            nn.init.normal_(self.output_proj.weight, std=std)
        for module in self.modules():
            if isinstance(module, (MultiHeadAttention, FeedForward, nn.LayerNorm)):
                module.reset_parameters()
            elif isinstance(module, MoE):
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                else:
                    for sub in module.modules():
                        if sub is not module and callable(getattr(sub, "reset_parameters", None)):
                            sub.reset_parameters()

    # ------------------------------------------------------------------------------------- embedding

    def _embed(self, tokens: Tensor, table: nn.Embedding, positions_table: nn.Embedding | None, start: int) -> Tensor:
        """Scaled token embeddings plus positions ``start ...`` in the residual stream's dtype (see
        ``TransformerConfig.residual_in_compute_dtype``), then dropout: ``[B, T] -> [B, T, D]``."""
        length = tokens.shape[1]
        if start + length > self.config.max_positions:
            raise ValueError(
                f"sequence positions up to {start + length} exceed max_positions={self.config.max_positions}: "
                "shorten the inputs or raise max_positions in the model config"
            )
        x = table(tokens) * self.embed_scale  # [B, T, D]
        positions = torch.arange(start, start + length, device=tokens.device)  # [T]
        if positions_table is not None:
            x = x + positions_table(positions)
        else:
            x = x + sinusoidal_positions(positions, self.config.d_model).to(x.dtype)
        device_type = x.device.type
        if self.config.residual_in_compute_dtype and torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))  # the residual stream's dtype from here on
        return self.embed_dropout(x)

    def output_logits(self, hidden: Tensor, logits_block: LogitsBlock | None = None) -> Tensor:
        """Project decoder states ``[..., D]`` to vocabulary logits ``[..., V]`` (in ``logits_block``'s memory
        where it can be)."""
        head = self.output_proj if self.tied_head is None else self.tied_head
        return head(hidden, logits_block=logits_block)

    # --------------------------------------------------------------------------------------- encoder

    def _encode(self, src: Tensor, src_padding_mask: Tensor | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        _check_tokens("src", src)
        _check_mask("src_padding_mask", src_padding_mask, src, "src")
        x = self._embed(src, self.src_embed, self.encoder_pos_embed, 0)  # [B, S, D]
        aux_losses: list[Tensor] = []
        counts: list[Tensor] = []
        for layer in self.encoder_layers:
            x, aux, count = layer(x, padding_mask=src_padding_mask)
            if aux is not None:
                aux_losses.append(aux)
            if count is not None:
                counts.append(count)
        return self.encoder_norm(x), aux_losses, counts

    def encode(self, src: Tensor, src_padding_mask: Tensor | None = None) -> Tensor:
        """Encoder memory ``[B, S, D]`` of ``src [B, S]`` (``src_padding_mask [B, S]``, True = padding)."""
        return self._encode(src, src_padding_mask)[0]

    # --------------------------------------------------------------------------------------- decoder

    def _decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None,
        tgt_padding_mask: Tensor | None,
        cache: DecoderCache | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        _check_tokens("tgt_in", tgt)
        _check_mask("tgt_padding_mask", tgt_padding_mask, tgt, "tgt_in")
        if memory.shape[0] != tgt.shape[0]:
            raise ValueError(f"memory batch size {memory.shape[0]} differs from the target's {tgt.shape[0]}")
        table = self.src_embed if self.tgt_embed is None else self.tgt_embed
        start = 0 if cache is None else cache.position
        x = self._embed(tgt, table, self.decoder_pos_embed, start)  # [B, T, D]
        aux_losses: list[Tensor] = []
        counts: list[Tensor] = []
        for i, layer in enumerate(self.decoder_layers):
            x, aux, count = layer(
                x,
                memory,
                memory_padding_mask=memory_padding_mask,
                padding_mask=tgt_padding_mask,
                cache=None if cache is None else cache.layers[i],
            )
            if aux is not None:
                aux_losses.append(aux)
            if count is not None:
                counts.append(count)
        return self.decoder_norm(x), aux_losses, counts

    def new_cache(self, capacity: int) -> DecoderCache:
        """An empty :class:`DecoderCache` for up to ``capacity`` target positions (grows if needed)."""
        return DecoderCache(len(self.decoder_layers), capacity)

    def decode_step(
        self,
        tokens: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None,
        cache: DecoderCache,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[N, t, V]`` of the new target tokens ``tokens [N, t]`` given the ``cache`` of the earlier ones.

        ``tokens`` are placed at positions ``cache.position ...``; their keys and values are appended to
        ``cache``, and the cross-attention keys/values of ``memory [N, S, D]`` are computed on the first
        step only. ``padding_mask [N, t]`` (True = padding) keeps rows that are already finished out of
        the MoE routing. Inference only: run under ``torch.no_grad()``.
        """
        hidden, _, _ = self._decode(tokens, memory, memory_padding_mask, padding_mask, cache=cache)
        return self.output_logits(hidden)

    # ---------------------------------------------------------------------------------------- forward

    def forward(
        self,
        src: Tensor,
        src_padding_mask: Tensor | None,
        tgt_in: Tensor,
        tgt_padding_mask: Tensor | None = None,
        logits_block: LogitsBlock | None = None,
    ) -> ModelOutput:
        """Teacher-forced logits of ``tgt_in [B, T]`` given ``src [B, S]``.

        Args:
            src: source token ids ``[B, S]``.
            src_padding_mask: ``[B, S]`` bool, True = padding (None = no padding).
            tgt_in: decoder inputs ``[B, T]`` (BOS followed by the target shifted right).
            tgt_padding_mask: ``[B, T]`` bool, True = padding (None = no padding).
            logits_block: write the logits into this block's memory, lent until their backward (for a caller
                that reads the logits once and lets its loss overwrite them, as :meth:`loss` does).
        """
        memory, enc_aux, enc_counts = self._encode(src, src_padding_mask)  # [B, S, D]
        hidden, dec_aux, dec_counts = self._decode(tgt_in, memory, src_padding_mask, tgt_padding_mask)  # [B, T, D]
        aux_losses = enc_aux + dec_aux
        if aux_losses:
            aux_loss = torch.stack([a.float() for a in aux_losses]).sum()
        else:
            aux_loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        return ModelOutput(self.output_logits(hidden, logits_block), aux_loss, enc_counts + dec_counts)

    def loss(
        self, batch: Mapping[str, Tensor | None], label_smoothing: float = 0.0
    ) -> tuple[Tensor, dict[str, Tensor | list[Tensor]]]:
        """Training loss of a batch: token-level cross entropy over real target tokens, plus the aux loss
        of the MoE layers when the model has any.

        Args:
            batch: a mapping with ``src``, ``tgt_in``, ``tgt_out`` (``[B, T]`` next-token targets) and
                optionally ``src_padding_mask``, ``tgt_padding_mask`` (True = padding, shared by
                ``tgt_in`` and ``tgt_out``); other keys are ignored.
            label_smoothing: see :func:`sequence_cross_entropy`.

        Returns:
            ``(loss, details)``; ``details`` holds detached ``ce`` (smoothed), ``nll``, ``aux_loss``,
            ``num_tokens``, the ``expert_counts`` list and ``token_nll`` ``[B, T]``, each target token's
            detached nll (0 at padding). The logits are not kept: their memory holds the loss's gradient.
        """
        missing = [key for key in ("src", "tgt_in", "tgt_out") if batch.get(key) is None]
        if missing:
            raise ValueError(f"batch is missing {missing}: provide the keys {list(BATCH_KEYS)}")
        out = self(
            batch["src"],
            batch.get("src_padding_mask"),
            batch["tgt_in"],
            batch.get("tgt_padding_mask"),
            logits_block=self.loss_logits_block,
        )
        tgt_out = batch["tgt_out"]
        if tgt_out.shape != batch["tgt_in"].shape:
            raise ValueError(f"tgt_out {tuple(tgt_out.shape)} must have tgt_in's shape {tuple(batch['tgt_in'].shape)}")
        ce, nll, num_tokens, token_nll = _sequence_losses(
            out.logits, tgt_out, batch.get("tgt_padding_mask"), label_smoothing, overwrite_logits=True
        )
        loss = ce + out.aux_loss if self.has_moe else ce
        details: dict[str, Tensor | list[Tensor]] = {
            "ce": ce.detach(),
            "nll": nll.detach(),
            "aux_loss": out.aux_loss.detach(),
            "num_tokens": num_tokens,
            "expert_counts": out.expert_counts,
            "token_nll": token_nll.detach(),
        }
        return loss, details
