"""Typed configuration of a training run, apart from the model and the data (see ``schema.py``).

Every dataclass here is a Hydra structured config: the YAML groups under ``conf/`` are merged into
them in strict mode, so a misspelled key is an error, and ``__post_init__`` rejects bad values with
the key's name and a valid alternative before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_moe.config.precision import AUTO_PRECISION
from lightning_moe.strategy_presets import OFFLOAD_CHOICES, STRATEGY_PRESETS, SUPPORTED_PRECISIONS, ZERO_STAGES

__all__ = [
    "OptimConfig",
    "GenerationConfig",
    "StrategyConfig",
    "TrainerConfig",
    "CheckpointConfig",
    "STRATEGY_NAMES",
    "PRECISIONS",
]

STRATEGY_NAMES = ("auto", "single", "ddp", *STRATEGY_PRESETS)
PRECISIONS = SUPPORTED_PRECISIONS
SCHEDULES = ("inverse_sqrt", "cosine", "constant")
NONFINITE_POLICIES = ("skip", "stop_after", "stop")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not supported; use one of {list(choices)}")


def _at_least(key: str, value: Any, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid: use a number >= {minimum}")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate (reached after ``warmup_steps``)."""
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases, norms and embeddings' padding row)."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    schedule: str = "inverse_sqrt"
    """After warm-up: ``inverse_sqrt`` (Transformer), ``cosine`` (to ``min_lr_ratio`` at max_steps), ``constant``."""
    min_lr_ratio: float = 0.05
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""
    label_smoothing: float = 0.1
    """Label smoothing of the token cross entropy."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr!r} must be > 0 (e.g. 1e-3 for the tiny preset)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)!r} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
        _at_least("optim.weight_decay", self.weight_decay, 0)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"optim.label_smoothing={self.label_smoothing!r} must be in [0, 1), e.g. 0.1")


@dataclass
class GenerationConfig:
    """Decoding for validation BLEU/chrF, ``translate`` and ``evaluate``."""

    beam_size: int = 1
    """1 = greedy decoding; > 1 = beam search."""
    max_len_a: float = 1.5
    """Output length limit ``a * source_length + b``: the ``a``."""
    max_len_b: int = 10
    """... and the ``b``."""
    length_penalty: float = 1.0
    """Beam search length penalty exponent (GNMT style); 0 = none."""
    batch_size: int = 64
    """Sentences decoded together by ``translate``/``evaluate``."""
    val_max_sentences: int = 200
    """Sentences per direction decoded at each validation for BLEU/chrF (0 = loss only, -1 = all)."""

    def __post_init__(self) -> None:
        _at_least("generation.beam_size", self.beam_size, 1)
        _at_least("generation.max_len_a", self.max_len_a, 0)
        _at_least("generation.max_len_b", self.max_len_b, 1)
        _at_least("generation.batch_size", self.batch_size, 1)
        _at_least("generation.val_max_sentences", self.val_max_sentences, -1)


@dataclass
class StrategyConfig:
    """How training is parallelised (``Trainer(strategy=...)``)."""

    name: str = "auto"
    """``auto``/``single`` (one process), ``ddp`` (Lightning's), or ``moe_zero`` and its presets."""
    expert_parallel_size: Any = "auto"
    """``moe_zero`` only: experts split over this many ranks; ``"auto"`` = the largest that divides both
    the data-parallel size and the expert count."""
    zero_stage: int | None = None
    """``moe_zero`` only: 0-3; None = the preset's (2 for ``moe_zero``)."""
    offload: str | None = None
    """``moe_zero`` only: ``none``, ``optimizer`` (ZeRO-Offload), ``params``; None = the preset's."""
    tensor_parallel_size: int = 1
    """``moe_zero`` only: ranks splitting each dense layer (attention heads, FFN width); must divide
    ``trainer.devices x trainer.num_nodes`` and the model's heads and widths. 1 = no tensor parallelism."""
    activation_checkpointing: bool = False
    """``moe_zero`` only: recompute each block's activations in backward."""
    save_distributed_checkpoint: bool = True
    """``moe_zero`` only: a sharded DCP folder (True) or one full file from rank 0 (False)."""
    timeout_s: float = 600.0
    """``moe_zero`` and ``ddp``: seconds a collective waits for the other ranks before failing. A rank that dies
    is noticed at once; one that freezes after this long. Then every surviving rank stops with an error naming
    it (``moe_zero``). torch's own default is 1800."""

    def __post_init__(self) -> None:
        _choice("strategy.name", self.name, STRATEGY_NAMES)
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not 0 < self.timeout_s < float("inf")
        ):
            raise ValueError(f"strategy.timeout_s={self.timeout_s!r} must be a positive number of seconds, e.g. 600")
        if self.expert_parallel_size != "auto":
            if (
                isinstance(self.expert_parallel_size, bool)
                or not isinstance(self.expert_parallel_size, int)
                or self.expert_parallel_size < 1
            ):
                raise ValueError(
                    f"strategy.expert_parallel_size={self.expert_parallel_size!r} must be 'auto' or a positive integer"
                )
        if (
            isinstance(self.tensor_parallel_size, bool)
            or not isinstance(self.tensor_parallel_size, int)
            or self.tensor_parallel_size < 1
        ):
            raise ValueError(
                f"strategy.tensor_parallel_size={self.tensor_parallel_size!r} must be a positive integer "
                "(1 = no tensor parallelism)"
            )
        if self.zero_stage is not None:
            _choice("strategy.zero_stage", self.zero_stage, ZERO_STAGES)
        if self.offload is not None:
            _choice("strategy.offload", self.offload, OFFLOAD_CHOICES)
        moe_only = (
            self.zero_stage is not None
            or self.offload not in (None, "none")
            or self.activation_checkpointing
            or self.tensor_parallel_size != 1
        )
        if moe_only and not self.name.startswith("moe_zero"):
            raise ValueError(
                f"strategy.zero_stage / offload / activation_checkpointing / tensor_parallel_size need "
                f"strategy.name=moe_zero "
                f"(got strategy.name={self.name!r})"
            )

    @property
    def is_moe_zero(self) -> bool:
        return self.name.startswith("moe_zero")


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` that runs use."""

    accelerator: str = "auto"
    """``cpu``, ``gpu``/``cuda`` or ``auto``."""
    devices: Any = 1
    """Processes per node: an int, or ``auto``."""
    num_nodes: int = 1
    """Nodes (multi-node runs start through torchrun or SLURM)."""
    precision: str = AUTO_PRECISION
    """``auto`` (bf16-mixed on GPUs and on CPUs with bf16 matrix units, else 32-true:
    :func:`lightning_moe.config.precision.resolve_precision`) or one of ``SUPPORTED_PRECISIONS``: ``32-true``,
    ``bf16-mixed``, ``bf16-true``; ``16-mixed`` on GPUs."""
    max_steps: int = 600
    """Optimizer steps to train for."""
    val_check_interval: int = 200
    """Validate every this many training batches."""
    limit_val_batches: Any = 1.0
    """Fraction (float) or number (int) of validation batches per direction."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""
    gradient_clip_val: float | None = 1.0
    """Clip gradients to this norm (or value); None = no clipping."""
    gradient_clip_algorithm: str = "norm"
    """``norm`` or ``value``."""
    log_every_n_steps: int = 20
    """Logging period in optimizer steps."""
    enable_progress_bar: bool = True
    """Show Lightning's progress bar."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms`` (slower; exact reruns on CPU hold without it)."""
    nonfinite: str = "skip"
    """A step with a non-finite loss or gradient: ``skip`` it (warning), ``stop_after`` K of them, or ``stop``."""
    nonfinite_max: int = 10
    """K for ``nonfinite=stop_after``."""

    def __post_init__(self) -> None:
        _choice("trainer.precision", self.precision, (AUTO_PRECISION, *PRECISIONS))
        _choice("trainer.gradient_clip_algorithm", self.gradient_clip_algorithm, ("norm", "value"))
        _choice("trainer.nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _at_least("trainer.max_steps", self.max_steps, 1)
        _at_least("trainer.val_check_interval", self.val_check_interval, 1)
        _at_least("trainer.accumulate_grad_batches", self.accumulate_grad_batches, 1)
        _at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1)
        _at_least("trainer.num_nodes", self.num_nodes, 1)
        _at_least("trainer.nonfinite_max", self.nonfinite_max, 1)
        if self.gradient_clip_val is not None:
            _at_least("trainer.gradient_clip_val", self.gradient_clip_val, 0)
        if self.devices != "auto" and (
            isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1
        ):
            raise ValueError(f"trainer.devices={self.devices!r} must be a positive integer or 'auto'")


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written, and what a (re)started run resumes from."""

    dirpath: str | None = None
    """Checkpoint folder; None = ``<output_dir>/checkpoints``."""
    every_n_train_steps: int = 200
    """Write a checkpoint every this many optimizer steps (and at the end)."""
    keep_last: int = 3
    """Keep the newest N complete checkpoints; older ones are deleted."""
    average_last: int = 1
    """The test after training scores the mean of the weights of the newest N checkpoints
    (``python -m lightning_moe.checkpoint average``), written to ``<output_dir>/average-last<N>.ckpt``;
    1 = the final checkpoint alone. At most ``keep_last``."""
    resume: str = "auto"
    """``auto``: resume from the newest checkpoint in ``dirpath`` that is whole (a damaged newer one is
    reported and skipped); ``never``; or a path. The run's configuration must match the checkpoint's except
    the keys of ``lightning_moe.config.resume.MAY_CHANGE_ON_RESUME``."""
    preempt_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that stop training after the current step, with a checkpoint at that step on every rank, and
    exit with code 75 (re-run the same command to continue). ``[]``: leave signals to Lightning/Python."""
    slurm_requeue: bool = False
    """When preempted inside a SLURM job, rank 0 also runs ``scontrol requeue $SLURM_JOB_ID``."""

    def __post_init__(self) -> None:
        from lightning_moe.preemption import parse_signal

        _at_least("checkpoint.every_n_train_steps", self.every_n_train_steps, 1)
        _at_least("checkpoint.keep_last", self.keep_last, 1)
        _at_least("checkpoint.average_last", self.average_last, 1)
        if self.average_last > self.keep_last:
            raise ValueError(
                f"checkpoint.average_last={self.average_last} exceeds checkpoint.keep_last={self.keep_last}: only"
                f" {self.keep_last} checkpoints are kept (use average_last<={self.keep_last} or raise keep_last)"
            )
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError("checkpoint.resume must be 'auto', 'never' or a checkpoint path")
        for sig in self.preempt_signals:
            try:
                parse_signal(sig)
            except ValueError as err:
                raise ValueError(f"checkpoint.preempt_signals: {err}") from None
