"""Hydra config groups compose into the typed schema; typos and bad values fail naming the key."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from lightning_moe.config import ConfigError, register_configs, to_train_config
from lightning_moe.models import PRESETS

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))

register_configs()


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="lightning_moe.conf", version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_default_config_is_the_tiny_multitask_moe_on_the_embedded_sample():
    cfg = to_train_config(_compose([]))
    assert cfg.model.d_model == PRESETS["tiny"].d_model
    assert cfg.moe.num_experts == 8 and cfg.moe.k == 2
    assert cfg.model.moe == cfg.moe  # the top-level group is what the model gets
    assert Path(cfg.data.root).is_dir() and (Path(cfg.data.root) / "train.en.gz").exists()
    assert cfg.model.vocab_size == cfg.data.vocab_size
    assert cfg.strategy.name == "single"


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "experiment" and option == "finetune":
        overrides.append("init_from=some/checkpoint")
    if group == "strategy" and option.startswith("moe_zero"):
        overrides.append("trainer.devices=2")
    cfg = to_train_config(_compose(overrides))
    assert cfg is not None


def test_model_yaml_presets_match_python_presets():
    for option in ("tiny", "small", "base"):
        cfg = to_train_config(_compose([f"model={option}"]))
        preset = asdict(PRESETS[option])
        for key in ("d_model", "num_heads", "ffn_hidden_size", "encoder_layers", "decoder_layers", "dropout"):
            assert getattr(cfg.model, key) == preset[key], (option, key)


def test_command_line_overrides_reach_the_typed_config():
    cfg = to_train_config(
        _compose(["moe.num_experts=16", "moe.k=2", "tasks=multitask", "strategy=moe_zero", "trainer.devices=2"])
    )
    assert cfg.moe.num_experts == 16 and cfg.model.moe.num_experts == 16
    assert cfg.strategy.name == "moe_zero" and cfg.strategy.zero_stage == 2 and cfg.trainer.devices == 2


def test_misspelled_key_is_rejected():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["moe.num_expert=4"])
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["trainer.max_step=4"])


def test_wrong_type_is_rejected():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["moe.k=two"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("moe.k=16", "k=16"),
        ("moe.capacity_factor=0", "capacity_factor"),
        ("moe.noisy_gate_policy=gauss", "noisy_gate_policy"),
        ("trainer.precision=64-true", "trainer.precision"),
        ("strategy.zero_stage=5", "strategy.zero_stage"),
        ("strategy.tensor_parallel_size=0", "strategy.tensor_parallel_size"),
        ("optim.lr=-1", "optim.lr"),
        ("data.vocab_size=3", "data.vocab_size"),
        ("tasks.temperature=0", "tasks.temperature"),
        ("data.langs=[en,de]", "data.langs"),  # the default tasks also read fr
    ],
)
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        to_train_config(_compose([override]))


def test_zero_stage_needs_moe_zero():
    with pytest.raises(ConfigError, match="strategy.name=moe_zero"):
        to_train_config(_compose(["strategy=single", "+strategy.zero_stage=3"]))


def test_single_process_strategy_rejects_several_devices():
    with pytest.raises(ConfigError, match="trainer.devices=2"):
        to_train_config(_compose(["trainer.devices=2"]))


def test_nested_model_moe_is_refused_in_favour_of_top_level_group():
    with pytest.raises(ConfigError, match="moe.num_experts"):
        to_train_config(_compose(["model.moe.num_experts=4"]))


def test_tensor_parallel_size_reaches_the_strategy():
    from lightning_moe.train import build_strategy

    cfg = to_train_config(_compose(["strategy=moe_zero", "strategy.tensor_parallel_size=2", "trainer.devices=2"]))
    assert cfg.strategy.tensor_parallel_size == 2
    assert build_strategy(cfg).tensor_parallel_size == 2
    with pytest.raises(ConfigError, match="strategy.name=moe_zero"):
        to_train_config(_compose(["strategy=single", "strategy.tensor_parallel_size=2"]))
