"""``MoEZeroStrategy`` without processes: registration, argument and precision validation, small hooks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.enums import GradClipAlgorithmType

import lightning_moe  # noqa: F401 - registers the strategies
from lightning_moe.precision import MoEZeroHalfPrecision, MoEZeroMixedPrecision, MoEZeroPrecision
from lightning_moe.strategy import STRATEGY_PRESETS, SUPPORTED_PRECISIONS, MoEZeroStrategy, register_strategies


def _trainer(**kwargs: Any) -> Trainer:
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 2)
    return Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("name", sorted(STRATEGY_PRESETS))
def test_registered_names_resolve_with_their_settings(name: str) -> None:
    strategy = _trainer(strategy=name).strategy
    assert isinstance(strategy, MoEZeroStrategy)
    expected = dict(STRATEGY_PRESETS[name])
    assert strategy.zero_stage == expected["zero_stage"]
    assert strategy.offload == expected.get("offload", "none")
    assert strategy.expert_parallel_size == expected["expert_parallel_size"]
    assert StrategyRegistry[name]["strategy"] is MoEZeroStrategy


def test_presets_and_defaults() -> None:
    assert STRATEGY_PRESETS["moe_zero"] == {"zero_stage": 2, "expert_parallel_size": "auto"}
    assert STRATEGY_PRESETS["moe_zero_offload"]["zero_stage"] == 3
    assert STRATEGY_PRESETS["moe_zero_offload"]["offload"] == "optimizer"
    register_strategies()  # idempotent: registering again overrides without error
    strategy = MoEZeroStrategy()
    assert (strategy.zero_stage, strategy.offload, strategy.expert_parallel_size) == (2, "none", "auto")
    assert strategy.save_distributed_checkpoint is True and strategy.activation_checkpointing is False
    assert strategy.is_distributed is True
    assert strategy.restore_checkpoint_after_setup is True
    assert strategy.lightning_restore_optimizer is False


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(zero_stage=4), r"zero_stage=4 .*one of \[0, 1, 2, 3\]"),
        (dict(zero_stage="2"), r"zero_stage='2'"),
        (dict(offload="disk"), r"offload='disk' .*'none', 'optimizer', 'params'"),
        (dict(zero_stage=0, offload="optimizer"), r"offload='optimizer' needs zero_stage >= 1"),
        (dict(zero_stage=2, offload="params"), r"offload='params' needs zero_stage=3"),
        (dict(expert_parallel_size=0), r"expert_parallel_size=0"),
        (dict(expert_parallel_size="two"), r"expert_parallel_size='two'"),
        (dict(activation_checkpointing="yes"), r"activation_checkpointing='yes' must be True or False"),
        (dict(save_distributed_checkpoint=None), r"save_distributed_checkpoint=None"),
        (dict(process_group_backend=""), r"process_group_backend=''"),
        (dict(timeout=30), r"timeout=30 must be a positive datetime.timedelta"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        MoEZeroStrategy(**kwargs)


def test_expert_parallel_size_must_divide_the_world_size_when_the_trainer_is_built() -> None:
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 does not divide the data-parallel size 3"):
        _trainer(strategy=MoEZeroStrategy(expert_parallel_size=2), devices=3)
    with pytest.raises(ValueError, match=r"expert_parallel_size=4 does not divide the data-parallel size 6"):
        _trainer(strategy=MoEZeroStrategy(expert_parallel_size=4), devices=3, num_nodes=2)
    strategy = _trainer(strategy=MoEZeroStrategy(expert_parallel_size=2), devices=2, num_nodes=2).strategy
    assert strategy.parallel_dims.world_size == 4


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_supported_precisions_on_cpu(precision: str) -> None:
    assert _trainer(strategy="moe_zero", precision=precision).strategy.precision_plugin.precision == precision


@pytest.mark.parametrize("precision", ["64-true", "16-true", "64"])
def test_unsupported_precisions_list_the_supported_ones(precision: str) -> None:
    with pytest.raises(ValueError, match="does not support precision") as info:
        _trainer(strategy="moe_zero", precision=precision)
    for supported in SUPPORTED_PRECISIONS:
        assert repr(supported) in str(info.value)


@pytest.mark.parametrize("precision", ["16-mixed", 16, "16"])
def test_16_mixed_on_cpu_becomes_bf16_mixed_with_lightnings_warning(precision: Any) -> None:
    # Lightning turns '16-mixed' on CPU into 'bf16-mixed' before any strategy sees the plugin, and says so.
    with pytest.warns(UserWarning, match=r"precision='16-mixed'.*Using `precision='bf16-mixed'` instead"):
        plugin = _trainer(strategy="moe_zero", precision=precision).strategy.precision_plugin
    assert isinstance(plugin, MoEZeroMixedPrecision) and plugin.precision == "bf16-mixed" and plugin.device == "cpu"


def test_16_mixed_plugin_for_cpu_passed_directly_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"'16-mixed' needs CUDA"):
        MoEZeroStrategy(precision_plugin=MixedPrecision("16-mixed", device="cpu"))
    # the same plugin for CUDA is accepted (nothing touches a GPU here)
    plugin = MixedPrecision("16-mixed", device="cuda", scaler=None) if torch.cuda.is_available() else None
    if plugin is not None:
        ours = MoEZeroStrategy(precision_plugin=plugin).precision_plugin
        assert isinstance(ours, MoEZeroMixedPrecision) and ours.precision == "16-mixed"
        assert ours.device == "cuda" and ours.scaler is plugin.scaler
        assert MoEZeroStrategy(precision_plugin=ours).precision_plugin is ours


@pytest.mark.parametrize(
    ("precision", "plugin_type"),
    [("32-true", MoEZeroPrecision), ("bf16-mixed", MoEZeroMixedPrecision), ("bf16-true", MoEZeroHalfPrecision)],
)
def test_trainer_precision_becomes_the_strategys_plugin(precision: str, plugin_type: type) -> None:
    trainer = _trainer(strategy="moe_zero", precision=precision)
    assert type(trainer.strategy.precision_plugin) is plugin_type
    assert trainer.strategy.precision_plugin.precision == precision


def test_process_group_backend_choice() -> None:
    def backend(device: str, **kwargs: Any) -> str:
        strategy = MoEZeroStrategy(**kwargs)
        strategy.parallel_devices = [torch.device(device)]
        return strategy._get_process_group_backend()

    assert backend("cpu") == "gloo"
    assert backend("cpu", zero_stage=3, offload="params") == "gloo"
    assert backend("cuda:0") == "nccl"
    assert backend("cuda:0", zero_stage=3, offload="optimizer") == "cuda:nccl,cpu:gloo"
    assert backend("cuda:0", process_group_backend="gloo") == "gloo"
    assert MoEZeroStrategy(timeout=timedelta(seconds=5))._timeout == timedelta(seconds=5)


def test_sampler_kwargs_before_the_mesh_exists() -> None:
    strategy = _trainer(strategy="moe_zero", devices=2, num_nodes=2).strategy
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 4, "rank": 0}


@pytest.mark.parametrize(
    ("algorithm", "clip_val"), [(GradClipAlgorithmType.NORM, 0.5), (GradClipAlgorithmType.VALUE, 0.01)]
)
def test_clipping_is_routed_through_the_multi_mesh_clipping(
    algorithm: GradClipAlgorithmType, clip_val: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_moe.precision as strategy_module

    calls: list[str] = []
    real_norm, real_value = strategy_module.clip_grad_norm_, strategy_module.clip_grad_value_

    def spy_norm(*args: Any, **kwargs: Any) -> Any:
        calls.append("norm")
        return real_norm(*args, **kwargs)

    def spy_value(*args: Any, **kwargs: Any) -> Any:
        calls.append("value")
        return real_value(*args, **kwargs)

    monkeypatch.setattr(strategy_module, "clip_grad_norm_", spy_norm)
    monkeypatch.setattr(strategy_module, "clip_grad_value_", spy_value)
    plugin: Precision = _trainer(strategy="moe_zero").precision_plugin
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    layer(torch.randn(3, 4)).pow(2).sum().mul(100).backward()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = torch.cat([p.grad.flatten() for p in layer.parameters()]).clone()
    plugin.clip_gradients(optimizer, clip_val, algorithm)
    after = torch.cat([p.grad.flatten() for p in layer.parameters()])
    assert calls == [algorithm.value]
    if algorithm == GradClipAlgorithmType.NORM:
        assert before.norm() > clip_val
        torch.testing.assert_close(after.norm(), torch.tensor(clip_val), rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(after, before.clamp(-clip_val, clip_val))


def test_storage_options_are_rejected() -> None:
    with pytest.raises(TypeError, match="storage_options"):
        MoEZeroStrategy().save_checkpoint({}, "x.ckpt", storage_options={"a": 1})


def test_evaluation_steps_leave_inference_mode_for_no_grad() -> None:
    from lightning_moe.parallel.fsdp import no_inference_mode

    with torch.inference_mode():
        with no_inference_mode():
            assert not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        assert torch.is_inference_mode_enabled()
    with no_inference_mode():  # outside inference mode nothing changes
        assert torch.is_grad_enabled()
