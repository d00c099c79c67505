"""Typed configuration: Hydra structured configs validated into dataclasses."""

from lightning_moe.config.run import CheckpointConfig, GenerationConfig, OptimConfig, StrategyConfig, TrainerConfig
from lightning_moe.config.schema import ConfigError, TrainConfig, register_configs, to_train_config

__all__ = [
    "TrainConfig",
    "to_train_config",
    "register_configs",
    "ConfigError",
    "OptimConfig",
    "GenerationConfig",
    "StrategyConfig",
    "TrainerConfig",
    "CheckpointConfig",
]
