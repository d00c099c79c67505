"""TransformerConfig / MoEConfig: presets, overrides, validation, MoE positions, Hydra compatibility."""

import inspect
from dataclasses import asdict

import pytest
import torch
from omegaconf import OmegaConf

from lightning_moe.models import PRESETS, MoEConfig, TransformerConfig, dense_twin, get_preset
from lightning_moe.moe import MoE


def test_presets_are_valid_and_ordered_by_size():
    widths = [PRESETS[name].d_model for name in ("tiny", "small", "base")]
    assert widths == sorted(widths)
    base = PRESETS["base"]
    assert (base.d_model, base.encoder_layers, base.decoder_layers, base.ffn_hidden_size, base.num_heads) == (
        512,
        6,
        6,
        2048,
        8,
    )
    tiny = PRESETS["tiny"]
    assert 128 <= tiny.d_model <= 256 and tiny.encoder_layers <= 3 and tiny.num_heads == 4
    for cfg in PRESETS.values():
        TransformerConfig(**asdict(cfg))  # round-trips through validation


def test_get_preset_overrides_top_level_and_moe_fields():
    cfg = get_preset("tiny", vocab_size=123, num_experts=0, k=2, dropout=0.0)
    assert cfg.vocab_size == 123 and cfg.dropout == 0.0
    assert cfg.moe.num_experts == 0 and cfg.moe.k == 2
    assert PRESETS["tiny"].vocab_size != 123  # presets untouched
    cfg = get_preset("small", moe={"capacity_factor": 2.0})
    assert cfg.moe.capacity_factor == 2.0 and cfg.moe.num_experts == PRESETS["small"].moe.num_experts


def test_get_preset_rejects_unknown_names_and_keys():
    with pytest.raises(ValueError, match="huge"):
        get_preset("huge")
    with pytest.raises(ValueError, match="d_modle"):
        get_preset("tiny", d_modle=64)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_heads": 5}, "num_heads"),
        ({"d_model": 0}, "d_model"),
        ({"dropout": 1.0}, "dropout"),
        ({"positional": "rotary"}, "positional"),
        ({"moe_every": 0}, "moe_every"),
        ({"moe_every": 2, "moe_offset": 2}, "moe_offset"),
        ({"max_positions": 1}, "max_positions"),
        ({"tie_embeddings": "yes"}, "tie_embeddings"),
        ({"residual_in_compute_dtype": 1}, "residual_in_compute_dtype"),
        ({"moe": {"num_experts": 2, "k": 3}}, "moe.k"),
        ({"moe": {"num_experts": -1}}, "moe.num_experts"),
        ({"moe": {"expert": "mlp"}}, "moe.expert"),
        ({"moe": {"activation": "tanh"}}, "moe.activation"),
        ({"moe": {"capacity_factor": 0.0}}, "moe.capacity_factor"),
        ({"moe": {"noisy_gate_policy": "gaussian"}}, "noisy_gate_policy"),
        ({"moe": {"aux_loss_coef": -0.1}}, "moe.aux_loss_coef"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TransformerConfig(**kwargs)


def test_moe_positions():
    def positions(cfg, n=6):
        return [i for i in range(n) if cfg.is_moe_position(i)]

    assert positions(TransformerConfig(moe_every=2)) == [1, 3, 5]  # 2nd, 4th, ... (Z-code style)
    assert positions(TransformerConfig(moe_every=2, moe_offset=0)) == [0, 2, 4]
    assert positions(TransformerConfig(moe_every=1)) == list(range(6))
    assert positions(TransformerConfig(moe_every=3)) == [2, 5]


def test_dense_twin_widths():
    cfg = TransformerConfig(ffn_hidden_size=100, moe=MoEConfig(num_experts=4, k=2))
    twin = dense_twin(cfg)
    assert twin.moe.num_experts == 0 and twin.moe.k == 2
    assert [twin.dense_ffn_hidden_size(i) for i in range(4)] == [100, 200, 100, 200]
    residual = dense_twin(TransformerConfig(ffn_hidden_size=100, moe=MoEConfig(num_experts=4, k=2, use_residual=True)))
    assert residual.dense_ffn_hidden_size(1) == 300


def test_layer_kwargs_map_onto_moe_arguments():
    moe_cfg = MoEConfig(num_experts=4, k=2, expert="glu", capacity_factor=1.5, drop_tokens=False, use_residual=True)
    kwargs = moe_cfg.layer_kwargs()
    assert set(kwargs) <= set(inspect.signature(MoE).parameters)
    assert kwargs["activation"] == "silu"  # glu default, passed explicitly
    layer = MoE(16, moe_cfg.num_experts, 32, **kwargs)
    assert layer.k == 2 and layer.capacity_factor == 1.5 and layer.drop_tokens is False and layer.use_residual
    out = layer(torch.randn(2, 3, 16))
    assert out.output.shape == (2, 3, 16)


def test_the_model_evaluates_without_drops_unless_asked():
    """Validation routes every token by default; ``eval_drop_tokens=True`` gives DeepSpeed's eval capacity."""
    assert MoEConfig().eval_drop_tokens is False
    for eval_drop_tokens, expected in ((False, None), (True, 20)):
        kwargs = MoEConfig(
            num_experts=4, k=1, eval_capacity_factor=2.0, eval_drop_tokens=eval_drop_tokens
        ).layer_kwargs()
        layer = MoE(16, 4, 32, **{**kwargs, "min_capacity": 0}).eval()
        assert layer.capacity(40) == expected
    with pytest.raises(ValueError, match="moe.eval_drop_tokens"):
        MoEConfig(eval_drop_tokens="yes")


def test_structured_config_merges_yaml_and_rejects_typos():
    schema = OmegaConf.structured(TransformerConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"d_model": 64, "num_heads": 4, "moe": {"num_experts": 8}}))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, TransformerConfig) and isinstance(cfg.moe, MoEConfig)
    assert cfg.d_model == 64 and cfg.moe.num_experts == 8
    with pytest.raises(Exception, match="num_expert"):
        OmegaConf.merge(schema, OmegaConf.create({"moe": {"num_expert": 8}}))
    bad = OmegaConf.merge(schema, OmegaConf.create({"num_heads": 7}))
    with pytest.raises(ValueError, match="num_heads"):
        OmegaConf.to_object(bad)
