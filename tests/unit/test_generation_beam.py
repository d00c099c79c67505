"""Beam search: exhaustive parity on a Markov toy model, score bookkeeping and cache reordering on the
real model, beam size 1 = greedy, EOS handling and early stopping."""

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.models import (
    MoETransformer,
    beam_search,
    generate,
    greedy_decode,
    max_output_lengths,
)
from lightning_moe.models.generation import length_penalty
from tests.small_models import padded_sources as shared_padded_sources
from tests.small_models import small_config

PAD, BOS, EOS = 0, 1, 2
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}


class _NoCache:
    def reorder(self, index):
        pass

    reorder_self_attention = reorder_cross_attention = reorder


class MarkovModel(nn.Module):
    """Toy decoder: next-token logits = ``transition[last token] + preference[first source token]``.

    Needs no cache (it sees only the last token), so beam search's bookkeeping can be checked against an
    exhaustive enumeration; the per-source preference checks that rows stay with their sentence.
    """

    def __init__(self, vocab: int, num_sources: int, seed: int = 0, max_positions: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(max_positions=max_positions)
        self.transition = nn.Parameter(torch.randn(vocab, vocab, generator=g), requires_grad=False)
        self.preference = nn.Parameter(torch.randn(num_sources, vocab, generator=g), requires_grad=False)
        self.steps = 0

    def encode(self, src, src_padding_mask=None):
        return self.preference[src[:, 0]][:, None, :]  # [B, 1, V]

    def new_cache(self, capacity):
        return _NoCache()

    def decode_step(self, tokens, memory, memory_padding_mask, cache):
        self.steps += 1
        return self.transition[tokens] + memory  # [N, t, V]

    def next_log_probs(self, source: int, last: int) -> torch.Tensor:
        lprobs = F.log_softmax(self.transition[last] + self.preference[source], dim=-1)
        lprobs[BOS] = lprobs[PAD] = -float("inf")  # banned, not renormalised
        return lprobs


def enumerate_hypotheses(model: MarkovModel, source: int, limit: int, alpha: float, style: str):
    """Every output beam search can finish with, scored independently: (tokens, score, log_prob)."""
    vocab = model.transition.shape[0]
    content = list(range(3, vocab))
    found = []
    for length in range(1, limit + 1):
        last_tokens = content + [EOS] if length == limit else [EOS]
        for body in itertools.product(content, repeat=length - 1):
            for final in last_tokens:
                seq = list(body) + [final]
                log_prob, prev = 0.0, BOS
                for tok in seq:
                    log_prob += model.next_log_probs(source, prev)[tok].item()
                    prev = tok
                tokens = [t for t in seq if t != EOS]
                found.append((tokens, log_prob / length_penalty(length, alpha, style), log_prob))
    return sorted(found, key=lambda h: h[1], reverse=True)


@pytest.mark.parametrize("alpha, style", [(0.0, "gnmt"), (1.0, "gnmt"), (0.7, "simple")])
def test_wide_beam_finds_every_hypothesis_in_score_order(alpha, style):
    model = MarkovModel(vocab=5, num_sources=3, seed=1)
    src = torch.tensor([[0, 9, PAD], [1, 9, 9], [2, PAD, PAD]])  # limits 2, 3, 1 with a=1, b=0
    mask = torch.tensor([[False, False, True], [False, False, False], [False, True, True]])
    limits = max_output_lengths(src, mask, 1.0, 0, 64)
    assert limits == [2, 3, 1]
    results = beam_search(
        model,
        src,
        mask,
        **IDS,
        beam_size=32,
        n_best=32,
        length_penalty_alpha=alpha,
        length_penalty_style=style,
        max_len_a=1.0,
        max_len_b=0,
    )
    for source, (hyps, limit) in enumerate(zip(results, limits)):
        expected = enumerate_hypotheses(model, source, limit, alpha, style)
        assert [h.tokens for h in hyps] == [e[0] for e in expected]
        torch.testing.assert_close([h.score for h in hyps], [e[1] for e in expected])
        torch.testing.assert_close([h.log_prob for h in hyps], [e[2] for e in expected])


def test_narrow_beam_returns_sorted_hypotheses_without_special_tokens():
    model = MarkovModel(vocab=7, num_sources=4, seed=3)
    src = torch.tensor([[0, 5], [1, 5], [2, 5], [3, 5]])
    results = beam_search(
        model, src, None, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=3, n_best=3, max_len_a=0.0, max_len_b=6
    )
    for hyps in results:
        assert len(hyps) == 3
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:
            assert all(t not in (PAD, BOS, EOS) for t in h.tokens)
            assert len(h.tokens) <= 6


def test_search_stops_when_every_sentence_is_finished():
    model = MarkovModel(vocab=6, num_sources=2, seed=0)
    with torch.no_grad():
        model.transition[:, EOS] += 30.0  # EOS is by far the most likely next token
    src = torch.tensor([[0, 4, 4], [1, 4, 4]])
    results = beam_search(model, src, None, **IDS, beam_size=2, max_len_b=50)
    assert [hyps[0].tokens for hyps in results] == [[], []]
    assert model.steps <= 3  # not 53: done once each sentence has beam_size finished hypotheses


def test_a_token_never_follows_eos_in_one_hypothesis():
    """Once EOS is chosen the hypothesis is closed: the prefix it came from is not extended in it."""
    model = MarkovModel(vocab=6, num_sources=1, seed=5)
    with torch.no_grad():
        model.transition[:, EOS] += 1.5
    (hyps,) = beam_search(
        model,
        torch.tensor([[0, 3]]),
        None,
        **IDS,
        beam_size=4,
        n_best=4,
        length_penalty_alpha=0.0,
        max_len_b=8,
    )
    # With alpha = 0 the score of a hypothesis is the exact log-probability of its tokens followed by EOS.
    for h in hyps:
        prev, log_prob = BOS, 0.0
        for tok in h.tokens + ([EOS] if len(h.tokens) < 10 else []):
            log_prob += model.next_log_probs(0, prev)[tok].item()
            prev = tok
        assert h.score == pytest.approx(log_prob, abs=1e-5)


# ------------------------------------------------------------------------------------------ real model

VOCAB = 14


def make_model(num_experts: int, seed: int = 0, eos_bias: float = 0.0) -> MoETransformer:
    cfg = small_config(VOCAB, num_experts, max_positions=40)
    torch.manual_seed(seed)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        eos_row = model.src_embed.weight[EOS]
        model.decoder_norm.bias.add_(eos_bias * eos_row / eos_row.norm() ** 2)
    return model


def padded_sources(lengths, seed=0):
    return shared_padded_sources(lengths, VOCAB, PAD, seed)


@torch.no_grad()
def teacher_forced_log_prob(model, src_row, tokens, with_eos):
    """Sum of the model's log-probabilities of ``tokens`` (+ EOS), from one teacher-forced forward pass."""
    targets = tokens + ([EOS] if with_eos else [])
    tgt_in = torch.tensor([[BOS] + targets[:-1]])
    lprobs = F.log_softmax(model(src_row[None], None, tgt_in, None).logits[0], dim=-1)  # [T, V]
    return lprobs[torch.arange(len(targets)), torch.tensor(targets)].sum().item()


@pytest.mark.parametrize("num_experts", [0, 4])
def test_beam_scores_match_rescoring_with_the_full_model(num_experts):
    """Checks scores, EOS bookkeeping and the reordering of the key/value caches between steps."""
    lengths = [4, 2, 5]
    src, mask = padded_sources(lengths)
    alpha = 1.0
    saw_eos = saw_limit = False
    for seed, eos_bias in ((0, 0.0), (1, 3.0)):
        model = make_model(num_experts, seed, eos_bias)
        results = beam_search(
            model,
            src,
            mask,
            **IDS,
            beam_size=4,
            n_best=4,
            length_penalty_alpha=alpha,
            max_len_a=1.0,
            max_len_b=2,
        )
        limits = max_output_lengths(src, mask, 1.0, 2, 40)
        for i, (hyps, limit) in enumerate(zip(results, limits)):
            scores = [h.score for h in hyps]
            assert scores == sorted(scores, reverse=True)
            assert len({tuple(h.tokens) for h in hyps}) == len(hyps)
            for h in hyps:
                ended = len(h.tokens) < limit  # shorter than the limit only by generating EOS
                saw_eos |= ended
                saw_limit |= not ended
                ref = teacher_forced_log_prob(model, src[i, : lengths[i]], h.tokens, ended)
                assert h.log_prob == pytest.approx(ref, abs=1e-4)
                length = len(h.tokens) + int(ended)
                assert h.score == pytest.approx(h.log_prob / length_penalty(length, alpha), abs=1e-4)
    assert saw_eos and saw_limit


@pytest.mark.parametrize("num_experts", [0, 4])
def test_beam_size_one_equals_greedy(num_experts):
    src, mask = padded_sources([3, 6, 2, 5], seed=4)
    for seed, eos_bias in ((0, 0.0), (2, 2.5)):
        model = make_model(num_experts, seed, eos_bias)
        kwargs = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=1.0, max_len_b=3)
        greedy = greedy_decode(model, src, mask, **kwargs)
        beam = beam_search(model, src, mask, beam_size=1, length_penalty_alpha=0.6, **kwargs)
        assert [hyps[0].tokens for hyps in beam] == greedy


def test_generate_returns_the_best_beam():
    model = make_model(4, 1, 1.0)
    src, mask = padded_sources([3, 5])
    kwargs = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_b=4)
    beams = beam_search(model, src, mask, beam_size=3, **kwargs)
    assert generate(model, src, mask, beam_size=3, **kwargs) == [h[0].tokens for h in beams]


def test_invalid_arguments_raise():
    model = make_model(0)
    src, mask = padded_sources([3])
    kwargs = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, mask, beam_size=0, **kwargs)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model, src, mask, beam_size=2, n_best=3, **kwargs)
    with pytest.raises(ValueError, match="length_penalty_style"):
        beam_search(model, src, mask, beam_size=2, length_penalty_style="wu", **kwargs)
