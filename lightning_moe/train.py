"""``python -m lightning_moe.train``: train the multitask MoE translator (Hydra command line).

With no arguments it trains the tiny MoE model on the Multi30k sample embedded in the package, on one
CPU process. Every config group can be overridden, e.g.::

    python -m lightning_moe.train moe.num_experts=16 moe.k=2 tasks=multitask \\
        strategy=moe_zero trainer.devices=2 data=multi30k data.root=PATH
    python -m lightning_moe.train -m moe.num_experts=4,8          # a multirun sweep
    python -m lightning_moe.train experiment=finetune init_from=runs/default/checkpoints/step-001200.ckpt
    python -m lightning_moe.train logger=csv callbacks=[early_stopping]   # loggers/callbacks by name
    python -m lightning_moe.train --help                          # the groups and their options

A re-run of the same command resumes from the newest complete checkpoint (``checkpoint.resume=auto``) and
keeps logging to the same logger version; a damaged newest checkpoint is reported and the one before it
used; a re-run with another configuration (beyond ``config.resume.MAY_CHANGE_ON_RESUME``) stops, naming
the keys. SIGTERM / SIGUSR1 (``checkpoint.preempt_signals``) save a checkpoint at the current step and
exit with code 75 (``lightning_moe.preemption``).

Exit codes: 0 done, 1 error, 2 invalid configuration, 75 preempted (checkpoint saved; re-run to continue).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig

import lightning_moe  # noqa: F401  (registers the moe_zero strategies)
from lightning_moe.callbacks import (
    ExpertLoadMonitor,
    NonFiniteGuard,
    RNGStateCheckpoint,
    RouterBiasUpdate,
    RunConfigCheckpoint,
)
from lightning_moe.checkpoint import AtomicCheckpointIO, RetainingModelCheckpoint, prune_checkpoints, resolve_resume
from lightning_moe.checkpoint.files import CheckpointWriteError
from lightning_moe.checkpoint.manifest import DamagedCheckpointError
from lightning_moe.checkpoint.resume import later_checkpoints, read_checkpoint_meta
from lightning_moe.cli import one_line
from lightning_moe.config import ConfigError, TrainConfig, register_configs, to_train_config
from lightning_moe.config.launch import check_group_options, check_multirun
from lightning_moe.config.loggers import instantiate_callbacks, instantiate_loggers
from lightning_moe.config.precision import resolve_precision
from lightning_moe.config.resume import RUN_CONFIG_KEY, check_same_run, run_config
from lightning_moe.data.datamodule import MultitaskDataModule
from lightning_moe.module import MultitaskTranslationModule
from lightning_moe.preemption import Preempted, request_slurm_requeue

__all__ = ["main", "run", "build_strategy", "build_trainer", "build_module"]

log = logging.getLogger(__name__)

register_configs()


class InitFromError(ValueError):
    """``init_from`` names a checkpoint that cannot be read or has no tokenizer (one line)."""


def build_strategy(cfg: TrainConfig) -> Any:
    """The ``Trainer(strategy=...)`` argument for ``cfg.strategy``."""
    s = cfg.strategy
    if s.is_moe_zero:
        from lightning_moe.strategy import MoEZeroStrategy
        from lightning_moe.strategy_presets import STRATEGY_PRESETS

        kwargs = dict(STRATEGY_PRESETS.get(s.name, {}))
        kwargs["expert_parallel_size"] = s.expert_parallel_size
        if s.zero_stage is not None:
            kwargs["zero_stage"] = s.zero_stage
        if s.offload is not None:
            kwargs["offload"] = s.offload
        kwargs["tensor_parallel_size"] = s.tensor_parallel_size
        kwargs["activation_checkpointing"] = s.activation_checkpointing
        kwargs["save_distributed_checkpoint"] = s.save_distributed_checkpoint
        kwargs["timeout"] = timedelta(seconds=s.timeout_s)
        return MoEZeroStrategy(**kwargs)
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(checkpoint_io=AtomicCheckpointIO(), timeout=timedelta(seconds=s.timeout_s))
    from lightning.pytorch.strategies import SingleDeviceStrategy

    accelerator = cfg.trainer.accelerator
    on_gpu = accelerator in ("gpu", "cuda")
    if accelerator == "auto":
        import torch

        on_gpu = torch.cuda.is_available()
    # An index is required: Lightning's CUDA accelerator calls torch.cuda.set_device(root_device).
    return SingleDeviceStrategy(device="cuda:0" if on_gpu else "cpu", checkpoint_io=AtomicCheckpointIO())


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.checkpoint.dirpath) if cfg.checkpoint.dirpath else Path(cfg.output_dir) / "checkpoints"


def build_trainer(cfg: TrainConfig, extra_callbacks: list | None = None, resuming: bool = False) -> pl.Trainer:
    """A ``lightning.Trainer`` for ``cfg`` with checkpointing, expert-load logging and the non-finite guard,
    plus the loggers and callbacks of the ``logger`` and ``callbacks`` groups. ``resuming``: the loggers
    continue the version the run wrote before."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    t = cfg.trainer
    callbacks: list = [
        RetainingModelCheckpoint(
            keep_last=cfg.checkpoint.keep_last,
            preempt_signals=cfg.checkpoint.preempt_signals,
            dirpath=str(checkpoint_dir(cfg)),
            filename="step-{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cfg.checkpoint.every_n_train_steps,
            save_last=False,
        ),
        ExpertLoadMonitor(),
        RouterBiasUpdate(),
        NonFiniteGuard(policy=t.nonfinite, max_skips=t.nonfinite_max),
        RNGStateCheckpoint(),
        RunConfigCheckpoint(run_config(cfg)),
    ]
    loggers = instantiate_loggers(cfg.logger, cfg.output_dir, resuming)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.extend(instantiate_callbacks(cfg.callbacks))
    callbacks.extend(extra_callbacks or [])
    precision, why = resolve_precision(t.precision, t.accelerator)
    log.info("%s", why)  # which precision, and why
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        gradient_clip_algorithm=t.gradient_clip_algorithm,
        log_every_n_steps=t.log_every_n_steps,
        logger=loggers or False,
        callbacks=callbacks,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        default_root_dir=cfg.output_dir,
        use_distributed_sampler=False,  # the datamodule shards its token-bucket batches itself
        num_sanity_val_steps=0,
    )


def build_module(
    cfg: TrainConfig, datamodule: MultitaskDataModule, init_checkpoint: dict[str, Any] | None = None
) -> MultitaskTranslationModule:
    """The LightningModule for ``cfg``, with the datamodule's tokenizer and validation directions;
    initialised from ``init_checkpoint`` (read from ``cfg.init_from``) when fine-tuning."""
    tokenizer = datamodule.tokenizer
    model_config = replace(cfg.transformer, vocab_size=tokenizer.vocab_size)
    module = MultitaskTranslationModule(
        model=model_config,
        optim=cfg.optim,
        generation=cfg.generation,
        special_ids={"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id},
        val_directions=datamodule.val_names,
        max_steps=cfg.trainer.max_steps,
        tokenizer_model=tokenizer.model_proto,
    )
    if init_checkpoint is not None and cfg.moe.upcycle:
        from lightning_moe.models.upcycle import upcycle_

        upcycle_(module, init_checkpoint["state_dict"], source=f"init_from={cfg.init_from!r}")
        log.info("upcycled the MoE model from the dense checkpoint %s", cfg.init_from)
    elif init_checkpoint is not None:
        from lightning_moe.inference import load_model_weights

        load_model_weights(module, cfg.init_from, init_checkpoint)
        log.info("initialised the model from %s", cfg.init_from)
    return module


def run(cfg: TrainConfig, extra_callbacks: list | None = None) -> dict[str, float]:
    """Train (and test) as ``cfg`` says; returns the final logged metrics.

    ``extra_callbacks`` are added to the Trainer's (e.g. a benchmark's timers).
    """
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = MultitaskDataModule(cfg.data, cfg.tasks)
    init_checkpoint = None
    if cfg.init_from:
        # Fine-tuning keeps the tokenizer the checkpoint was trained with (its embeddings depend on it).
        from lightning_moe.data.tokenizer import SubwordTokenizer
        from lightning_moe.inference import read_checkpoint, tokenizer_bytes

        try:
            init_checkpoint = read_checkpoint(cfg.init_from)
            if init_checkpoint.get("tokenizer_model") is None:
                raise ValueError("it has no tokenizer: it was not written by lightning_moe.train")
            datamodule.tokenizer = SubwordTokenizer(tokenizer_bytes(init_checkpoint["tokenizer_model"]))
        except (OSError, ValueError) as err:
            raise InitFromError(f"init_from={cfg.init_from!r} cannot be used: {one_line(err)}") from err
    else:
        datamodule.prepare_data()  # cached and written atomically: safe on every rank
    datamodule.setup("fit")
    for split, report in datamodule.reports.items():
        if report.num_dropped:
            log.warning("%s: %s", split, report.summary())
    module = build_module(cfg, datamodule, init_checkpoint)
    # Resuming wins over init_from: an interrupted fine-tuning run continues from its own checkpoints.
    ckpt_path = resolve_resume(cfg.checkpoint.resume, checkpoint_dir(cfg))
    later = later_checkpoints(checkpoint_dir(cfg), ckpt_path)
    if later and cfg.checkpoint.resume != "auto":  # under `auto` they were skipped as damaged: safe to replace
        raise ConfigError(
            f"checkpoint.resume={cfg.checkpoint.resume} would abandon {len(later)} whole checkpoint(s) of this run"
            f" ({later[0]}, ...), which the new run's checkpoints replace: start a new run with another name="
            " (or move them away first)"
        )
    if ckpt_path:
        check_same_run(read_checkpoint_meta(ckpt_path).get(RUN_CONFIG_KEY), run_config(cfg), ckpt_path)
        log.info("resuming from %s", ckpt_path)
    trainer = build_trainer(cfg, extra_callbacks, resuming=ckpt_path is not None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Preempted as stop:
        if trainer.is_global_zero:
            print(f"{stop}", file=sys.stderr)
            if cfg.checkpoint.slurm_requeue:
                request_slurm_requeue()
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    final = checkpoint_dir(cfg) / f"step-{trainer.global_step:06d}.ckpt"
    if not final.exists():
        trainer.save_checkpoint(final, weights_only=False)  # collective under moe_zero: every rank calls it
        trainer.strategy.barrier("final-checkpoint")
        if trainer.is_global_zero:
            prune_checkpoints(final.parent, cfg.checkpoint.keep_last)
    if trainer.is_global_zero:  # the last validation, then (test_after_fit) test scores and sample translations
        print("".join(f"{key}: {metrics[key]:.4f}\n" for key in sorted(metrics) if key.startswith("val/")), end="")
    if cfg.test_after_fit and trainer.is_global_zero:
        metrics.update(_test(cfg, _averaged(cfg, final), datamodule))
    return metrics


def _averaged(cfg: TrainConfig, final: Path) -> Path:
    """The checkpoint the test scores: ``final``, or the mean of the newest ``checkpoint.average_last``."""
    from lightning_moe.checkpoint import average_checkpoints
    from lightning_moe.checkpoint.resume import complete_checkpoints

    wanted = cfg.checkpoint.average_last
    if wanted < 2:
        return final
    inputs = complete_checkpoints(final.parent)[:wanted]  # newest first: the final checkpoint leads
    if len(inputs) < 2:
        log.warning("checkpoint.average_last=%d: only %s exists, testing it alone", wanted, final.name)
        return final
    if len(inputs) < wanted:
        log.warning("checkpoint.average_last=%d: averaging the %d checkpoints there are", wanted, len(inputs))
    averaged = Path(cfg.output_dir) / f"average-last{wanted}.ckpt"
    average_checkpoints(inputs, averaged)
    log.info("testing the mean of %s", ", ".join(p.name for p in inputs))
    return averaged


def _test(cfg: TrainConfig, checkpoint: Path, datamodule: MultitaskDataModule) -> dict[str, float]:
    """BLEU/chrF of the final checkpoint on the test splits (one process, after training).

    Prints the scores with their sacreBLEU signatures and writes them to ``{output_dir}/test_scores.json``;
    a progress bar shows on stderr while decoding when it is a terminal and progress bars are on.
    """
    from lightning_moe.cli import is_terminal
    from lightning_moe.data.corpus import available_splits
    from lightning_moe.evaluate import (
        EvaluateConfig,
        EvaluateDataConfig,
        evaluate,
        format_examples,
        format_scores,
        write_scores,
    )

    root = datamodule.data_root
    splits = [split for split in cfg.data.test_splits if split in available_splits(root)]
    if len(splits) < len(cfg.data.test_splits):
        absent = sorted(set(cfg.data.test_splits) - set(splits))
        log.warning("test splits %s have no files in %s: not scored", absent, root)
    if not splits:
        return {}
    limit = cfg.generation.val_max_sentences
    try:
        rows = evaluate(
            EvaluateConfig(
                checkpoint=str(checkpoint),
                data=EvaluateDataConfig(root=str(root)),
                splits=splits,
                beam_size=cfg.generation.beam_size,
                length_penalty=cfg.generation.length_penalty,
                batch_size=cfg.generation.batch_size,
                max_sentences=None if limit < 0 else (limit or None),
            ),
            progress=cfg.trainer.enable_progress_bar and is_terminal(),
        )
    except ValueError as err:  # e.g. no translation task: the trained checkpoint stays, nothing to score
        log.warning("test after fit skipped: %s", err)
        return {}
    scores = Path(cfg.output_dir) / "test_scores.json"
    scores.parent.mkdir(parents=True, exist_ok=True)
    write_scores(rows, scores)
    log.info("test scores written to %s", scores)
    print(f"test scores of {checkpoint.name}:")
    print(format_scores(rows))
    print(format_examples(rows[0]))
    result = {}
    for r in rows:
        result[f"test/{r['split']}/{r['direction']}/bleu"] = r["bleu"]
        result[f"test/{r['split']}/{r['direction']}/chrf"] = r["chrf"]
    return result


@hydra.main(version_base=None, config_path="pkg://lightning_moe.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's job: validate the composed config, then :func:`run`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        typed = to_train_config(cfg)
        t = typed.trainer
        check_multirun(HydraConfig.get().mode == RunMode.MULTIRUN, t.devices, t.num_nodes, t.accelerator)
    except ConfigError as err:
        _exit(err)
    try:
        metrics = run(typed)
    except ConfigError as err:  # e.g. the run folder holds a checkpoint of another configuration
        _exit(err)
    except (DamagedCheckpointError, CheckpointWriteError, InitFromError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    return metrics.get("val/nll")


def _exit(err: ConfigError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """``python -m lightning_moe.train`` / ``lightning-moe-train``: Hydra's command line. An invalid
    configuration (an unknown group option included) ends the process with one line on stderr, exit code 2."""
    try:
        check_group_options(sys.argv[1:])
    except ConfigError as err:
        _exit(err)
    _hydra_main()


if __name__ == "__main__":
    main()
