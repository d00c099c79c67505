"""Greedy decoding with key/value caches against a naive decoder that recomputes everything each step."""

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.models import MoETransformer, generate, greedy_decode, max_output_lengths
from tests.small_models import padded_sources as shared_padded_sources
from tests.small_models import small_config

VOCAB, PAD, BOS, EOS = 16, 0, 1, 2


def make_model(num_experts: int, seed: int = 0) -> MoETransformer:
    cfg = small_config(VOCAB, num_experts, max_positions=40)
    torch.manual_seed(seed)
    return MoETransformer(cfg)


def padded_sources(lengths, seed=0):
    return shared_padded_sources(lengths, VOCAB, PAD, seed)


@torch.no_grad()
def naive_greedy(model, src_row, limit):
    """One unpadded sentence; the whole model runs on the whole prefix at every step."""
    tokens = [BOS]
    for _ in range(limit):
        logits = model(src_row[None], None, torch.tensor([tokens]), None).logits[0, -1]  # [V]
        logits[BOS] = logits[PAD] = -float("inf")
        nxt = int(logits.argmax())
        if nxt == EOS:
            break
        tokens.append(nxt)
    return tokens[1:]


def _bias_towards_eos(model, strength):
    """Shift the output distribution so some sentences end early and others run to the limit."""
    with torch.no_grad():
        model.decoder_norm.bias.add_(strength * model.src_embed.weight[EOS] / model.src_embed.weight[EOS].norm() ** 2)


@pytest.mark.parametrize("num_experts", [0, 4])
def test_cached_greedy_equals_naive_greedy(num_experts):
    lengths = [5, 3, 7, 2, 6]
    src, mask = padded_sources(lengths)
    stopped_early = reached_limit = False
    for seed, eos_bias in ((0, 0.0), (1, 2.5)):
        model = make_model(num_experts, seed=seed).eval()
        _bias_towards_eos(model, eos_bias)
        out = greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=1.0, max_len_b=3)
        limits = [n + 3 for n in lengths]
        expected = [naive_greedy(model, src[i, :n], limits[i]) for i, n in enumerate(lengths)]
        assert out == expected
        for tokens, limit in zip(out, limits):
            assert len(tokens) <= limit
            assert all(t not in (BOS, EOS, PAD) for t in tokens)
            stopped_early |= len(tokens) < limit  # EOS (possibly as the first token) before the limit
            reached_limit |= len(tokens) == limit
    assert stopped_early and reached_limit  # both ways of finishing (and batch shrinking) were exercised


def test_outputs_stop_at_eos_and_respect_length_limits():
    model = make_model(0).eval()
    _bias_towards_eos(model, 50.0)  # EOS always wins
    src, mask = padded_sources([4, 6])
    assert greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD) == [[], []]
    model = make_model(0).eval()
    _bias_towards_eos(model, -50.0)  # EOS never wins: the limit stops decoding
    out = greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=0.5, max_len_b=1)
    assert [len(o) for o in out] == [3, 4]


def test_max_output_lengths():
    src, mask = padded_sources([4, 10, 1])
    assert max_output_lengths(src, mask, 1.5, 2, max_positions=100) == [8, 17, 3]
    assert max_output_lengths(src, mask, 1.5, 2, max_positions=10) == [8, 10, 3]
    assert max_output_lengths(src, None, 0.0, 0, max_positions=10) == [1, 1, 1]
    with pytest.raises(ValueError, match="max_len_a"):
        max_output_lengths(src, mask, -1.0, 2, max_positions=10)


def test_generation_restores_training_mode_and_needs_no_grad():
    model = make_model(4).train()
    src, mask = padded_sources([3, 4])
    greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_b=2)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_generate_with_beam_size_one_is_greedy():
    model = make_model(4).eval()
    src, mask = padded_sources([3, 5, 4])
    greedy = greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_b=4)
    assert generate(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_b=4) == greedy


def test_invalid_special_ids_raise():
    model = make_model(0)
    src, mask = padded_sources([3])
    with pytest.raises(ValueError, match="different"):
        greedy_decode(model, src, mask, bos_id=BOS, eos_id=BOS, pad_id=PAD)
    with pytest.raises(ValueError, match="pad_id"):
        greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=-1)


def test_empty_batch():
    model = make_model(0)
    src = torch.zeros(0, 4, dtype=torch.long)
    assert greedy_decode(model, src, None, bos_id=BOS, eos_id=EOS, pad_id=PAD) == []


def test_padding_in_the_batch_does_not_change_outputs():
    """A sentence decodes the same alone (unpadded) and inside a padded batch."""
    model = make_model(4).eval()
    src, mask = padded_sources([2, 7, 4])
    batch_out = greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_b=5)
    for i, n in enumerate([2, 7, 4]):
        alone = greedy_decode(model, src[i : i + 1, :n], None, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_b=5)
        assert alone[0] == batch_out[i]
    # Sanity check that the test can fail: a different source gives a different output somewhere.
    other = greedy_decode(
        model,
        F.pad(src[:, 1:], (0, 1), value=PAD),
        F.pad(mask[:, 1:], (0, 1), value=True),
        bos_id=BOS,
        eos_id=EOS,
        pad_id=PAD,
        max_len_b=5,
    )
    assert other != batch_out


class _CountingModel:
    """Wraps a model and counts decoder steps (what a sharded model's collectives would see)."""

    def __init__(self, model):
        self.model, self.steps = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def decode_step(self, *args, **kwargs):
        self.steps += 1
        return self.model.decode_step(*args, **kwargs)


def _lagging_rank(extra_steps):
    """A ``sync_done`` whose other rank finishes ``extra_steps`` steps after this one."""
    state = {"after_done": 0}

    def sync_done(local_done: bool) -> bool:
        if local_done:
            state["after_done"] += 1
        return local_done and state["after_done"] > extra_steps

    return sync_done


@pytest.mark.parametrize("beam_size", [1, 3])
def test_sync_done_keeps_decoding_placeholders_until_every_rank_is_done(beam_size):
    model = make_model(4, seed=1).eval()
    _bias_towards_eos(model, 2.5)
    src, mask = padded_sources([4, 2, 5])
    kwargs = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=beam_size, max_len_a=1.0, max_len_b=2)
    alone = _CountingModel(model)
    expected = generate(alone, src, mask, **kwargs)
    synced = _CountingModel(model)
    assert generate(synced, src, mask, sync_done=_lagging_rank(4), **kwargs) == expected
    assert synced.steps == alone.steps + 4
    # A rank running to the longest length limit never exceeds max_positions.
    assert generate(synced, src, mask, sync_done=_lagging_rank(40 - alone.steps - 1), **kwargs) == expected
