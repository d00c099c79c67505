"""First contact with ``python -m lightning_moe.train``: unknown group options and multiruns that would
re-run themselves stop at once; the logger and callbacks groups build Lightning objects; TensorBoard
falls back to CSV; a resumed run keeps its logger version."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from lightning.pytorch.callbacks import DeviceStatsMonitor, EarlyStopping, LearningRateMonitor, Timer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_moe.config import ConfigError, register_configs, to_train_config
from lightning_moe.config.launch import check_group_options, check_multirun
from lightning_moe.config.loggers import instantiate_loggers

register_configs()


def _compose(overrides: list[str]):
    with initialize_config_module(config_module="lightning_moe.conf", version_base=None):
        return compose(config_name="config", overrides=overrides)


def _missing(*packages: str):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in packages else real(name, *args, **kwargs)

    return find_spec


# ------------------------------------------------------------------------------------- group options


@pytest.mark.parametrize(
    "argv, bad",
    [
        (["experiment=finetun"], "experiment=finetun"),
        (["model=tiny", "moe=top3"], "moe=top3"),
        (["-m", "moe=top1,top3"], "moe=top3"),  # a sweep: each option is checked
        (["callbacks=[early_stopping,early_stop]"], "callbacks=early_stop"),
    ],
)
def test_unknown_group_option_is_one_line_naming_the_valid_ones(argv, bad):
    with pytest.raises(ConfigError) as err:
        check_group_options(argv)
    message = str(err.value)
    assert bad in message and "\n" not in message
    group = bad.split("=")[0]
    assert {"experiment": "finetune", "moe": "top2", "callbacks": "early_stopping"}[group] in message


def test_known_options_and_plain_keys_pass():
    check_group_options(
        ["experiment=finetune", "init_from=x", "model=small", "-m", "moe=top1,top2", "trainer.max_steps=3"]
    )
    check_group_options(["callbacks=[early_stopping,device_stats]", "logger=csv", "hydra.run.dir=x", "--multirun"])


def test_experiment_group_is_not_optional():
    # Hydra itself also refuses the misspelled option now (an optional group was skipped silently).
    with pytest.raises((ConfigCompositionException, MissingConfigException), match="finetun"):
        _compose(["experiment=finetun"])


# ------------------------------------------------------------------------------------------ multirun


def test_multirun_with_several_processes_stops(monkeypatch):
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "LSB_JOBID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"multirun \(-m\).*trainer.devices=2"):
        check_multirun(True, 2, 1, "cpu")
    with pytest.raises(ConfigError, match="multirun"):
        check_multirun(True, 1, 2, "cpu")
    check_multirun(False, 2, 1, "cpu")  # a single run may start several processes
    check_multirun(True, 1, 1, "cpu")  # a sweep of one-process jobs is fine
    monkeypatch.setenv("LOCAL_RANK", "0")  # started by an external launcher: argv is not re-run
    check_multirun(True, 2, 1, "cpu")


# ------------------------------------------------------------------------------------------ loggers


def test_logger_group_builds_lightning_loggers(tmp_path: Path):
    from lightning_moe.train import build_trainer

    for option, cls in (("tensorboard", TensorBoardLogger), ("csv", CSVLogger)):
        cfg = to_train_config(_compose([f"logger={option}", f"output_dir={tmp_path}"]))
        trainer = build_trainer(cfg)
        assert isinstance(trainer.logger, cls) and trainer.logger.save_dir == str(tmp_path)
        assert any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)
    trainer = build_trainer(to_train_config(_compose(["logger=none", f"output_dir={tmp_path}"])))
    assert trainer.logger is None and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)


@pytest.mark.parametrize("option", ["wandb", "mlflow"])
def test_logger_without_its_package_names_what_to_install(option, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _missing(option))
    with pytest.raises(ConfigError, match=f"pip install {option}") as err:
        to_train_config(_compose([f"logger={option}"]))
    assert "\n" not in str(err.value)


def test_tensorboard_missing_falls_back_to_csv_with_one_warning(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(importlib.util, "find_spec", _missing("tensorboard", "tensorboardX"))
    cfg = to_train_config(_compose([f"output_dir={tmp_path}"]))  # the default logger: no error
    with caplog.at_level(logging.WARNING):
        loggers = instantiate_loggers(cfg.logger, cfg.output_dir)
    assert [type(lg) for lg in loggers] == [CSVLogger]
    assert loggers[0].save_dir == str(tmp_path) and loggers[0].name == "logs"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0].getMessage()


@pytest.mark.parametrize("option", ["tensorboard", "csv"])
def test_resumed_run_keeps_its_logger_version(option, tmp_path: Path):
    nodes = to_train_config(_compose([f"logger={option}", f"output_dir={tmp_path}"])).logger
    first = instantiate_loggers(nodes, str(tmp_path))[0]
    assert first.version == 0
    Path(first.log_dir).mkdir(parents=True, exist_ok=True)  # what the first run leaves behind
    resumed = instantiate_loggers(nodes, str(tmp_path), resuming=True)[0]
    assert resumed.version == 0 and resumed.log_dir == first.log_dir
    fresh = instantiate_loggers(nodes, str(tmp_path), resuming=False)[0]
    assert fresh.version == 1  # a new run (no checkpoint to resume) still gets its own folder


def test_resumed_csv_logger_keeps_the_rows_logged_before(tmp_path: Path):
    import csv

    nodes = to_train_config(_compose(["logger=csv", f"output_dir={tmp_path}"])).logger
    first = instantiate_loggers(nodes, str(tmp_path))[0]
    first.log_metrics({"train/loss": 2.0}, step=10)
    first.save()
    resumed = instantiate_loggers(nodes, str(tmp_path), resuming=True)[0]
    resumed.log_metrics({"train/loss": 1.5}, step=20)
    resumed.log_metrics({"val/nll": 1.0}, step=20)  # a key the file's header lacks
    resumed.save()
    rows = list(csv.DictReader(open(Path(first.log_dir) / "metrics.csv")))
    assert [(r["step"], r["train/loss"], r["val/nll"]) for r in rows] == [
        ("10", "2.0", ""),
        ("20", "1.5", ""),
        ("20", "", "1.0"),
    ]


# ---------------------------------------------------------------------------------------- callbacks


def test_callbacks_group_and_command_line_nodes_reach_the_trainer(tmp_path: Path):
    from lightning_moe.train import build_trainer

    cfg = to_train_config(
        _compose(
            [
                f"output_dir={tmp_path}",
                "callbacks=[early_stopping,device_stats]",
                "callbacks.early_stopping.patience=2",
                "+callbacks.timer._target_=lightning.pytorch.callbacks.Timer",
            ]
        )
    )
    trainer = build_trainer(cfg)
    stopping = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    assert len(stopping) == 1 and stopping[0].patience == 2 and stopping[0].monitor == "val/nll"
    assert any(isinstance(c, DeviceStatsMonitor) for c in trainer.callbacks)
    assert any(isinstance(c, Timer) for c in trainer.callbacks)
    assert to_train_config(_compose([])).callbacks == {}


def test_callback_node_without_target_is_refused():
    with pytest.raises(ConfigError, match="callbacks.bad"):
        to_train_config(_compose(["+callbacks.bad.patience=3"]))
