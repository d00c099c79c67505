"""MoETransformer: shapes, masking, padding invariance, losses, parameter counts, caches, meta init."""

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.models import (
    MoETransformer,
    count_parameters,
    dense_twin,
    moe_layers,
    sequence_cross_entropy,
)
from lightning_moe.models.transformer import FeedForward
from lightning_moe.moe import MoE
from tests.small_models import small_config as shared_small_config

VOCAB = 40
PAD = 0


def small_config(num_experts: int = 4, **overrides):
    return shared_small_config(VOCAB, num_experts, **overrides)


def make_model(num_experts: int = 4, seed: int = 0, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(small_config(num_experts, **overrides)).eval()


def random_batch(batch=3, src_len=7, tgt_len=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (batch, src_len), generator=g)
    tgt = torch.randint(3, VOCAB, (batch, tgt_len), generator=g)
    src_mask = torch.zeros(batch, src_len, dtype=torch.bool)
    tgt_mask = torch.zeros(batch, tgt_len, dtype=torch.bool)
    src_mask[0, src_len - 2 :] = True
    tgt_mask[1, tgt_len - 3 :] = True
    src = src.masked_fill(src_mask, PAD)
    tgt = tgt.masked_fill(tgt_mask, PAD)
    return src, src_mask, tgt, tgt_mask


def batch_dict(src, src_mask, tgt, tgt_mask):
    tgt_in = F.pad(tgt[:, :-1], (1, 0), value=1)  # BOS = 1
    return {"src": src, "src_padding_mask": src_mask, "tgt_in": tgt_in, "tgt_out": tgt, "tgt_padding_mask": tgt_mask}


@pytest.mark.parametrize("num_experts", [0, 4])
def test_forward_shapes_and_dtypes(num_experts):
    model = make_model(num_experts)
    src, src_mask, tgt, tgt_mask = random_batch()
    out = model(src, src_mask, tgt, tgt_mask)
    assert out.logits.shape == (3, 6, VOCAB) and out.logits.dtype == torch.float32
    assert out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32
    assert len(out.expert_counts) == len(moe_layers(model))
    if num_experts:
        assert len(out.expert_counts) == 2  # block 1 of the encoder and of the decoder
        assert out.aux_loss.item() > 0
        # Padding is not routed: each layer routes k assignments per real token.
        enc_counts, dec_counts = out.expert_counts
        assert enc_counts.shape == (num_experts,) and enc_counts.dtype == torch.long
        assert enc_counts.sum().item() == 2 * (~src_mask).sum().item()
        assert dec_counts.sum().item() == 2 * (~tgt_mask).sum().item()
    else:
        assert out.aux_loss.item() == 0.0
    model_bf16 = make_model(num_experts).to(torch.bfloat16)
    out16 = model_bf16(src, src_mask, tgt, tgt_mask)
    assert out16.logits.dtype == torch.bfloat16 and out16.aux_loss.dtype == torch.float32
    assert torch.isfinite(out16.logits.float()).all()


def test_moe_layers_sit_at_the_configured_positions():
    model = make_model(4, encoder_layers=4, decoder_layers=3)
    names = [name for name, _ in moe_layers(model)]
    assert names == ["encoder_layers.1.ffn", "encoder_layers.3.ffn", "decoder_layers.1.ffn"]
    assert isinstance(model.encoder_layers[0].ffn, FeedForward)
    model = make_model(4, moe_every=1)
    assert len(moe_layers(model)) == 4
    assert moe_layers(make_model(0)) == []


@pytest.mark.parametrize("num_experts", [0, 4])
def test_padding_does_not_change_real_positions(num_experts):
    model = make_model(num_experts)
    src, src_mask, tgt, tgt_mask = random_batch()
    ref = model(src, src_mask, tgt, tgt_mask)
    extra_src, extra_tgt = 3, 2
    src_p = F.pad(src, (0, extra_src), value=PAD)
    src_mask_p = F.pad(src_mask, (0, extra_src), value=True)
    tgt_p = F.pad(tgt, (0, extra_tgt), value=PAD)
    tgt_mask_p = F.pad(tgt_mask, (0, extra_tgt), value=True)
    out = model(src_p, src_mask_p, tgt_p, tgt_mask_p)
    real = ~tgt_mask  # [B, T]
    torch.testing.assert_close(out.logits[:, : tgt.shape[1]][real], ref.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
    for a, b in zip(out.expert_counts, ref.expert_counts):
        assert torch.equal(a, b)


def test_padding_tokens_content_is_ignored():
    model = make_model(4)
    src, src_mask, tgt, tgt_mask = random_batch()
    ref = model(src, src_mask, tgt, tgt_mask).logits
    src2 = src.masked_fill(src_mask, 7)  # other ids at padded positions
    tgt2 = tgt.masked_fill(tgt_mask, 9)
    out = model(src2, src_mask, tgt2, tgt_mask).logits
    torch.testing.assert_close(out[~tgt_mask], ref[~tgt_mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_experts", [0, 4])
def test_decoder_is_causal(num_experts):
    model = make_model(num_experts)
    src, src_mask, tgt, _ = random_batch()
    ref = model(src, src_mask, tgt, None).logits
    j = 3
    changed = tgt.clone()
    changed[:, j] = (changed[:, j] + 1 - 3) % (VOCAB - 3) + 3
    out = model(src, src_mask, changed, None).logits
    torch.testing.assert_close(out[:, :j], ref[:, :j], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, j], ref[:, j], atol=1e-4)


def test_source_changes_reach_every_target_position():
    model = make_model(0)
    src, _, tgt, _ = random_batch()
    ref = model(src, None, tgt, None).logits
    src2 = src.clone()
    src2[:, 1] = (src2[:, 1] + 1 - 3) % (VOCAB - 3) + 3
    out = model(src2, None, tgt, None).logits
    assert (out - ref).abs().amax(dim=-1).min() > 0  # every position depends on the source


@pytest.mark.parametrize(
    "moe_kwargs",
    [
        dict(num_experts=4, k=1),
        dict(num_experts=4, k=2),
        dict(num_experts=8, k=2, expert="glu"),
        dict(num_experts=4, k=1, use_residual=True),
    ],
    ids=["top1", "top2", "glu-top2", "residual-top1"],
)
def test_dense_twin_has_the_same_active_parameters(moe_kwargs):
    cfg = small_config(**moe_kwargs)
    moe_model = MoETransformer(cfg)
    twin = MoETransformer(dense_twin(cfg))
    assert moe_layers(twin) == []
    total, active = count_parameters(moe_model)
    twin_total, twin_active = count_parameters(twin)
    assert twin_total == twin_active
    assert total > active
    # Tolerance: per MoE layer, the router (and residual coefficient) weights plus the (k-1) extra
    # output biases d_model of the k experts a token uses; for a GLU residual branch, rounding of 2h/3.
    tolerance = 0
    for _, layer in moe_layers(moe_model):
        routing = sum(p.numel() for p in layer.parameters()) - sum(p.numel() for p in layer.experts.parameters())
        routing -= sum(p.numel() for p in layer.residual_mlp.parameters()) if layer.use_residual else 0
        tolerance += routing + layer.k * cfg.d_model
    assert abs(active - twin_active) <= tolerance
    assert abs(active - twin_active) / twin_active < 0.02


def test_count_parameters_counts_experts_by_k_over_e():
    cfg = small_config(num_experts=4, k=1)
    model = MoETransformer(cfg)
    total, active = count_parameters(model)
    expert_params = sum(p.numel() for _, layer in moe_layers(model) for p in layer.experts.parameters())
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == expert_params - expert_params // 4


def test_tied_embeddings_share_one_matrix():
    tied = make_model(0)
    untied = make_model(0, tie_embeddings=False)
    assert tied.output_proj is None and tied.tgt_embed is None
    assert tied.tied_head is not None and tied.tied_head.embedding is tied.src_embed
    # The head holds no copy: the table is saved and listed once, under src_embed.
    assert not any("tied_head" in key for key in tied.state_dict())
    assert [n for n, _ in tied.named_parameters() if "embed" in n] == ["src_embed.weight"]
    hidden = torch.randn(2, 3, 32)
    torch.testing.assert_close(tied.output_logits(hidden), hidden @ tied.src_embed.weight.T)
    diff = count_parameters(untied)[0] - count_parameters(tied)[0]
    assert diff == 2 * VOCAB * 32
    # The tied output projection is the embedding matrix: its gradient gets contributions from both uses.
    src, src_mask, tgt, tgt_mask = random_batch()
    loss, _ = tied.loss(batch_dict(src, src_mask, tgt, tgt_mask))
    loss.backward()
    assert tied.src_embed.weight.grad is not None and tied.src_embed.weight.grad.abs().sum() > 0


def test_learned_positions():
    model = make_model(4, positional="learned")
    assert model.encoder_pos_embed is not None and model.decoder_pos_embed is not None
    src, src_mask, tgt, tgt_mask = random_batch()
    assert model(src, src_mask, tgt, tgt_mask).logits.shape == (3, 6, VOCAB)


def test_sequence_cross_entropy_matches_torch_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    for eps in (0.0, 0.1):
        loss, nll, n = sequence_cross_entropy(logits, targets, mask, label_smoothing=eps)
        ref = F.cross_entropy(
            logits.view(-1, 11), targets.masked_fill(mask, -100).view(-1), ignore_index=-100, label_smoothing=eps
        )
        ref_nll = F.cross_entropy(logits.view(-1, 11), targets.masked_fill(mask, -100).view(-1), ignore_index=-100)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(nll, ref_nll)
        assert n.item() == 8


def test_aux_loss_is_added_only_for_moe_models():
    src, src_mask, tgt, tgt_mask = random_batch()
    batch = batch_dict(src, src_mask, tgt, tgt_mask)
    dense = make_model(0)
    loss, details = dense.loss(batch, label_smoothing=0.1)
    assert details["aux_loss"].item() == 0.0 and details["expert_counts"] == []
    torch.testing.assert_close(loss, details["ce"])

    moe = make_model(4)
    loss, details = moe.loss(batch, label_smoothing=0.1)
    assert details["aux_loss"].item() > 0
    torch.testing.assert_close(loss.detach(), details["ce"] + details["aux_loss"])
    assert details["num_tokens"].item() == (~tgt_mask).sum().item()
    _, plain = moe.loss(batch, label_smoothing=0.0)
    torch.testing.assert_close(plain["ce"], details["nll"])  # nll is the unsmoothed cross entropy
    loss.backward()
    for _, layer in moe_layers(moe):  # gradients reach the router (through aux loss and weights) and experts
        assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
        assert all(p.grad is not None for p in layer.experts.parameters())


def test_invalid_inputs_raise_value_errors():
    model = make_model(0)
    src, src_mask, tgt, tgt_mask = random_batch()
    with pytest.raises(ValueError, match="src_padding_mask"):
        model(src, src_mask.long(), tgt, tgt_mask)
    with pytest.raises(ValueError, match="tgt_padding_mask"):
        model(src, src_mask, tgt, tgt_mask[:, :-1])
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.randint(3, VOCAB, (1, 40)), None, tgt[:1], None)
    with pytest.raises(ValueError, match="src"):
        model(src.float(), src_mask, tgt, tgt_mask)
    with pytest.raises(ValueError, match="tgt_out"):
        model.loss({"src": src, "tgt_in": tgt})


@pytest.mark.parametrize("num_experts", [0, 4])
def test_incremental_decoding_matches_full_forward(num_experts):
    model = make_model(num_experts)
    src, src_mask, tgt, _ = random_batch()
    ref = model(src, src_mask, tgt, None).logits  # [B, T, V]
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        cache = model.new_cache(capacity=2)  # smaller than needed: the cache grows
        steps = [model.decode_step(tgt[:, :2], memory, src_mask, cache)]  # a two-token prefix, then one at a time
        for t in range(2, tgt.shape[1]):
            steps.append(model.decode_step(tgt[:, t : t + 1], memory, src_mask, cache))
        assert cache.position == tgt.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, atol=1e-5, rtol=1e-5)


def _moe_has_full_reset() -> bool:
    """Whether the MoE layer (or its router) can re-initialise itself after a meta-device build."""
    from lightning_moe.moe import TopKRouter

    return hasattr(MoE, "reset_parameters") or hasattr(TopKRouter, "reset_parameters")


@pytest.mark.parametrize(
    "num_experts",
    [
        0,
        pytest.param(
            4,
            marks=pytest.mark.xfail(
                not _moe_has_full_reset(), strict=True, reason="MoE router has no reset_parameters yet"
            ),
        ),
    ],
)
def test_meta_device_build_then_init_weights(num_experts):
    cfg = small_config(num_experts)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # what uninitialised memory may hold
    torch.manual_seed(0)
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    src, src_mask, tgt, tgt_mask = random_batch()
    out = model.eval()(src, src_mask, tgt, tgt_mask)
    assert torch.isfinite(out.logits).all()
    assert out.logits.std() < 10  # initialised, not garbage memory


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = MoETransformer(small_config(0, dropout=0.3))
    src, src_mask, tgt, tgt_mask = random_batch()
    model.train()
    a = model(src, src_mask, tgt, tgt_mask).logits
    b = model(src, src_mask, tgt, tgt_mask).logits
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(src, src_mask, tgt, tgt_mask).logits, model(src, src_mask, tgt, tgt_mask).logits)


def test_moe_layer_type_is_the_project_moe():
    model = make_model(4)
    assert all(isinstance(layer, MoE) for _, layer in moe_layers(model))


def test_a_source_of_only_padding_gives_finite_outputs():
    model = make_model(4)
    src, src_mask, tgt, tgt_mask = random_batch()
    src_mask[2] = True
    out = model(src, src_mask, tgt, tgt_mask)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)


def test_model_code_imports_neither_torch_distributed_nor_lightning():
    import pathlib
    import re

    import lightning_moe.models as models

    pattern = re.compile(r"^\s*(import|from)\s+(torch\.distributed|lightning|pytorch_lightning)\b", re.MULTILINE)
    sources = list(pathlib.Path(models.__file__).parent.glob("*.py"))
    assert len(sources) >= 5
    offenders = [p.name for p in sources if pattern.search(p.read_text())]
    assert offenders == []
