"""A tiny MoE transformer learns to copy short sequences: the loss falls and greedy decoding reproduces them."""

import pytest
import torch

from lightning_moe.models import MoETransformer, greedy_decode
from tests.small_models import small_config

PAD, BOS, EOS = 0, 1, 2
VOCAB = 12


def copy_task_config(num_experts: int, k: int):
    """The copy-task model: width 64, 2 + 2 blocks, dropout off, capacity factor 2 (the preset drops tokens)."""
    wide = {"d_model": 64, "ffn_hidden_size": 128, "max_positions": 16}
    capacity = {"capacity_factor": 2.0, "eval_capacity_factor": 2.0, "drop_tokens": True}
    return small_config(VOCAB, num_experts, k=k, **wide, **capacity)


def copy_task(num: int = 16, seed: int = 0) -> dict:
    """``num`` random sequences of 3-6 content tokens; the target is the source itself."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 7, (num,), generator=g).tolist()
    width = max(lengths) + 1
    src = torch.full((num, width - 1), PAD)
    tgt_in = torch.full((num, width), PAD)
    tgt_out = torch.full((num, width), PAD)
    for i, n in enumerate(lengths):
        seq = torch.randint(3, VOCAB, (n,), generator=g)
        src[i, :n] = seq
        tgt_in[i, : n + 1] = torch.cat([torch.tensor([BOS]), seq])
        tgt_out[i, : n + 1] = torch.cat([seq, torch.tensor([EOS])])
    return {
        "src": src,
        "src_padding_mask": src == PAD,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "tgt_padding_mask": tgt_out == PAD,
        "lengths": lengths,
    }


@pytest.fixture
def one_thread():
    """Tiny matrices run faster on one thread, and much faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("num_experts", [4])
def test_tiny_moe_model_overfits_a_copy_task(num_experts, one_thread):
    torch.manual_seed(0)
    cfg = copy_task_config(num_experts, k=1)
    model = MoETransformer(cfg)
    batch = copy_task()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(100):
        loss, details = model.loss(batch, label_smoothing=0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(details["nll"].item())
        assert details["aux_loss"].item() > 0
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    out = greedy_decode(model, batch["src"], batch["src_padding_mask"], bos_id=BOS, eos_id=EOS, pad_id=PAD)
    expected = [batch["src"][i, :n].tolist() for i, n in enumerate(batch["lengths"])]
    assert out == expected
    assert model.training  # generation restored the mode
