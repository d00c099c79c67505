"""What a task is: a factory of example streams, one per (task, direction).

A :class:`Task` is built from its config dataclass and turns a tokenized corpus into one or more
:class:`TaskStream` objects, e.g. translation en<->de gives the streams ``"translate:en-de"`` and
``"translate:de-en"``. A stream is a deterministic, indexable source of :class:`~lightning_moe.data.Example`:
``stream.example(index, epoch)`` depends on nothing else, so any process (a DataLoader worker, another
rank) rebuilds the same example. The multitask mixture samples over streams.

Writing a new task: subclass :class:`Task`, give it a ``config_class`` dataclass (a docstring per field,
validation in ``__post_init__``), decorate it with ``@register_task("name")`` in its own module
``tasks/<name>.py``; ``build_task("<name>", ...)`` imports that module on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from torch.utils.data import Dataset

from lightning_moe.data.examples import Example, TokenizedCorpus
from lightning_moe.data.tokenizer import SubwordTokenizer

__all__ = ["Task", "TaskStream", "StreamDataset"]


class TaskStream(ABC):
    """An indexable, deterministic source of examples of one (task, direction).

    Attributes:
        name: the label put on every example, ``"<task>:<direction>"`` (``"translate:en-de"``).
    """

    name: str

    @abstractmethod
    def __len__(self) -> int:
        """Number of distinct examples (source rows)."""

    @abstractmethod
    def lengths(self) -> np.ndarray:
        """``[len(self)]`` an upper bound of each example's padded length: ``max(len(source), len(target) + 1)``,
        the length the batch sampler budgets for (the ``+ 1`` is BOS/EOS on the decoder side)."""

    @abstractmethod
    def example(self, index: int, epoch: int = 0) -> Example:
        """Example ``index`` as drawn in ``epoch`` (noise may differ between epochs, reproducibly)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} examples)"


class Task(ABC):
    """A training task, built from its config; registered by name with ``@register_task``.

    Class attributes:
        config_class: the dataclass of the task's options.
        name: the registered name (set by ``register_task``).
    """

    config_class: ClassVar[type]
    name: ClassVar[str] = ""

    def __init__(self, config: Any) -> None:
        if not isinstance(config, self.config_class):
            raise ValueError(
                f"config is a {type(config).__name__}: {type(self).__name__} needs a {self.config_class.__name__}"
            )
        self.config = config

    @abstractmethod
    def langs(self) -> tuple[str, ...]:
        """Languages the task reads; the corpus must have all of them."""

    @abstractmethod
    def stream_names(self) -> list[str]:
        """Labels of the streams :meth:`streams` returns, in the same order."""

    @abstractmethod
    def streams(self, corpus: TokenizedCorpus, tokenizer: SubwordTokenizer, seed: int = 0) -> list[TaskStream]:
        """Training streams over ``corpus``; ``seed`` seeds any noise."""

    def eval_streams(self, corpus: TokenizedCorpus, tokenizer: SubwordTokenizer) -> list[TaskStream]:
        """Streams to evaluate on (examples carry ``src_text`` / ``ref_text``); none by default."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class StreamDataset(Dataset):
    """A map-style dataset over one stream (evaluation): ``dataset[i]`` is ``stream.example(i, epoch)``.

    The epoch and the repeat flag are read from a :class:`~lightning_moe.data.batching.SampleIndex`
    (plain ints mean epoch 0, not a repeat).
    """

    def __init__(self, stream: TaskStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def lengths(self) -> np.ndarray:
        """``[N]`` padded length bound of each example."""
        return self.stream.lengths()

    def __getitem__(self, index: int) -> Example:
        example = self.stream.example(int(index), getattr(index, "epoch", 0))
        if getattr(index, "repeat", False):
            example = replace(example, is_repeat=True)
        return example
