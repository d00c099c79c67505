"""The root configuration of ``python -m lightning_moe.train``, and its validation.

``TrainConfig`` is registered with Hydra's ConfigStore as ``train_schema``, together with the options of
the ``model``, ``moe``, ``data`` and ``strategy`` groups, which are built from the Python presets (their
only home). ``conf/config.yaml`` lists the schema first in its defaults, so every group is merged into the
typed tree in strict mode: an
unknown key (a typo) is rejected by Hydra, a wrongly typed value by OmegaConf, and a bad value by the
dataclasses' ``__post_init__`` (see :func:`to_train_config`), all before any process group starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_moe.config.errors import ConfigError
from lightning_moe.config.loggers import check_logger_packages
from lightning_moe.config.run import CheckpointConfig, GenerationConfig, OptimConfig, StrategyConfig, TrainerConfig
from lightning_moe.data.datamodule import DATA_PRESETS, DataConfig
from lightning_moe.data.download import SAMPLE_DIR
from lightning_moe.models.config import MOE_PRESETS, PRESETS, MoEConfig, TransformerConfig
from lightning_moe.strategy_presets import STRATEGY_PRESETS
from lightning_moe.tasks.multitask import MultitaskConfig

__all__ = [
    "TrainConfig",
    "ModelConfig",
    "to_train_config",
    "register_configs",
    "group_presets",
    "SAMPLE_DATA_DIR",
    "ConfigError",
]

SAMPLE_DATA_DIR = SAMPLE_DIR
"""The embedded Multi30k sample (``data=sample``)."""


# Generated from TransformerConfig so the architecture's fields, types and defaults have one home.
ModelConfig = make_dataclass(
    "ModelConfig",
    [(f.name, f.type, field(default=f.default)) for f in fields(TransformerConfig) if f.name != "moe"],
    namespace={
        "__doc__": "The ``model`` group: the fields of :class:`TransformerConfig` (documented there) except "
        "``moe``, which is the top-level ``moe`` group, its one place on the command line."
    },
)
ModelConfig.__module__ = __name__


def _architecture(config: TransformerConfig) -> Any:
    """The ``model`` group node of a :class:`TransformerConfig` (every field but ``moe``)."""
    values = asdict(config)
    del values["moe"]
    return ModelConfig(**values)


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field is a Hydra group of the same name under ``conf/``
    (or registered from the Python presets by :func:`register_configs`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (``model=tiny|small|base``, from ``models.config.PRESETS``). ``model.vocab_size``
    follows ``data.vocab_size``; the MoE settings are the top-level ``moe`` group."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE layers (``moe=dense|top1|top2|...``, from ``models.config.MOE_PRESETS``). ``moe.num_experts=0``
    is the dense twin."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer and batching (``data=sample|multi30k|small``, from ``DATA_PRESETS``)."""
    tasks: MultitaskConfig = field(default_factory=MultitaskConfig)
    """The task mixture (``conf/tasks``: translation, denoising, multitask, ...)."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """Parallelism (``strategy=single|ddp|moe_zero|moe_zero_stage3|moe_zero_offload|...``)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer settings (``conf/trainer``: cpu, gpu)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding for validation BLEU and the translate/evaluate commands."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint folder, period, retention and resuming."""
    logger: dict[str, Any] = field(default_factory=dict)
    """Lightning loggers by name, each a ``_target_`` node for ``hydra.utils.instantiate`` (``conf/logger``:
    tensorboard, csv, wandb, mlflow, none); ``save_dir`` defaults to ``output_dir``."""
    callbacks: dict[str, Any] = field(default_factory=dict)
    """Extra Lightning callbacks by name, each a ``_target_`` node (``conf/callbacks``, e.g.
    ``callbacks=[early_stopping,device_stats]`` or ``+callbacks.swa._target_=...``); null entries are skipped."""
    name: str = "default"
    """Run name: the output folder is ``runs/<name>`` (stable, so re-running resumes)."""
    output_dir: str = "runs/default"
    """Where logs and checkpoints go (set by Hydra from ``name``)."""
    seed: int = 1234
    """Seed of parameter initialisation and dropout (data order has ``data.seed``)."""
    init_from: str | None = None
    """Fine-tuning: initialise the model's weights from this checkpoint (any parallel layout), then train
    with a fresh optimizer and step counter. A run with checkpoints of its own (``checkpoint.resume``)
    resumes from them instead."""
    test_after_fit: bool = True
    """Evaluate BLEU/chrF on the test splits after training."""

    @property
    def transformer(self) -> TransformerConfig:
        """The model's full configuration: ``model`` with ``moe``."""
        return TransformerConfig(**asdict(self.model), moe=self.moe)


def group_presets() -> dict[str, dict[str, Any]]:
    """The command line's options of the ``model``, ``moe``, ``data`` and ``strategy`` groups, built from
    the Python presets (their one home): ``{group: {option: node}}``."""
    strategies: dict[str, Any] = {"single": StrategyConfig(name="single"), "ddp": StrategyConfig(name="ddp")}
    for name, preset in STRATEGY_PRESETS.items():
        strategies[name] = StrategyConfig(
            name=name,
            expert_parallel_size=preset.get("expert_parallel_size", "auto"),
            zero_stage=preset["zero_stage"],
            offload=preset.get("offload", "none"),
        )
    return {
        "model": {name: _architecture(config) for name, config in PRESETS.items()},
        "moe": dict(MOE_PRESETS),
        "data": dict(DATA_PRESETS),
        "strategy": strategies,
    }


def register_configs() -> None:
    """Register ``train_schema`` and the preset groups with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for group, options in group_presets().items():
        for name, node in options.items():
            store.store(group=group, name=name, node=node)


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


def _instantiable(cfg: DictConfig, key: str, output_dir: str) -> dict[str, Any]:
    """The ``_target_`` nodes of group ``key`` as plain dicts (``${output_dir}`` resolved); null entries dropped."""
    if cfg.get(key) is None:
        return {}
    holder = cfg.copy()  # resolved with output_dir known (outside a Hydra job it has no ${hydra:...})
    with open_dict(holder):
        holder.output_dir = output_dir
    values = OmegaConf.to_container(holder[key], resolve=True)
    result = {}
    for name, item in values.items():
        if item is None:
            continue
        if not isinstance(item, dict) or "_target_" not in item:
            raise ConfigError(
                f"invalid configuration: {key}.{name} must be a node with a _target_ (a class path such as "
                f"lightning.pytorch.callbacks.EarlyStopping) or null"
            )
        result[str(name)] = item
    return result


def _lift_nested_moe(values: Any) -> dict[str, Any]:
    """A plain mapping in the older layout (``model.moe``) moved to the top-level ``moe``."""
    values = dict(values)
    model = dict(values.get("model") or {})
    if "moe" not in model:
        return values
    if "moe" in values:
        raise ConfigError("invalid configuration: both model.moe and moe are set; keep only the top-level moe")
    values["moe"] = model.pop("moe")
    values["model"] = model
    return values


def to_train_config(cfg: Any) -> TrainConfig:
    """Validate a composed Hydra config (or a plain mapping) into a :class:`TrainConfig`. A plain mapping
    may still nest the MoE settings as ``model.moe`` (the layout before the top-level group was their home).

    Raises:
        ConfigError: naming the offending key and a valid alternative.
    """
    if isinstance(cfg, TrainConfig):
        cfg = OmegaConf.structured(cfg)
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(_lift_nested_moe(cfg)))
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(cfg.keys()) - known - {"hydra"}
    if unknown:
        raise ConfigError(f"unknown configuration keys {sorted(unknown)}; valid top-level keys: {sorted(known)}")

    model_node = OmegaConf.to_container(cfg.model, resolve=True)
    moe = _build(MoEConfig, cfg.moe, "moe")
    data = _build(DataConfig, cfg.data, "data")
    model_node["vocab_size"] = data.vocab_size
    try:
        transformer = TransformerConfig(**model_node, moe=moe)
    except (ValueError, TypeError) as err:
        prefix = "" if str(err).startswith("moe.") else "model."
        raise ConfigError(f"invalid configuration: {prefix}{err}") from err
    tasks = _build(MultitaskConfig, cfg.tasks, "tasks")
    missing = [lang for lang in tasks.langs() if lang not in data.langs]
    if missing:
        raise ConfigError(
            f"invalid configuration: the tasks read languages {missing} that data.langs={data.langs} lacks; "
            f"add them to data.langs or pick other tasks"
        )
    strategy = _build(StrategyConfig, cfg.strategy, "strategy")
    trainer = _build(TrainerConfig, cfg.trainer, "trainer")
    ep = strategy.expert_parallel_size
    uneven = [c for c in transformer.experts_per_moe_layer() if ep != "auto" and c % ep != 0]
    if uneven:
        raise ConfigError(
            f"invalid configuration: strategy.expert_parallel_size={ep} does not divide moe.num_experts="
            f"{moe.num_experts}; use an expert-parallel size dividing every MoE layer's expert count"
        )
    if strategy.name == "single" and (trainer.devices != 1 or trainer.num_nodes != 1):
        raise ConfigError(
            f"invalid configuration: strategy={strategy.name} runs one process but trainer.devices={trainer.devices}, "
            f"trainer.num_nodes={trainer.num_nodes}; use strategy=moe_zero (or ddp) for several processes"
        )
    if transformer.max_positions < data.max_len + 1:
        raise ConfigError(
            f"invalid configuration: model.max_positions={transformer.max_positions} must exceed "
            f"data.max_len={data.max_len}; raise model.max_positions or lower data.max_len"
        )
    if moe.aux_loss_scope == "global" and strategy.name == "ddp":
        raise ConfigError(
            "invalid configuration: moe.aux_loss_scope=global sums the balance statistics through the moe_zero "
            "strategy's parallel engine; use strategy=moe_zero (any zero_stage) or moe.aux_loss_scope=local"
        )
    if moe.upcycle and (not cfg.init_from or not moe.enabled):
        raise ConfigError(
            "invalid configuration: moe.upcycle=true needs init_from=DENSE.ckpt (a dense checkpoint) and "
            f"moe.num_experts > 0 (got init_from={cfg.init_from!r}, moe.num_experts={moe.num_experts})"
        )
    seed = cfg.seed
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"invalid configuration: seed={seed!r} must be an integer >= 0")
    output_dir = _output_dir(cfg)
    loggers = _instantiable(cfg, "logger", output_dir)
    check_logger_packages(loggers)
    return TrainConfig(
        model=_architecture(transformer),
        moe=moe,
        data=data,
        tasks=tasks,
        strategy=strategy,
        trainer=trainer,
        optim=_build(OptimConfig, cfg.optim, "optim"),
        generation=_build(GenerationConfig, cfg.generation, "generation"),
        checkpoint=_build(CheckpointConfig, cfg.checkpoint, "checkpoint"),
        logger=loggers,
        callbacks=_instantiable(cfg, "callbacks", output_dir),
        name=str(cfg.name),
        output_dir=output_dir,
        seed=seed,
        init_from=cfg.init_from,
        test_after_fit=bool(cfg.test_after_fit),
    )


def _output_dir(cfg: DictConfig) -> str:
    """Hydra's run folder when Hydra runs the job, else ``runs/<name>`` (e.g. under the compose API)."""
    value = OmegaConf.select(cfg, "output_dir", throw_on_resolution_failure=False)
    return str(value) if value else f"runs/{cfg.name}"
