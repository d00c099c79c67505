"""The configuration stored with a checkpoint against a re-run's: which keys may change, which stop the run."""

from __future__ import annotations

import pytest

from lightning_moe.config import ConfigError, TrainConfig
from lightning_moe.config.resume import (
    MAY_CHANGE_ON_RESUME,
    VALUE_BEFORE_KEY_EXISTED,
    check_same_run,
    config_differences,
    run_config,
)


def _cfg(**changes: dict) -> dict:
    tree = run_config(TrainConfig())
    for group, values in changes.items():
        tree[group] = {**tree[group], **values} if isinstance(tree[group], dict) else values
    return tree


def test_the_stored_config_is_plain_data() -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(run_config(TrainConfig()), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == run_config(TrainConfig())


def test_keys_that_may_change_pass() -> None:
    saved = _cfg()
    current = _cfg(
        trainer={"max_steps": 10_000, "devices": 4, "log_every_n_steps": 1},
        checkpoint={"keep_last": 9, "every_n_train_steps": 50},
        strategy={"name": "moe_zero", "zero_stage": 3},
        generation={"beam_size": 5},
        data={"root": "/elsewhere", "num_workers": 4},
        logger={"csv": {"_target_": "x"}},
        name="other",
    )
    assert config_differences(saved, current) == []
    check_same_run(saved, current, "ckpt")


@pytest.mark.parametrize(
    ("group", "values", "key"),
    [
        ("model", {"d_model": 1024}, "model.d_model"),
        ("moe", {"num_experts": 64}, "moe.num_experts"),
        ("data", {"vocab_size": 123}, "data.vocab_size"),
        ("data", {"langs": ["en", "cs"]}, "data.langs"),
        ("optim", {"lr": 0.5}, "optim.lr"),
        ("optim", {"betas": [0.8, 0.9]}, "optim.betas"),
        ("trainer", {"precision": "bf16-mixed"}, "trainer.precision"),
        ("trainer", {"accumulate_grad_batches": 4}, "trainer.accumulate_grad_batches"),
        ("seed", 7, "seed"),
    ],
)
def test_other_keys_stop_the_run_naming_them(group: str, values: object, key: str) -> None:
    saved, current = _cfg(), _cfg(**{group: values})
    differences = config_differences(saved, current)
    assert [d.split(":")[0] for d in differences] == [key]
    with pytest.raises(
        ConfigError, match=rf"1 key\(s\) differ: {key}: .* -> .*start a new run with another name"
    ) as info:
        check_same_run(saved, current, "runs/x/checkpoints/step-000004.ckpt")
    assert "\n" not in str(info.value)


def test_tasks_changes_stop_the_run() -> None:
    saved = _cfg()
    current = _cfg(tasks={"tasks": saved["tasks"]["tasks"][:1]})
    assert [d.split(":")[0] for d in config_differences(saved, current)] == ["tasks.tasks"]
    assert [d.split(":")[0] for d in config_differences(saved, _cfg(tasks={"temperature": 1.0}))] == [
        "tasks.temperature"
    ]


def test_a_checkpoint_without_a_stored_config_is_accepted() -> None:
    check_same_run(None, _cfg(), "old.ckpt")


def test_a_checkpoint_from_before_a_key_existed_resumes_with_the_value_of_that_time() -> None:
    # Written before model.residual_in_compute_dtype existed: its runs kept the residual stream in fp32.
    saved = _cfg()
    del saved["model"]["residual_in_compute_dtype"]
    assert config_differences(saved, _cfg(model={"residual_in_compute_dtype": False})) == []
    with pytest.raises(ConfigError, match=r"model\.residual_in_compute_dtype: False -> True"):
        check_same_run(saved, _cfg(), "runs/x/checkpoints/step-000004.ckpt")


def test_a_model_config_stored_before_a_key_existed_gets_the_value_of_that_time() -> None:
    from dataclasses import asdict

    from lightning_moe.models import get_preset
    from lightning_moe.module import transformer_config_from_dict

    stored = asdict(get_preset("tiny", vocab_size=64))
    assert transformer_config_from_dict(stored).residual_in_compute_dtype is True
    del stored["residual_in_compute_dtype"]  # hyper-parameters saved before 2026-12-05
    assert transformer_config_from_dict(stored).residual_in_compute_dtype is False


def test_the_allow_list_names_real_keys() -> None:
    flat_keys = set()

    def walk(tree: dict, prefix: str = "") -> None:
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else k
            flat_keys.add(key)
            if isinstance(v, dict):
                walk(v, key)

    walk(run_config(TrainConfig()))
    unknown = [k for k in (*MAY_CHANGE_ON_RESUME, *VALUE_BEFORE_KEY_EXISTED) if k not in flat_keys]
    assert not unknown, unknown
