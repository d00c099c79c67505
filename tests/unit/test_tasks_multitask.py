"""Temperature sampling of the task mixture: probabilities, epoch composition, reproducibility, config."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from lightning_moe.data.batching import SampleIndex, TokenBucketBatchSampler
from lightning_moe.data.examples import Example
from lightning_moe.tasks import MultitaskConfig, MultitaskDataset, TaskStream, allocate_counts, temperature_probs


class FakeStream(TaskStream):
    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def lengths(self) -> np.ndarray:
        return 2 + np.arange(self.size) % 7

    def example(self, index: int, epoch: int = 0) -> Example:
        return Example([index], [index], self.name)


SIZES = [1000, 100, 10]


def reference_probs(sizes, temperature) -> list[float]:
    """p_i = n_i^(1/T) / sum_j n_j^(1/T), written out plainly."""
    powered = [n ** (1.0 / temperature) for n in sizes]
    return [p / sum(powered) for p in powered]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0, 100.0])
def test_probs_match_formula(temperature: float) -> None:
    assert np.allclose(temperature_probs(SIZES, temperature), reference_probs(SIZES, temperature), rtol=1e-12)


def test_probs_limits_and_weights() -> None:
    assert np.allclose(temperature_probs(SIZES, 1.0), np.array(SIZES) / sum(SIZES))
    assert np.allclose(temperature_probs(SIZES, math.inf), [1 / 3] * 3)
    assert np.allclose(temperature_probs([5, 5], 1.0, weights=[1.0, 3.0]), [0.25, 0.75])
    assert np.allclose(temperature_probs([4, 0, 4], 2.0), [0.5, 0.0, 0.5])
    assert np.isfinite(temperature_probs([10**9, 1], 0.01)).all()
    for bad in ({"temperature": 0}, {"temperature": -1.0}):
        with pytest.raises(ValueError, match="temperature="):
            temperature_probs(SIZES, **bad)
    with pytest.raises(ValueError, match="weights="):
        temperature_probs(SIZES, 1.0, weights=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="all zero"):
        temperature_probs([0, 0], 1.0)


def test_allocate_counts_sums_and_rounds() -> None:
    counts = allocate_counts(10, np.array([0.34, 0.33, 0.33]))
    assert counts.tolist() == [4, 3, 3] and counts.sum() == 10
    probs = np.random.default_rng(0).dirichlet(np.ones(7))
    counts = allocate_counts(1001, probs)
    assert counts.sum() == 1001 and np.abs(counts - 1001 * probs).max() < 1


def epoch_labels(dataset: MultitaskDataset, epoch: int) -> Counter:
    """Labels of every example one pass of the batch sampler yields."""
    sampler = TokenBucketBatchSampler(dataset.lengths, 64, seed=0)
    sampler.set_epoch(epoch)
    return Counter(dataset[i].task for batch in sampler for i in batch)


@pytest.mark.parametrize("temperature", [1.0, 5.0, 1e6])
def test_epoch_proportions(temperature: float) -> None:
    streams = [FakeStream(f"s{i}", n) for i, n in enumerate(SIZES)]
    dataset = MultitaskDataset(streams, temperature=temperature, seed=1)
    assert len(dataset) == sum(SIZES)
    counts = epoch_labels(dataset, epoch=0)
    observed = np.array([counts[f"s{i}"] for i in range(3)]) / len(dataset)
    assert np.abs(observed - reference_probs(SIZES, temperature)).max() <= 1 / len(dataset)
    if temperature == 1.0:
        assert observed[0] > 0.89
    if temperature == 1e6:
        assert np.allclose(observed, 1 / 3, atol=1e-3)


def test_random_draws_match_probabilities_statistically() -> None:
    """Examples drawn at random positions of the mixture follow p_i (binomial 4-sigma band)."""
    streams = [FakeStream(f"s{i}", n) for i, n in enumerate(SIZES)]
    dataset = MultitaskDataset(streams, temperature=5.0, seed=2, epoch_size=5000)
    positions = np.random.default_rng(3).integers(0, len(dataset), size=2000)
    counts = Counter(dataset[SampleIndex(int(j), epoch=4)].task for j in positions)
    for i, p in enumerate(reference_probs(SIZES, 5.0)):
        sigma = math.sqrt(2000 * p * (1 - p))
        assert abs(counts[f"s{i}"] - 2000 * p) < 4 * sigma


def test_small_stream_cycles_through_all_examples() -> None:
    streams = [FakeStream("big", 1000), FakeStream("small", 10)]
    dataset = MultitaskDataset(streams, temperature=math.inf, seed=0, epoch_size=1000)  # 500 each: 50 passes
    stream_ids, local = dataset.plan(0)
    drawn = Counter(local[stream_ids == 1].tolist())
    assert sorted(drawn) == list(range(10)) and set(drawn.values()) == {50}
    big = local[stream_ids == 0]
    assert len(set(big.tolist())) == len(big)  # an undersampled stream never repeats within an epoch


def test_plan_reproducible_and_changes_with_epoch() -> None:
    make = lambda seed: MultitaskDataset([FakeStream("a", 50), FakeStream("b", 30)], 2.0, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    assert all(np.array_equal(x, y) for x, y in zip(a.plan(3), b.plan(3)))
    assert not np.array_equal(a.plan(3)[1], a.plan(4)[1])
    assert not np.array_equal(a.plan(3)[1], make(1).plan(3)[1])
    ex = a[SampleIndex(7, epoch=3, repeat=True)]
    assert ex.is_repeat and ex.task in {"a", "b"}
    with pytest.raises(IndexError):
        a[len(a)]


def test_dataset_validation() -> None:
    with pytest.raises(ValueError, match="streams is empty"):
        MultitaskDataset([])
    with pytest.raises(ValueError, match="repeat"):
        MultitaskDataset([FakeStream("a", 3), FakeStream("a", 4)])


def test_config_defaults_and_langs() -> None:
    config = MultitaskConfig()
    tasks = config.build_tasks()
    assert [t.name for t, _ in tasks] == ["translation", "translation", "denoising"]
    assert [w for _, w in tasks] == [1.0, 1.0, 0.5]
    assert config.langs() == ["en", "de", "fr"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tasks": []}, "tasks.tasks is empty"),
        ({"tasks": [{"src_lang": "en"}]}, r"tasks.tasks\[0\].*has no 'name'"),
        ({"tasks": [{"name": "parsing"}]}, r"tasks.tasks\[0\] \('parsing'\): task 'parsing' is not registered"),
        ({"tasks": [{"name": "translation", "beam": 5}]}, r"no options \['beam'\]"),
        ({"tasks": [{"name": "translation", "weight": 0}]}, r"tasks.tasks\[0\].weight=0"),
        (
            {"tasks": [{"name": "translation"}, {"name": "translation", "src_lang": "de", "tgt_lang": "en"}]},
            r"tasks.tasks\[1\] repeats the stream 'translate:de-en'",
        ),
        ({"temperature": 0.0}, "tasks.temperature=0.0"),
        ({"epoch_size": 0}, "tasks.epoch_size=0"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultitaskConfig(**kwargs)
