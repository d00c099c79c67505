"""MoE layers generate without capacity: a sentence's output does not depend on the sentences decoded beside it."""

import pytest
import torch

from lightning_moe.models import MoETransformer, beam_search, generate
from lightning_moe.moe import dropless_routing, find_moe_layers
from tests.small_models import padded_sources, small_config

VOCAB, PAD, BOS, EOS = 16, 0, 1, 2
LENGTHS = [5, 3, 7, 2, 6, 4]


def capacity_model(seed: int = 0) -> MoETransformer:
    """Top-1 over 4 experts that drop in evaluation at a quarter of the even share: most assignments of a
    batch would be dropped, so any capacity left in generation changes the outputs."""
    cfg = small_config(
        VOCAB, 4, k=1, drop_tokens=True, eval_drop_tokens=True, eval_capacity_factor=0.25, min_capacity=0
    )
    torch.manual_seed(seed)
    return MoETransformer(cfg).eval()


def decode(model, src, mask, beam_size):
    kwargs = {"length_penalty_alpha": 1.0} if beam_size > 1 else {}
    return generate(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=beam_size, max_len_b=6, **kwargs)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_sentence_translates_alike_alone_and_in_a_batch(beam_size):
    model = capacity_model()
    src, mask = padded_sources(LENGTHS, VOCAB, PAD)
    together = decode(model, src, mask, beam_size)
    alone = [decode(model, src[i : i + 1, :n], mask[i : i + 1, :n], beam_size)[0] for i, n in enumerate(LENGTHS)]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1  # not a degenerate model that outputs one thing


@pytest.mark.parametrize("beam_size", [1, 3])
def test_hypothesis_scores_do_not_depend_on_the_batch(beam_size):
    """Log-probabilities move with any dropped assignment, even where the chosen tokens stay the same."""
    model = capacity_model()
    src, mask = padded_sources(LENGTHS, VOCAB, PAD)
    kwargs = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=beam_size, max_len_b=6)
    together = beam_search(model, src, mask, **kwargs)
    for i, n in enumerate(LENGTHS):
        (alone,) = beam_search(model, src[i : i + 1, :n], mask[i : i + 1, :n], **kwargs)
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        assert [h.log_prob for h in alone] == pytest.approx([h.log_prob for h in together[i]], abs=1e-4)


def test_the_capacity_is_real_outside_generation():
    """The same model's teacher-forced eval forward does drop (the checks above would pass vacuously otherwise)."""
    model = capacity_model()
    src, mask = padded_sources(LENGTHS, VOCAB, PAD)
    with torch.no_grad():
        model(src, mask, src, mask)
    dropped = [float(layer.last_stats.dropped_fraction) for _, layer in find_moe_layers(model)]
    assert min(dropped) > 0.3


def test_dropless_routing_restores_each_layer_also_after_an_error():
    model = capacity_model()
    layers = [layer for _, layer in find_moe_layers(model)]
    layers[0].drop_tokens = False  # a layer of its own setting keeps it
    before = [layer.drop_tokens for layer in layers]
    assert before.count(True) == len(layers) - 1
    with pytest.raises(RuntimeError, match="inside"):
        with dropless_routing(model):
            assert not any(layer.drop_tokens for layer in layers)
            raise RuntimeError("inside")
    assert [layer.drop_tokens for layer in layers] == before
    src, mask = padded_sources(LENGTHS[:2], VOCAB, PAD)
    decode(model, src, mask, 1)
    assert [layer.drop_tokens for layer in layers] == before
