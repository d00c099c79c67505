"""The root configuration of ``python -m lightning_moe.train``, and its validation.

``TrainConfig`` is registered with Hydra's ConfigStore as ``train_schema``; ``conf/config.yaml``
lists it first in its defaults, so every YAML group is merged into the typed tree in strict mode: an
unknown key (a typo) is rejected by Hydra, a wrongly typed value by OmegaConf, and a bad value by the
dataclasses' ``__post_init__`` (see :func:`to_train_config`), all before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_moe.config.run import CheckpointConfig, GenerationConfig, OptimConfig, StrategyConfig, TrainerConfig
from lightning_moe.data.datamodule import DataConfig
from lightning_moe.data.download import SAMPLE_DIR
from lightning_moe.models.config import MoEConfig, TransformerConfig
from lightning_moe.tasks.multitask import MultitaskConfig

__all__ = ["TrainConfig", "to_train_config", "register_configs", "SAMPLE_DATA_DIR", "ConfigError"]

SAMPLE_DATA_DIR = SAMPLE_DIR
"""The embedded Multi30k sample (``data=sample``)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and a valid alternative."""


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field is a Hydra group of the same name under ``conf/``."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    """Architecture (``conf/model``: tiny, small, base). ``model.vocab_size`` follows ``data.vocab_size``;
    the MoE settings live in the top-level ``moe`` group, not in ``model.moe``."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE layers (``conf/moe``: dense, top1, top2, ...). ``moe.num_experts=0`` is the dense twin."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and batching (``conf/data``: sample, multi30k)."""
    tasks: MultitaskConfig = field(default_factory=MultitaskConfig)
    """The task mixture (``conf/tasks``: translation, denoising, multitask, ...)."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """Parallelism (``conf/strategy``: single, ddp, moe_zero, moe_zero_offload)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer settings (``conf/trainer``: cpu, gpu)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for validation BLEU and the translate/evaluate commands."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint folder, period, retention and resuming."""
    name: str = "default"
    """Run name: the output folder is ``runs/<name>`` (stable, so re-running resumes)."""
    output_dir: str = "runs/default"
    """Where logs and checkpoints go (set by Hydra from ``name``)."""
    seed: int = 1234
    """Seed of parameter initialisation and dropout (data order has ``data.seed``)."""
    init_from: Optional[str] = None
    """Fine-tuning: initialise the model's weights from this checkpoint (any parallel layout), then train
    with a fresh optimizer and step counter. A run with checkpoints of its own (``checkpoint.resume``)
    resumes from them instead."""
    test_after_fit: bool = True
    """Evaluate BLEU/chrF on the test splits after training."""


def register_configs() -> None:
    """Register ``train_schema`` with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _build(cls: type, node: Any, key: str) -> Any:
    try:
        if isinstance(node, cls):
            return replace(node)  # re-runs __post_init__ validation
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        return cls(**values)
    except (ValueError, TypeError) as err:
        message = str(err)
        prefix = f"{key}." if not message.startswith(f"{key}") else ""
        raise ConfigError(f"invalid configuration: {prefix}{message}") from err


def to_train_config(cfg: Any) -> TrainConfig:
    """Validate a composed Hydra config (or a plain mapping) into a :class:`TrainConfig`.

    Raises:
        ConfigError: naming the offending key and a valid alternative.
    """
    if isinstance(cfg, TrainConfig):
        cfg = OmegaConf.structured(cfg)
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(cfg))
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(cfg.keys()) - known - {"hydra"}
    if unknown:
        raise ConfigError(f"unknown configuration keys {sorted(unknown)}; valid top-level keys: {sorted(known)}")

    model_node = OmegaConf.to_container(cfg.model, resolve=True)
    nested_moe = model_node.pop("moe", None)
    if nested_moe and nested_moe != OmegaConf.to_container(OmegaConf.structured(MoEConfig)):
        raise ConfigError("set the MoE options with the top-level group (moe.num_experts=8), not model.moe.*")
    moe = _build(MoEConfig, cfg.moe, "moe")
    data = _build(DataConfig, cfg.data, "data")
    model_node["vocab_size"] = data.vocab_size
    try:
        model = TransformerConfig(**model_node, moe=moe)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid configuration: model.{err}") from err
    tasks = _build(MultitaskConfig, cfg.tasks, "tasks")
    missing = [lang for lang in tasks.langs() if lang not in data.langs]
    if missing:
        raise ConfigError(
            f"invalid configuration: the tasks read languages {missing} that data.langs={data.langs} lacks; "
            f"add them to data.langs or pick other tasks"
        )
    strategy = _build(StrategyConfig, cfg.strategy, "strategy")
    trainer = _build(TrainerConfig, cfg.trainer, "trainer")
    if strategy.name == "single" and (trainer.devices != 1 or trainer.num_nodes != 1):
        raise ConfigError(
            f"invalid configuration: strategy={strategy.name} runs one process but trainer.devices={trainer.devices}, "
            f"trainer.num_nodes={trainer.num_nodes}; use strategy=moe_zero (or ddp) for several processes"
        )
    if model.max_positions < data.max_len + 1:
        raise ConfigError(
            f"invalid configuration: model.max_positions={model.max_positions} must exceed data.max_len={data.max_len}; "
            f"raise model.max_positions or lower data.max_len"
        )
    seed = cfg.seed
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"invalid configuration: seed={seed!r} must be an integer >= 0")
    return TrainConfig(
        model=model,
        moe=moe,
        data=data,
        tasks=tasks,
        strategy=strategy,
        trainer=trainer,
        optim=_build(OptimConfig, cfg.optim, "optim"),
        generation=_build(GenerationConfig, cfg.generation, "generation"),
        checkpoint=_build(CheckpointConfig, cfg.checkpoint, "checkpoint"),
        name=str(cfg.name),
        output_dir=_output_dir(cfg),
        seed=seed,
        init_from=cfg.init_from,
        test_after_fit=bool(cfg.test_after_fit),
    )


def _output_dir(cfg: DictConfig) -> str:
    """Hydra's run folder when Hydra runs the job, else ``runs/<name>`` (e.g. under the compose API)."""
    value = OmegaConf.select(cfg, "output_dir", throw_on_resolution_failure=False)
    return str(value) if value else f"runs/{cfg.name}"


def _resolve_sample_data() -> str:
    return str(SAMPLE_DATA_DIR)


if not OmegaConf.has_resolver("lmoe_sample_data"):
    OmegaConf.register_new_resolver("lmoe_sample_data", _resolve_sample_data)

