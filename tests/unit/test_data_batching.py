"""Token-bucket batch sampler invariants and the collate function."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_moe.data.batching import Collator, SampleIndex, TokenBucketBatchSampler, pad_sequences
from lightning_moe.data.examples import Example


def random_lengths(n: int = 500, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 60, size=n)


def flat(batches) -> list[int]:
    return [int(i) for b in batches for i in b]


@pytest.mark.parametrize("max_tokens", [60, 200, 1000])
@pytest.mark.parametrize("shuffle", [False, True])
def test_budget_and_every_index_once(max_tokens: int, shuffle: bool) -> None:
    lengths = random_lengths()
    sampler = TokenBucketBatchSampler(lengths, max_tokens, shuffle=shuffle, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= max_tokens
    assert sorted(flat(batches)) == list(range(len(lengths)))
    # packing is greedy over sorted lengths: two neighbouring batches could not have been merged
    if not shuffle:
        for a, b in zip(batches, batches[1:]):
            merged = len(a) + 1
            assert merged * max(lengths[i] for i in [*a, b[0]]) > max_tokens


def test_batches_are_length_homogeneous() -> None:
    lengths = random_lengths(2000)
    batches = list(TokenBucketBatchSampler(lengths, 400, shuffle=True, seed=1))
    spread = [max(lengths[b]) - min(lengths[b]) for b in [np.array(b, dtype=int) for b in batches]]
    assert np.mean(spread) <= 2  # sorted packing: padding waste is tiny


def test_max_sentences_caps_batch_size() -> None:
    batches = list(TokenBucketBatchSampler([1] * 100, 1000, shuffle=False, max_sentences=8))
    assert max(len(b) for b in batches) == 8 and len(batches) == 13


def test_deterministic_and_set_epoch_changes_order() -> None:
    lengths = random_lengths()
    a = TokenBucketBatchSampler(lengths, 300, seed=5)
    b = TokenBucketBatchSampler(lengths, 300, seed=5)
    assert [list(map(int, x)) for x in a] == [list(map(int, x)) for x in b]
    first = [list(map(int, x)) for x in a]
    a.set_epoch(1)
    second = [list(map(int, x)) for x in a]
    assert first != second and sorted(flat(first)) == sorted(flat(second))
    a.set_epoch(0)
    assert [list(map(int, x)) for x in a] == first
    c = TokenBucketBatchSampler(lengths, 300, seed=6)
    assert [list(map(int, x)) for x in c] != first


def test_indices_carry_epoch() -> None:
    sampler = TokenBucketBatchSampler([3, 4, 5], 100)
    sampler.set_epoch(7)
    index = next(iter(sampler))[0]
    assert isinstance(index, int) and index.epoch == 7 and index.repeat is False
    copy = pickle.loads(pickle.dumps(index))  # DataLoader workers receive pickled indices
    assert copy == index and copy.epoch == 7 and isinstance(copy, SampleIndex)


@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_equal_batch_counts_across_ranks(replicas: int, drop_last: bool) -> None:
    lengths = random_lengths(333, seed=2)
    total = len(TokenBucketBatchSampler(lengths, 250, seed=9))
    per_rank = [
        list(TokenBucketBatchSampler(lengths, 250, seed=9, num_replicas=replicas, rank=r, drop_last=drop_last))
        for r in range(replicas)
    ]
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1, counts
    count = counts.pop()
    assert count == (total // replicas if drop_last else -(-total // replicas))
    seen = Counter(flat(b for batches in per_rank for b in batches if not b[0].repeat))
    if drop_last:  # no repeats, nothing twice; only the batches of the incomplete last round are missing
        assert not any(b[0].repeat for batches in per_rank for b in batches)
        assert set(seen.values()) == {1}
        assert (len(seen) == len(lengths)) == (total % replicas == 0)
    else:  # every index once among the real batches; repeats are flagged
        assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}
        repeats = sum(1 for batches in per_rank for b in batches if b[0].repeat)
        assert repeats == count * replicas - total


def test_more_ranks_than_batches_still_equal() -> None:
    per_rank = [list(TokenBucketBatchSampler([5, 5], 100, num_replicas=4, rank=r)) for r in range(4)]
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]
    assert [b[0][0].repeat for b in per_rank] == [False, True, True, True]


def test_lengths_as_function_of_epoch() -> None:
    table = {0: [1, 2, 3, 4], 1: [50, 50, 50, 50]}
    sampler = TokenBucketBatchSampler(lambda e: table[e], 100, shuffle=False)
    assert len(sampler) == 1
    sampler.set_epoch(1)
    assert len(sampler) == 2


def test_lightning_set_epoch_reaches_batch_sampler() -> None:
    from lightning.fabric.utilities.data import _set_sampler_epoch  # what Lightning's loops call each epoch

    sampler = TokenBucketBatchSampler([1, 2, 3], 10)
    loader = DataLoader(list(range(3)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 4)
    assert sampler.epoch == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"num_replicas": 0}, "num_replicas=0"),
        ({"num_replicas": 2, "rank": 2}, r"rank=2 is invalid.*\[0, num_replicas=2\)"),
        ({"seed": -1}, "seed=-1"),
        ({"max_sentences": 0}, "max_sentences=0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"lengths": [1, 2], "max_tokens": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        TokenBucketBatchSampler(**args)


def test_example_over_budget_and_zero_length_rejected() -> None:
    with pytest.raises(ValueError, match=r"example 1 has length 11 > max_tokens=10"):
        TokenBucketBatchSampler([3, 11, 2], 10)
    with pytest.raises(ValueError, match=r"lengths\[0\]=0"):
        TokenBucketBatchSampler([0, 1], 10)


def test_pad_sequences() -> None:
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0, prefix=2, suffix=3)
    assert ids.tolist() == [[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]]
    assert mask.tolist() == [[False] * 5, [False, False, False, True, True]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool


def test_collator_builds_shifted_targets_and_masks() -> None:
    examples = [
        Example([5, 10, 11, 3], [20, 21, 22], "translate:en-de", "src a", "ref a"),
        Example([6, 12, 3], [23], "translate:de-en", "src b", "ref b"),
    ]
    batch = Collator(pad_id=0, bos_id=2, eos_id=3)(examples)
    assert batch["src"].tolist() == [[5, 10, 11, 3], [6, 12, 3, 0]]
    assert batch["src_padding_mask"].tolist() == [[False] * 4, [False, False, False, True]]
    assert batch["tgt_in"].tolist() == [[2, 20, 21, 22], [2, 23, 0, 0]]
    assert batch["tgt_out"].tolist() == [[20, 21, 22, 3], [23, 3, 0, 0]]
    assert batch["tgt_padding_mask"].tolist() == [[False] * 4, [False, False, True, True]]
    # the mask marks exactly the pad positions of tgt_out
    assert torch.equal(batch["tgt_padding_mask"], batch["tgt_out"] == 0)
    assert batch["task"] == ["translate:en-de", "translate:de-en"]
    assert batch["src_text"] == ["src a", "src b"] and batch["ref_text"] == ["ref a", "ref b"]
    assert batch["is_repeat"] is False
    train = Collator()([Example([5, 3], [7], "denoise:en", is_repeat=True)])
    assert "ref_text" not in train and train["is_repeat"] is True


class _Lookup(Dataset):
    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> Example:
        n = int(self.lengths[index])
        return Example([int(index)] * n, [1] * (n - 1), f"epoch{getattr(index, 'epoch', -1)}")


def test_dataloader_with_worker_gets_epoch_and_budget() -> None:
    lengths = random_lengths(120, seed=4)
    sampler = TokenBucketBatchSampler(lengths, 200, seed=1)
    sampler.set_epoch(3)
    loader = DataLoader(_Lookup(lengths), batch_sampler=sampler, collate_fn=Collator(), num_workers=1)
    sizes = []
    for batch in loader:
        assert batch["src"].numel() <= 200 and batch["tgt_in"].numel() <= 200
        assert set(batch["task"]) == {"epoch3"}
        sizes.append(batch["src"].shape[0])
    assert sum(sizes) == 120
