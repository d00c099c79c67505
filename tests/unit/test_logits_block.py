"""The training loss's logits in memory kept from step to step (``lightning_moe/models/logits_block.py``): the
same losses and gradients as a plain forward, the memory reused only once nothing reads it."""

from __future__ import annotations

import copy
import pickle
from contextlib import nullcontext

import pytest
import torch

from lightning_moe.models import MoETransformer, get_preset
from lightning_moe.models.cross_entropy import token_cross_entropy
from lightning_moe.models.logits_block import LogitsBlock, project_logits
from lightning_moe.models.transformer import sequence_cross_entropy

VOCAB = 300


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(4, VOCAB, (4, 9), generator=g) for _ in range(3)]
    padding = torch.zeros(4, 9, dtype=torch.bool)
    padding[1, 6:] = True
    return {"src": tokens[0], "tgt_in": tokens[1], "tgt_out": tokens[2], "tgt_padding_mask": padding}


def _reference_loss(model: MoETransformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of :meth:`MoETransformer.loss` from a plain forward (fresh logits, not overwritten)."""
    out = model(batch["src"], None, batch["tgt_in"], batch["tgt_padding_mask"])
    ce, _, _ = sequence_cross_entropy(out.logits, batch["tgt_out"], batch["tgt_padding_mask"], 0.1)
    return ce + out.aux_loss


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_loss_in_the_kept_block_matches_a_plain_forward_over_steps(tie_embeddings: bool, bf16: bool) -> None:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny", vocab_size=VOCAB, dropout=0.0, tie_embeddings=tie_embeddings))
    reference = copy.deepcopy(model)
    assert reference.loss_logits_block is not model.loss_logits_block
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    for step in range(3):  # the second and third steps write their logits into the first one's memory
        batch = _batch(step)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        with precision:
            torch.manual_seed(step)  # the same router noise in both
            loss, _ = model.loss(batch, label_smoothing=0.1)
            assert model.loss_logits_block.nbytes == 0  # lent to this step's logits until their backward
            torch.manual_seed(step)
            expected = _reference_loss(reference, batch)
        loss.backward()
        expected.backward()
        assert model.loss_logits_block.nbytes > 0  # handed back by the projection's backward
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0.0)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_two_losses_before_one_backward_get_separate_memory() -> None:
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny", vocab_size=VOCAB, dropout=0.0))
    reference = copy.deepcopy(model)
    warm, _ = model.loss(_batch(9))
    warm.backward()  # the block now waits for the next loss
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    first, _ = model.loss(_batch(1), label_smoothing=0.1)  # takes the block
    second, _ = model.loss(_batch(2), label_smoothing=0.1)  # must not write into it
    (first + second).backward()
    torch.manual_seed(1)
    expected = _reference_loss(reference, _batch(1)) + _reference_loss(reference, _batch(2))
    expected.backward()
    torch.testing.assert_close(first + second, expected, rtol=1e-6, atol=0.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def _overwriting_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    _, smoothed = token_cross_entropy(logits, targets, 0.1, overwrite_logits=True)
    return smoothed.sum()


def test_the_next_projection_writes_into_the_memory_its_backward_handed_back() -> None:
    block = LogitsBlock()
    hidden = torch.randn(6, 5, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (6, 5))
    logits = project_logits(hidden, weight, block)  # fresh memory: the block has none yet
    address, nbytes = logits.data_ptr(), logits.untyped_storage().nbytes()
    assert logits._base is None  # the loss may overwrite it
    _overwriting_loss(logits, targets).backward()
    del logits  # as in the training loss: nobody keeps the logits
    assert block.nbytes == nbytes
    again = project_logits(hidden.detach()[:3].requires_grad_(), weight, block)  # smaller: fits in the block
    assert again.data_ptr() == address and again.shape == (3, 5, 40)
    torch.testing.assert_close(again, hidden.detach()[:3] @ weight.detach().t())


def test_memory_that_someone_may_still_read_is_not_kept() -> None:
    block = LogitsBlock()
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    # The gradient does not live in the logits' memory (nothing overwrote them): the caller may still hold them.
    kept = project_logits(hidden, weight, block)
    (kept * 2.0).sum().backward()
    assert block.nbytes == 0
    torch.testing.assert_close(weight.grad, 2.0 * torch.ones(6, 40).t() @ hidden.detach())
    # Without gradients (evaluation, generation) the block is neither lent nor filled.
    _overwriting_loss(project_logits(hidden, weight, block), torch.randint(0, 40, (6,))).backward()
    stored = block.nbytes
    with torch.no_grad():
        plain = project_logits(hidden, weight, block)
    assert block.nbytes == stored
    torch.testing.assert_close(plain, hidden.detach() @ weight.detach().t())


def test_copies_and_pickles_of_a_model_start_without_a_block() -> None:
    model = MoETransformer(get_preset("tiny", vocab_size=VOCAB, dropout=0.0))
    loss, _ = model.loss(_batch(0))
    loss.backward()
    assert model.loss_logits_block.nbytes > 0
    assert copy.deepcopy(model).loss_logits_block.nbytes == 0
    assert pickle.loads(pickle.dumps(model)).loss_logits_block.nbytes == 0
