"""Hydra config groups compose into the typed schema; typos and bad values fail naming the key."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from lightning_moe.config import ConfigError, register_configs, to_train_config
from lightning_moe.config.schema import group_presets
from lightning_moe.models import PRESETS

CONF = Path(__file__).resolve().parents[2] / "conf"
YAML_GROUPS = {
    p.name: sorted(q.stem for q in p.glob("*.yaml"))
    for p in CONF.iterdir()
    if p.is_dir() and not p.name.startswith("_")
}
PYTHON_GROUPS = {group: sorted(options) for group, options in group_presets().items()}
OPTIONS = [(g, o) for groups in (YAML_GROUPS, PYTHON_GROUPS) for g, options in sorted(groups.items()) for o in options]

register_configs()


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="lightning_moe.conf", version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_default_config_is_the_tiny_multitask_moe_on_the_embedded_sample():
    cfg = to_train_config(_compose([]))
    assert cfg.model.d_model == PRESETS["tiny"].d_model
    assert cfg.moe.num_experts == 8 and cfg.moe.k == 2
    assert cfg.transformer.moe == cfg.moe  # the top-level group is what the model gets
    assert not hasattr(cfg.model, "moe")  # ... and the only place of the MoE settings
    assert Path(cfg.data.root).is_dir() and (Path(cfg.data.root) / "train.en.gz").exists()
    assert cfg.model.vocab_size == cfg.data.vocab_size
    assert cfg.strategy.name == "single"


def test_python_preset_groups_have_no_yaml_copy():
    assert not set(YAML_GROUPS) & set(PYTHON_GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "experiment" and option == "finetune":
        overrides.append("init_from=some/checkpoint")
    if group == "strategy" and option.startswith(("moe_zero", "ddp")):
        overrides.append("trainer.devices=2")
    if group == "logger" and option in ("wandb", "mlflow"):
        pytest.importorskip(option)
    cfg = to_train_config(_compose(overrides))
    assert cfg is not None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_presets_are_the_same_from_python_and_the_command_line(name):
    from lightning_moe.models.config import DEFAULT_MOE_PRESET, MOE_PRESETS

    cfg = to_train_config(_compose([f"model={name}"]))
    # The CLI sets the vocabulary from the data; everything else, the MoE settings included, must agree.
    assert asdict(replace(cfg.transformer, vocab_size=PRESETS[name].vocab_size)) == asdict(PRESETS[name])
    assert PRESETS[name].moe == MOE_PRESETS[DEFAULT_MOE_PRESET] == cfg.moe


@pytest.mark.parametrize("name", sorted(group_presets()["moe"]))
def test_moe_presets_are_the_same_from_python_and_the_command_line(name):
    from lightning_moe.models.config import MOE_PRESETS

    assert to_train_config(_compose([f"moe={name}"])).moe == MOE_PRESETS[name]


@pytest.mark.parametrize("name", sorted(group_presets()["data"]))
def test_data_presets_are_the_same_from_python_and_the_command_line(name):
    from lightning_moe.data.datamodule import get_data_preset

    assert to_train_config(_compose([f"data={name}"])).data == get_data_preset(name)


@pytest.mark.parametrize("name", sorted(group_presets()["strategy"]))
def test_strategy_presets_are_the_same_from_python_and_the_command_line(name):
    from lightning_moe.strategy import STRATEGY_PRESETS as REGISTERED
    from lightning_moe.strategy_presets import STRATEGY_PRESETS
    from lightning_moe.train import build_strategy

    devices = 1 if name == "single" else 2
    cfg = to_train_config(_compose([f"strategy={name}", f"trainer.devices={devices}"]))
    assert cfg.strategy.name == name
    if name in STRATEGY_PRESETS:
        assert REGISTERED[name] == STRATEGY_PRESETS[name]  # what Trainer(strategy=name) gets
        strategy = build_strategy(cfg)
        for key, value in STRATEGY_PRESETS[name].items():
            assert getattr(strategy, key) == value, (name, key)
        assert cfg.strategy.zero_stage == STRATEGY_PRESETS[name]["zero_stage"]
        assert cfg.strategy.offload == STRATEGY_PRESETS[name].get("offload", "none")


@pytest.mark.parametrize(("accelerator", "device"), [("cpu", "cpu"), ("gpu", "cuda:0"), ("cuda", "cuda:0")])
def test_single_device_strategy_names_an_indexed_device(accelerator, device):
    """Lightning's CUDA accelerator calls ``torch.cuda.set_device(root_device)``, which needs an index (found on
    an H200: ``trainer=gpu`` with ``strategy=single`` failed at start-up)."""
    from lightning_moe.train import build_strategy

    cfg = to_train_config(_compose(["strategy=single", f"trainer.accelerator={accelerator}"]))
    assert build_strategy(cfg).root_device == torch.device(device)


def test_command_line_overrides_reach_the_typed_config():
    cfg = to_train_config(
        _compose(["moe.num_experts=16", "moe.k=2", "tasks=multitask", "strategy=moe_zero", "trainer.devices=2"])
    )
    assert cfg.moe.num_experts == 16 and cfg.transformer.moe.num_experts == 16
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


def test_moe_lives_only_in_the_top_level_group():
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="moe"):
        _compose(["model.moe.num_experts=4"])


def test_tensor_parallel_size_reaches_the_strategy():
    from lightning_moe.train import build_strategy

    cfg = to_train_config(_compose(["strategy=moe_zero", "strategy.tensor_parallel_size=2", "trainer.devices=2"]))
    assert cfg.strategy.tensor_parallel_size == 2
    assert build_strategy(cfg).tensor_parallel_size == 2
    with pytest.raises(ConfigError, match="strategy.name=moe_zero"):
        to_train_config(_compose(["strategy=single", "strategy.tensor_parallel_size=2"]))


def test_plain_mapping_with_nested_model_moe_still_validates():
    cfg = to_train_config({"model": {"d_model": 64, "moe": {"num_experts": 4, "k": 1}}, "strategy": {"name": "single"}})
    assert cfg.moe.num_experts == 4 and cfg.transformer.moe.k == 1 and cfg.model.d_model == 64
    with pytest.raises(ConfigError, match="keep only the top-level moe"):
        to_train_config({"model": {"moe": {"num_experts": 4}}, "moe": {"num_experts": 8}})


def test_the_multi30k_recipe_composes_to_the_documented_settings():
    """`experiment=multi30k` (README: the Multi30k recipe): full corpus, small MoE, multitask, bf16 where the CPU
    has it, beam search."""
    cfg = to_train_config(_compose(["experiment=multi30k", "data.root=/nonexistent"]))
    assert (cfg.transformer.d_model, cfg.transformer.encoder_layers) == (256, 3)
    assert (cfg.moe.num_experts, cfg.moe.k) == (8, 2)
    assert [t["name"] for t in cfg.tasks.tasks] == ["translation", "translation", "denoising"]
    assert cfg.data.max_train_sentences is None and cfg.trainer.precision == "auto"
    assert (cfg.generation.beam_size, cfg.trainer.max_steps, cfg.name) == (4, 4000, "multi30k")
    # decoding chosen on the validation split: beam 4, length penalty 2, the mean of the last 2 checkpoints
    assert (cfg.generation.length_penalty, cfg.checkpoint.average_last) == (2.0, 2)
