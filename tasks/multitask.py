"""A mixture of task streams, sampled with a temperature.

Stream ``i`` with ``n_i`` examples gets probability ``p_i ∝ w_i * n_i ** (1 / T)``: ``T = 1`` samples in
proportion to the data, a larger ``T`` flattens the mixture towards uniform (``T = inf``: uniform), and the
optional per-task weight ``w_i`` (default 1) tilts it by hand.

An epoch of :class:`MultitaskDataset` has ``epoch_size`` examples (default: all examples of all streams). The
count of each stream is ``epoch_size * p_i`` rounded by largest remainder (stratified: the mixture proportions
hold exactly in every epoch, not only on average), and the examples of a stream are drawn without repeats
(full passes over the stream, then a random subset) by a generator seeded with ``(seed, epoch, stream)``.
Which example sits at index ``j`` in epoch ``e`` is therefore a pure function of ``(seed, e, j)``; the dataset
reads ``e`` from the :class:`~lightning_moe.data.batching.SampleIndex` the batch sampler yields.

Config, e.g. in YAML::

    tasks:
      temperature: 5.0
      tasks:
        - {name: translation, src_lang: en, tgt_lang: de}
        - {name: denoising, langs: [en, de], weight: 0.5}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lightning_moe.data.examples import Example, TokenizedCorpus
from lightning_moe.data.tokenizer import SubwordTokenizer
from lightning_moe.tasks.base import Task, TaskStream
from lightning_moe.tasks.registry import build_task

__all__ = ["MultitaskConfig", "MultitaskDataset", "temperature_probs", "allocate_counts", "default_mixture"]


def default_mixture() -> list[dict[str, Any]]:
    """en<->de and en<->fr translation plus en/de/fr denoising at half weight."""
    return [
        {"name": "translation", "src_lang": "en", "tgt_lang": "de"},
        {"name": "translation", "src_lang": "en", "tgt_lang": "fr"},
        {"name": "denoising", "langs": ["en", "de", "fr"], "weight": 0.5},
    ]


@dataclass
class MultitaskConfig:
    """The task mixture."""

    tasks: list[dict[str, Any]] = field(default_factory=default_mixture)
    """Tasks of the mixture: each a mapping with ``name`` (a registered task), an optional ``weight`` (> 0,
    default 1, multiplies the sampling probability of every stream of the task) and the task's options."""
    temperature: float = 5.0
    """Sampling temperature T > 0: p_i ∝ weight_i * n_i^(1/T); 1 = proportional to size, ``inf`` = uniform."""
    epoch_size: int | None = None
    """Examples per epoch; None = the total of all streams."""

    def __post_init__(self) -> None:
        if isinstance(self.tasks, (str, dict)) or not self.tasks:
            raise ValueError("tasks.tasks is empty or not a list: give a list of {name: ..., <options>} entries")
        self.tasks = [dict(entry) for entry in self.tasks]
        labels: dict[str, int] = {}
        for i, entry in enumerate(self.tasks):
            if "name" not in entry:
                raise ValueError(f"tasks.tasks[{i}]={entry!r} has no 'name': add the task's registered name")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                raise ValueError(f"tasks.tasks[{i}].weight={weight!r} is invalid: use a number > 0")
            try:
                task = self._build(entry)
            except (ValueError, TypeError) as err:
                raise ValueError(f"tasks.tasks[{i}] ({entry.get('name')!r}): {err}") from err
            for label in task.stream_names():
                if label in labels:
                    raise ValueError(
                        f"tasks.tasks[{i}] repeats the stream {label!r} of tasks.tasks[{labels[label]}]: "
                        f"list every direction once"
                    )
                labels[label] = i
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not (self.temperature > 0)
        ):
            raise ValueError(f"tasks.temperature={self.temperature!r} is invalid: use a number > 0 (or inf)")
        if self.epoch_size is not None and (
            isinstance(self.epoch_size, bool) or not isinstance(self.epoch_size, int) or self.epoch_size < 1
        ):
            raise ValueError(f"tasks.epoch_size={self.epoch_size!r} is invalid: use a positive integer or null")

    @staticmethod
    def _build(entry: dict[str, Any]) -> Task:
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        return build_task(entry["name"], **options)

    def build_tasks(self) -> list[tuple[Task, float]]:
        """The tasks of the mixture with their weights."""
        return [(self._build(entry), float(entry.get("weight", 1.0))) for entry in self.tasks]

    def langs(self) -> list[str]:
        """Every language some task reads, in first-use order."""
        seen: dict[str, None] = {}
        for task, _ in self.build_tasks():
            seen.update(dict.fromkeys(task.langs()))
        return list(seen)


def temperature_probs(sizes: Sequence[int], temperature: float, weights: Sequence[float] | None = None) -> np.ndarray:
    """``[len(sizes)]`` sampling probabilities ``p_i ∝ w_i * n_i ** (1 / T)`` (empty streams get 0)."""
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if sizes_arr.ndim != 1 or sizes_arr.size == 0 or (sizes_arr < 0).any():
        raise ValueError(f"sizes={list(sizes)} is invalid: give one non-negative size per stream")
    if not sizes_arr.sum() > 0:
        raise ValueError(f"sizes={list(sizes)} are all zero: no stream has examples")
    if isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: use a number > 0 (or inf)")
    w = np.ones_like(sizes_arr) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != sizes_arr.shape or not (w > 0).all() or not np.isfinite(w).all():
        raise ValueError(f"weights={weights!r} is invalid: give one finite weight > 0 per stream")
    present = sizes_arr > 0
    # n^(1/T) computed as exp(log(n) / T), relative to the largest stream to stay finite for small T
    logits = np.full_like(sizes_arr, -np.inf)
    logits[present] = (np.log(sizes_arr[present]) - np.log(sizes_arr.max())) / temperature + np.log(w[present])
    probs = np.exp(logits - logits[present].max())
    return probs / probs.sum()


def allocate_counts(total: int, probs: np.ndarray) -> np.ndarray:
    """``[S]`` integer counts summing to ``total``, closest to ``total * probs`` (largest remainder)."""
    exact = total * np.asarray(probs, dtype=np.float64)
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(exact - counts), kind="stable")  # largest remainders first, ties to lower index
        counts[order[:short]] += 1
    return counts


class MultitaskDataset(Dataset):
    """Map-style dataset over a temperature-sampled mixture of streams; its examples carry their stream label.

    Arguments:
        streams: the streams (labels must be distinct).
        temperature: the sampling temperature (see :func:`temperature_probs`).
        seed: base seed of the per-epoch draws (same on every rank).
        epoch_size: examples per epoch (None = the total size of the streams).
        weights: one weight per stream (None = all 1).
    """

    def __init__(
        self,
        streams: Sequence[TaskStream],
        temperature: float = 1.0,
        seed: int = 0,
        epoch_size: int | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        if not streams:
            raise ValueError("streams is empty: the mixture needs at least one stream")
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise ValueError(f"stream labels {names} repeat: every stream needs its own label")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid: use an integer >= 0")
        self.streams = list(streams)
        self.sizes = np.array([len(s) for s in streams], dtype=np.int64)
        self.probs = temperature_probs(self.sizes, temperature, weights)
        self.epoch_size = int(self.sizes.sum()) if epoch_size is None else int(epoch_size)
        if self.epoch_size < 1:
            raise ValueError(f"epoch_size={epoch_size!r} is invalid: use a positive integer")
        self.counts = allocate_counts(self.epoch_size, self.probs)
        self.seed = seed
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._stream_lengths = [s.lengths() for s in self.streams]

    @property
    def names(self) -> list[str]:
        """Stream labels, in stream order."""
        return [s.name for s in self.streams]

    def __len__(self) -> int:
        return self.epoch_size

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``([N] stream id, [N] index in the stream)`` of every example of ``epoch``, grouped by stream."""
        cached = self._plans.get(epoch)
        if cached is not None:
            return cached
        stream_ids, local = [], []
        for s, (count, size) in enumerate(zip(self.counts.tolist(), self.sizes.tolist())):
            if count == 0:
                continue
            rng = np.random.default_rng([self.seed, epoch, s])
            passes, rest = divmod(count, size)
            picks = [rng.permutation(size) for _ in range(passes)]
            picks.append(rng.permutation(size)[:rest])
            local.append(np.concatenate(picks))
            stream_ids.append(np.full(count, s, dtype=np.int64))
        plan = (np.concatenate(stream_ids), np.concatenate(local).astype(np.int64))
        if len(self._plans) >= 2:  # keep the current and the previous epoch
            self._plans.pop(min(self._plans))
        self._plans[epoch] = plan
        return plan

    def lengths(self, epoch: int = 0) -> np.ndarray:
        """``[N]`` padded length bound of every example of ``epoch`` (for the batch sampler)."""
        stream_ids, local = self.plan(epoch)
        out = np.empty(stream_ids.size, dtype=np.int64)
        for s, lengths in enumerate(self._stream_lengths):
            rows = stream_ids == s
            out[rows] = lengths[local[rows]]
        return out

    def __getitem__(self, index: int) -> Example:
        epoch = getattr(index, "epoch", 0)
        stream_ids, local = self.plan(epoch)
        i = int(index)
        if not 0 <= i < self.epoch_size:
            raise IndexError(f"index {i} is out of range for a mixture of {self.epoch_size} examples")
        example = self.streams[int(stream_ids[i])].example(int(local[i]), epoch)
        if getattr(index, "repeat", False):
            example = replace(example, is_repeat=True)
        return example

    @classmethod
    def from_config(
        cls, config: MultitaskConfig, corpus: TokenizedCorpus, tokenizer: SubwordTokenizer, seed: int = 0
    ) -> MultitaskDataset:
        """Build every task of ``config`` over ``corpus`` and mix their streams."""
        streams: list[TaskStream] = []
        weights: list[float] = []
        for task, weight in config.build_tasks():
            for lang in task.langs():
                corpus.check_lang(lang, f"language of task {task.name!r}")
            task_streams = task.streams(corpus, tokenizer, seed)
            streams.extend(task_streams)
            weights.extend([weight] * len(task_streams))
        return cls(streams, config.temperature, seed, config.epoch_size, weights)
