"""Batched greedy decoding and beam search with key/value caches.

Incremental decoding: the encoder runs once; each step feeds only the newest target token, whose
self-attention keys/values are appended to a cache, and the cross-attention keys/values of the encoder
memory are computed on the first step only. Finished sentences leave the batch, so later steps compute
only the unfinished ones.

The decoder's first input is ``bos_id``; the target language is chosen by the source (the data pipeline
puts a ``<2xx>`` tag first), so only ``bos_id``, ``eos_id`` and ``pad_id`` are needed. ``pad_id`` and
``bos_id`` are never generated (their log-probabilities are set to ``-inf``, without renormalising).
Results are token id lists without BOS, EOS or padding.

MoE layers route every token to its experts while generating (no capacity, see
:func:`lightning_moe.moe.dropless_routing`): a sentence's output does not depend on the sentences decoded
beside it. With a capacity, a decoding step's few tokens, all at one position, crowd the same experts and many
are dropped (figures: README, "The MoE layer").

The model must provide ``config.max_positions``, ``encode(src, src_padding_mask) -> [B, S, D]``,
``new_cache(capacity)`` (an object with ``reorder``, ``reorder_self_attention`` and
``reorder_cross_attention`` taking a row index) and ``decode_step(tokens, memory, memory_padding_mask,
cache) -> logits [N, t, V]``, as :class:`lightning_moe.models.MoETransformer` does.

Beam search follows the usual finished-hypotheses scheme: each step ranks the ``2K`` best extensions of
the ``K`` beams of a sentence; those among the best ``K`` that end with EOS become finished hypotheses
(scored with the length penalty), the best ``K`` that do not continue. A sentence is done when it has
``K`` finished hypotheses or reaches its length limit (then its best ``K`` extensions are finished as
they are).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.moe import dropless_routing

__all__ = [
    "Hypothesis",
    "LENGTH_PENALTY_STYLES",
    "length_penalty",
    "max_output_lengths",
    "greedy_decode",
    "beam_search",
    "generate",
    "SyncDone",
]

LENGTH_PENALTY_STYLES = ("gnmt", "simple")
"""``gnmt``: ``((5 + length) / 6) ** alpha`` (Wu et al. 2016); ``simple``: ``length ** alpha``."""


class Hypothesis(NamedTuple):
    """One finished beam-search output.

    Attributes:
        tokens: generated token ids, without BOS/EOS/padding.
        score: ``log_prob / length_penalty(length)``; ``length`` counts the EOS when there is one.
        log_prob: sum of the log-probabilities of the generated tokens (EOS included when generated).
    """

    tokens: list[int]
    score: float
    log_prob: float


def length_penalty(length: int, alpha: float, style: str = "gnmt") -> float:
    """The divisor of a hypothesis' log-probability; 1 when ``alpha == 0``."""
    if style == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if style == "simple":
        return float(length) ** alpha
    raise ValueError(f"length_penalty_style={style!r} is not supported: use one of {list(LENGTH_PENALTY_STYLES)}")


def max_output_lengths(
    src: Tensor, src_padding_mask: Tensor | None, max_len_a: float, max_len_b: float, max_positions: int
) -> list[int]:
    """Per-sentence limit on generated tokens (EOS included): ``floor(a * source_length + b)``.

    Clamped to ``[1, max_positions]`` (the decoder reads BOS and at most ``limit - 1`` generated tokens).
    """
    if max_len_a < 0 or max_len_b < 0:
        raise ValueError(f"max_len_a={max_len_a!r} and max_len_b={max_len_b!r} must be >= 0")
    if src_padding_mask is None:
        lengths = [src.shape[1]] * src.shape[0]
    else:
        lengths = (~src_padding_mask).sum(dim=1).tolist()
    return [min(max(int(math.floor(max_len_a * n + max_len_b)), 1), max_positions) for n in lengths]


def _check_special_ids(bos_id: int, eos_id: int, pad_id: int) -> None:
    ids = {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}
    for name, value in ids.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: use a non-negative token id")
    if len(set(ids.values())) != 3:
        raise ValueError(f"bos_id, eos_id and pad_id must be three different ids, got {ids}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with ``model.eval()`` (no dropout) and MoE layers without capacity, then restore every module's mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with dropless_routing(model):
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _strip(tokens: list[int], bos_id: int, eos_id: int, pad_id: int) -> list[int]:
    """Tokens up to the first EOS, without BOS and padding."""
    out = []
    for token in tokens:
        if token == eos_id:
            break
        if token not in (bos_id, pad_id):
            out.append(token)
    return out


def _next_token_log_probs(logits: Tensor, bos_id: int, pad_id: int) -> Tensor:
    """fp32 log-probabilities ``[N, V]`` of ``logits [N, V]``, with BOS and padding set to ``-inf``.

    Not renormalised afterwards: scores stay the model's own log-probabilities of the chosen tokens.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)  # [N, V]
    lprobs[:, bos_id] = -math.inf
    lprobs[:, pad_id] = -math.inf
    return lprobs


SyncDone = Callable[[bool], bool]
"""``sync_done(local_done) -> every rank is done``: a collective called once per decoding step."""


def _finished_everywhere(local_done: bool, sync_done: SyncDone | None) -> bool:
    return local_done if sync_done is None else bool(sync_done(local_done))


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    src: Tensor,
    src_padding_mask: Tensor | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len_a: float = 1.5,
    max_len_b: float = 10.0,
    sync_done: SyncDone | None = None,
) -> list[list[int]]:
    """Greedy decoding of a batch ``src [B, S]`` (``src_padding_mask [B, S]``, True = padding).

    Each sentence stops at EOS or after ``floor(max_len_a * source_length + max_len_b)`` tokens.
    The model runs in eval mode; its modes are restored afterwards.

    Args:
        sync_done: for a model sharded over several ranks (FSDP, expert parallelism), where every rank
            must run the same forward passes: called once per step with this rank's state, it returns
            whether every rank is done (e.g. an all-reduce). A rank that finishes first keeps decoding a
            placeholder row until then. Every rank must call with at least one sentence.

    Returns:
        ``B`` lists of generated token ids (no BOS, EOS or padding).
    """
    _check_special_ids(bos_id, eos_id, pad_id)
    batch = src.shape[0]
    if batch == 0:
        return []
    with _eval_mode(model):
        device = src.device
        limits = max_output_lengths(src, src_padding_mask, max_len_a, max_len_b, model.config.max_positions)
        steps = max(limits)
        out = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)  # [B, L]
        memory = model.encode(src, src_padding_mask)  # [B, S, D]
        memory_mask = src_padding_mask
        cache = model.new_cache(steps)
        active = torch.arange(batch, device=device)  # [N] sentence of each row
        active_limits = torch.tensor(limits, device=device)  # [N]
        last = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)  # [N, 1]
        local_done = False
        t = 0
        while True:
            logits = model.decode_step(last, memory, memory_mask, cache)[:, -1]  # [N, V]
            keep: Tensor | None = None
            if not local_done:
                next_token = _next_token_log_probs(logits, bos_id, pad_id).argmax(dim=-1)  # [N]
                out[active, t] = next_token
                finished = (next_token == eos_id) | (active_limits <= t + 1)  # [N]
                local_done = bool(finished.all())
                if not local_done and bool(finished.any()):
                    keep = (~finished).nonzero().squeeze(1)  # [N']
                last = next_token[:, None]
                t += 1
            if _finished_everywhere(local_done, sync_done):
                break
            if local_done and last.shape[0] > 1:
                keep = torch.zeros(1, dtype=torch.long, device=device)  # one placeholder row, output unused
            if keep is not None:
                active, active_limits, last = active[keep], active_limits[keep], last[keep]
                memory = memory.index_select(0, keep)
                memory_mask = None if memory_mask is None else memory_mask.index_select(0, keep)
                cache.reorder(keep)
        return [_strip(row, bos_id, eos_id, pad_id) for row in out.tolist()]


@torch.no_grad()
def beam_search(
    model: nn.Module,
    src: Tensor,
    src_padding_mask: Tensor | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int = 4,
    length_penalty_alpha: float = 1.0,
    length_penalty_style: str = "gnmt",
    max_len_a: float = 1.5,
    max_len_b: float = 10.0,
    n_best: int = 1,
    sync_done: SyncDone | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search over ``src [B, S]`` (``src_padding_mask [B, S]``, True = padding).

    Args:
        beam_size: beams per sentence ``K``.
        length_penalty_alpha: exponent of the length penalty (0 = rank by total log-probability).
        length_penalty_style: ``"gnmt"`` or ``"simple"`` (see :data:`LENGTH_PENALTY_STYLES`).
        max_len_a, max_len_b: at most ``floor(a * source_length + b)`` generated tokens, EOS included.
        n_best: hypotheses returned per sentence (``1 <= n_best <= beam_size``).
        sync_done: see :func:`greedy_decode` (multi-rank sharded models).

    Returns:
        For each sentence, its ``n_best`` best :class:`Hypothesis`, best (highest score) first.
    """
    _check_special_ids(bos_id, eos_id, pad_id)
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size={beam_size!r} is invalid: use an integer >= 1")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best={n_best!r} is invalid: use an integer in [1, beam_size={beam_size}]")
    length_penalty(1, length_penalty_alpha, length_penalty_style)  # validates the style
    k = beam_size
    batch = src.shape[0]
    if batch == 0:
        return []
    with _eval_mode(model):
        device = src.device
        limits = max_output_lengths(src, src_padding_mask, max_len_a, max_len_b, model.config.max_positions)
        steps = max(limits)

        rows = torch.arange(batch, device=device).repeat_interleave(k)  # [B*K]
        memory = model.encode(src, src_padding_mask).index_select(0, rows)  # [B*K, S, D]
        memory_mask = None if src_padding_mask is None else src_padding_mask.index_select(0, rows)
        cache = model.new_cache(steps)
        active: list[int] = list(range(batch))  # sentence of each block of K rows
        active_limits = torch.tensor(limits, device=device)  # [N]
        scores = torch.zeros(batch, k, device=device)  # [N, K] summed log-probs of the live beams
        scores[:, 1:] = -math.inf  # all beams start identical: expand the first only
        seqs = torch.full((batch * k, steps), pad_id, dtype=torch.long, device=device)  # [N*K, L]
        last = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)  # [N*K, 1]
        finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
        beam_offsets = torch.arange(k, device=device)  # [K]
        local_done = False
        t = 0
        while True:
            logits = model.decode_step(last, memory, memory_mask, cache)[:, -1]  # [N*K, V]
            if not local_done:
                keep, step = _beam_step(
                    logits,
                    scores,
                    seqs,
                    active,
                    active_limits,
                    finished,
                    t,
                    k,
                    bos_id,
                    eos_id,
                    pad_id,
                    length_penalty_alpha,
                    length_penalty_style,
                )
                local_done = not keep
                t += 1
            if _finished_everywhere(local_done, sync_done):
                break
            if local_done:
                if last.shape[0] > k:  # keep one sentence's rows as a placeholder, output unused
                    placeholder = beam_offsets
                    memory = memory.index_select(0, placeholder)
                    memory_mask = None if memory_mask is None else memory_mask.index_select(0, placeholder)
                    cache.reorder(placeholder)
                    last = last.index_select(0, placeholder)
                continue
            num = len(active)
            keep_t = torch.tensor(keep, device=device)  # [N']
            row_index = (keep_t[:, None] * k + step.origin.index_select(0, keep_t)).view(-1)  # [N'*K]
            scores = step.scores.index_select(0, keep_t)  # [N', K]
            seqs = seqs.index_select(0, row_index)
            seqs[:, t - 1] = step.token.index_select(0, keep_t).view(-1)
            cache.reorder_self_attention(row_index)
            if len(keep) < num:  # drop finished sentences; a sentence's beams share memory rows
                sentence_rows = (keep_t[:, None] * k + beam_offsets).view(-1)  # [N'*K]
                memory = memory.index_select(0, sentence_rows)
                memory_mask = None if memory_mask is None else memory_mask.index_select(0, sentence_rows)
                cache.reorder_cross_attention(sentence_rows)
                active = [active[n] for n in keep]
                active_limits = active_limits.index_select(0, keep_t)
            last = seqs[:, t - 1 : t]

        results = []
        for hyps in finished:
            if not hyps:  # only when every extension had probability 0
                hyps = [Hypothesis([], -math.inf, -math.inf)]
            results.append(sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best])
        return results


class _BeamStep(NamedTuple):
    """The ``K`` continuing beams of every sentence after one step."""

    scores: Tensor  # [N, K] summed log-probs
    origin: Tensor  # [N, K] beam (0..K-1) each continues from
    token: Tensor  # [N, K] token appended


def _beam_step(
    logits: Tensor,
    scores: Tensor,
    seqs: Tensor,
    active: list[int],
    active_limits: Tensor,
    finished: list[list[Hypothesis]],
    t: int,
    k: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    alpha: float,
    style: str,
) -> tuple[list[int], _BeamStep]:
    """Rank the extensions of step ``t``, record finished hypotheses in ``finished``.

    Returns the positions (in ``active``) of the sentences still running and their continuing beams.
    """
    num = len(active)
    lprobs = _next_token_log_probs(logits, bos_id, pad_id)  # [N*K, V]
    vocab = lprobs.shape[-1]
    candidates = (scores[:, :, None] + lprobs.view(num, k, vocab)).view(num, k * vocab)  # [N, K*V]
    top_scores, top_index = candidates.topk(2 * k, dim=-1)  # [N, 2K], best first
    origin = torch.div(top_index, vocab, rounding_mode="floor")  # [N, 2K] beam extended
    token = top_index % vocab  # [N, 2K]
    is_eos = token == eos_id
    at_limit = active_limits == t + 1  # [N]

    # Finish EOS extensions among the best K (all of the best K at the length limit).
    finish = (is_eos | at_limit[:, None]) & torch.isfinite(top_scores)  # [N, 2K]
    finish[:, k:] = False
    n_idx, j_idx = finish.nonzero(as_tuple=True)
    if n_idx.numel() > 0:
        src_rows = n_idx * k + origin[n_idx, j_idx]
        prefixes = seqs[src_rows, :t].tolist()
        for n, prefix, tok, log_prob in zip(
            n_idx.tolist(), prefixes, token[n_idx, j_idx].tolist(), top_scores[n_idx, j_idx].tolist()
        ):
            hyps = finished[active[n]]
            if len(hyps) < k:
                tokens = _strip(prefix + [tok], bos_id, eos_id, pad_id)
                hyps.append(Hypothesis(tokens, log_prob / length_penalty(t + 1, alpha, style), log_prob))
    at_limit_host = at_limit.tolist()
    keep = [n for n in range(num) if len(finished[active[n]]) < k and not at_limit_host[n]]

    # The best K extensions that do not end with EOS continue (stable sort keeps score order).
    chosen = torch.sort(is_eos.to(torch.int8), dim=-1, stable=True).indices[:, :k]  # [N, K]
    return keep, _BeamStep(top_scores.gather(1, chosen), origin.gather(1, chosen), token.gather(1, chosen))


def generate(
    model: nn.Module,
    src: Tensor,
    src_padding_mask: Tensor | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int = 1,
    **kwargs: Any,
) -> list[list[int]]:
    """The best output of each sentence: greedy when ``beam_size == 1``, else the top beam-search hypothesis.

    ``kwargs`` go to :func:`beam_search` (``max_len_a``, ``max_len_b``, ``length_penalty_alpha``,
    ``length_penalty_style``, ``sync_done``); greedy decoding ignores the length-penalty arguments.
    """
    if beam_size == 1:
        beam_only = {"length_penalty_alpha", "length_penalty_style", "n_best"}
        unknown = set(kwargs) - beam_only - {"max_len_a", "max_len_b", "sync_done"}
        if unknown:
            raise ValueError(f"unknown generation arguments {sorted(unknown)}")
        greedy_kwargs = {key: value for key, value in kwargs.items() if key not in beam_only}
        return greedy_decode(model, src, src_padding_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, **greedy_kwargs)
    hyps = beam_search(
        model, src, src_padding_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, beam_size=beam_size, **kwargs
    )
    return [sentence[0].tokens for sentence in hyps]
