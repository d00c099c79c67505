"""The CPU dropout (``lightning_moe/models/dropout.py``) against the definition of dropout: each element dropped
independently with probability p, kept ones scaled by 1/(1-p), the same mask in the gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.models.dropout import Dropout, drop_probability, dropout

COUNT = 1 << 22


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_every_lane_position_drops_with_probability_p(p: float) -> None:
    torch.manual_seed(0)
    out = dropout(torch.ones(COUNT), p)
    dropped = (out == 0).view(-1, 4).float()  # [COUNT / 4, 4]: the four 16-bit lanes of each random word
    spread = 5 * (p * (1 - p) / (COUNT / 4)) ** 0.5  # five standard deviations of a lane position's fraction
    for lane in range(4):
        assert abs(float(dropped[:, lane].mean()) - p) < spread, lane
    # neighbours (lanes of one word, and words) are independent: P(both dropped) = p^2
    both = float((dropped[:, :3] * dropped[:, 1:]).mean())
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / (COUNT / 4 * 3)) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_values_are_scaled_once_and_the_gradient_uses_the_same_mask(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    p = 0.1
    x = (torch.rand(64, 257) + 0.5).to(dtype).requires_grad_()  # no zeros: a zero output means dropped
    out = dropout(x, p)
    kept = out != 0
    scale = torch.tensor(1.0 / (1.0 - drop_probability(p)), dtype=torch.float32)  # applied in fp32, as F.dropout
    expected = (x.detach().float() * scale).to(dtype)  # one rounding of the fp32 product
    assert out.dtype == dtype
    torch.testing.assert_close(out[kept], expected[kept], rtol=0, atol=0)
    grad = torch.randn(64, 257).to(dtype)
    out.backward(grad)
    torch.testing.assert_close(x.grad, (grad.float() * scale).to(dtype) * kept, rtol=0, atol=0)


def test_the_output_keeps_the_inputs_expectation() -> None:
    torch.manual_seed(2)
    x = torch.randn(COUNT)
    out = dropout(x, 0.3)
    # E[out] = x: the sum of out - x has mean 0 and variance sum(x^2) p / (1 - p)
    deviation = float((out - x).double().sum())
    assert abs(deviation) < 5 * (float(x.double().pow(2).sum()) * 0.3 / 0.7) ** 0.5


def test_identity_when_not_training_or_p_is_zero_and_seeded_masks_repeat() -> None:
    x = torch.randn(100)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    torch.manual_seed(3)
    first, second = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), first) and not torch.equal(first, second)
    assert drop_probability(0.1) == 6554 / 65536


def test_module_has_no_state_and_follows_train_and_eval() -> None:
    module = Dropout(0.2)
    assert dict(module.state_dict()) == {} and "p=0.2" in repr(module)
    x = torch.randn(1000)
    module.eval()
    assert module(x) is x
    module.train()
    assert (module(x) == 0).any()
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


def test_torch_dropout_where_the_fast_mask_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(F, "dropout", lambda x, p, training: calls.append(p) or x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dropout(torch.randn(10), 0.25)
    assert calls == [0.25]
