"""Training tasks and their registry (importable as ``lightning_moe.tasks``).

Built-in tasks: ``translation`` (:mod:`.translation`) and ``denoising`` (:mod:`.denoising`); the mixture of
their streams is :mod:`.multitask`. A new task is one module ``tasks/<name>.py`` with a
``@register_task("<name>")`` class (see :mod:`.base`).
"""

from lightning_moe.tasks.base import StreamDataset, Task, TaskStream
from lightning_moe.tasks.denoising import (
    DenoisingStream,
    DenoisingTask,
    DenoisingTaskConfig,
    NoiseResult,
    add_noise,
    denoising_label,
    split_units,
)
from lightning_moe.tasks.multitask import (
    MultitaskConfig,
    MultitaskDataset,
    allocate_counts,
    default_mixture,
    temperature_probs,
)
from lightning_moe.tasks.registry import available_tasks, build_task, build_task_config, get_task_class, register_task
from lightning_moe.tasks.translation import TranslationStream, TranslationTask, TranslationTaskConfig, translation_label

__all__ = [
    "Task",
    "TaskStream",
    "StreamDataset",
    "register_task",
    "build_task",
    "build_task_config",
    "get_task_class",
    "available_tasks",
    "TranslationTask",
    "TranslationTaskConfig",
    "TranslationStream",
    "translation_label",
    "DenoisingTask",
    "DenoisingTaskConfig",
    "DenoisingStream",
    "NoiseResult",
    "add_noise",
    "denoising_label",
    "split_units",
    "MultitaskConfig",
    "MultitaskDataset",
    "temperature_probs",
    "allocate_counts",
    "default_mixture",
]
