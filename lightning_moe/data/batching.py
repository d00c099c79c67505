"""Length-bucketed batches under a token budget, sharded evenly over data-parallel ranks, and their collate.

:class:`TokenBucketBatchSampler` sorts the examples by length, packs neighbours into batches so that
``max(length) * batch_size <= max_tokens`` (padding included), shuffles the *order* of the batches with
``seed + epoch`` and deals them out to ranks. Every rank gets the same number of batches, so no rank waits
forever in a collective: when the count does not divide, batches from the start of the list are repeated,
and their indices carry ``repeat=True`` (see :class:`SampleIndex`) so evaluation can leave them out of its
metrics. Everything is deterministic: ranks that build the sampler with the same arguments agree.

The sampler yields :class:`SampleIndex` values, ints that also carry the epoch, so a dataset whose examples
depend on the epoch (the multitask mixture, seeded noise) reads it from the index: no dataset state has to be
kept in sync with the sampler, also in DataLoader worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_moe.data.examples import Example
from lightning_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = ["SampleIndex", "TokenBucketBatchSampler", "Collator", "pad_sequences"]

Lengths = Sequence[int] | np.ndarray | Callable[[int], Sequence[int] | np.ndarray]


class SampleIndex(int):
    """A dataset index (an ``int``) that also carries the epoch it was drawn for and a repeat flag.

    Attributes:
        epoch: the sampler's epoch when the index was drawn.
        repeat: True when the index belongs to a batch repeated only to even out the ranks' batch counts.
    """

    epoch: int
    repeat: bool

    def __new__(cls, value: int, epoch: int = 0, repeat: bool = False) -> SampleIndex:
        obj = super().__new__(cls, value)
        obj.epoch = epoch
        obj.repeat = repeat
        return obj

    def __reduce__(self) -> tuple:
        return (SampleIndex, (int(self), self.epoch, self.repeat))

    def __repr__(self) -> str:
        return f"SampleIndex({int(self)}, epoch={self.epoch}, repeat={self.repeat})"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: use an integer >= {minimum}")
    return int(value)


class TokenBucketBatchSampler:
    """Batches of dataset indices under a token budget, the same number on every rank.

    Arguments:
        lengths: the padded length of each example (for a pair: the longer of source and target as the
            model sees them), or a function ``epoch -> lengths`` when the dataset changes with the epoch.
        max_tokens: token budget of a batch: ``max(length) * batch_size <= max_tokens``.
        shuffle: shuffle which equal-length examples share a batch and the order of the batches (never the
            order inside a batch), with ``seed + epoch``. False: batches in order of increasing length.
        seed: base seed of the shuffle (same on every rank).
        num_replicas: data-parallel ranks the batches are dealt to.
        rank: this rank, in ``[0, num_replicas)``.
        drop_last: drop the batches that do not fill a round across ranks, instead of repeating batches.
        max_sentences: optional cap on the examples of a batch (None = only the token budget).

    Raises:
        ValueError: an invalid argument, or an example longer than ``max_tokens`` (it could never fit).
    """

    def __init__(
        self,
        lengths: Lengths,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        max_sentences: int | None = None,
    ) -> None:
        self.max_tokens = _check_int("max_tokens", max_tokens, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank={rank} is invalid: use an integer in [0, num_replicas={num_replicas})")
        self.max_sentences = None if max_sentences is None else _check_int("max_sentences", max_sentences, 1)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self._lengths = lengths
        self.epoch = 0
        self._cache: tuple[int, list[np.ndarray], list[bool]] | None = None
        self._plan(0)  # validate the lengths now, not in the first training step

    @property
    def sampler(self) -> TokenBucketBatchSampler:
        """This sampler. Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, so this makes
        it reach :meth:`set_epoch` at the start of every epoch."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle (and, for a function of the epoch, the lengths) of ``epoch``."""
        self.epoch = _check_int("epoch", epoch, 0)

    def lengths_for(self, epoch: int) -> np.ndarray:
        """``[N]`` example lengths of ``epoch``."""
        raw = self._lengths(epoch) if callable(self._lengths) else self._lengths
        return np.asarray(raw, dtype=np.int64).reshape(-1)

    def batches_for(self, epoch: int) -> list[np.ndarray]:
        """All batches of ``epoch`` before sharding, in iteration order (arrays of indices)."""
        lengths = self.lengths_for(epoch)
        if lengths.size and lengths.min() < 1:
            bad = int(np.argmin(lengths))
            raise ValueError(f"lengths[{bad}]={int(lengths[bad])} is invalid: every example needs a length >= 1")
        if lengths.size and lengths.max() > self.max_tokens:
            bad = int(np.argmax(lengths))
            raise ValueError(
                f"example {bad} has length {int(lengths[bad])} > max_tokens={self.max_tokens}: raise max_tokens "
                f"or lower the length limit (data max_len) so every example fits in a batch"
            )
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle:  # random order among equal lengths, then a stable sort by length
            order = rng.permutation(lengths.size)
            order = order[np.argsort(lengths[order], kind="stable")]
        else:
            order = np.argsort(lengths, kind="stable")
        sorted_lengths = lengths[order].tolist()
        cap = self.max_sentences or lengths.size
        batches: list[np.ndarray] = []
        start = 0
        for i, length in enumerate(sorted_lengths):
            size = i - start + 1  # lengths increase, so the newest example is the longest of its batch
            if size * length > self.max_tokens or size > cap:
                batches.append(order[start:i])
                start = i
        if start < lengths.size:
            batches.append(order[start:])
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def _plan(self, epoch: int) -> tuple[list[np.ndarray], list[bool]]:
        """This rank's batches of ``epoch`` and, for each, whether it is a repeat."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        batches = self.batches_for(epoch)
        total, replicas = len(batches), self.num_replicas
        if self.drop_last:
            per_rank = total // replicas
            padded = batches[: per_rank * replicas]
            repeat = [False] * len(padded)
        else:
            per_rank = math.ceil(total / replicas)
            extra = per_rank * replicas - total
            padded = batches + [batches[j % total] for j in range(extra)]
            repeat = [False] * total + [True] * extra
        mine = padded[self.rank :: replicas]
        mine_repeat = repeat[self.rank :: replicas]
        self._cache = (epoch, mine, mine_repeat)
        return mine, mine_repeat

    def resume_at(self, epoch: int, start_batch: int) -> None:
        """Make the next iteration over ``epoch`` skip its first ``start_batch`` batches (mid-epoch resume)."""
        self._resume = (_check_int("epoch", epoch, 0), _check_int("start_batch", start_batch, 0))

    def __iter__(self) -> Iterator[list[SampleIndex]]:
        epoch = self.epoch
        batches, repeats = self._plan(epoch)
        start = 0
        resume = getattr(self, "_resume", None)
        if resume is not None and resume[0] == epoch:
            start = resume[1]
        self._resume = None
        for batch, repeat in zip(batches[start:], repeats[start:]):
            yield [SampleIndex(int(i), epoch, repeat) for i in batch]

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (the same on every rank)."""
        return len(self._plan(self.epoch)[0])


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_id: int = PAD_ID,
    prefix: int | None = None,
    suffix: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences (optionally adding a first and/or last token) to the longest one.

    Returns:
        ``ids`` ``[B, L]`` long and ``padding_mask`` ``[B, L]`` bool, True at padding.
    """
    extra = (prefix is not None) + (suffix is not None)
    lengths = [len(s) + extra for s in sequences]
    width = max(lengths, default=0)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)  # [B, L]
    for row, seq in enumerate(sequences):
        start = 0
        if prefix is not None:
            ids[row, 0] = prefix
            start = 1
        ids[row, start : start + len(seq)] = seq
        if suffix is not None:
            ids[row, start + len(seq)] = suffix
    mask = np.arange(width)[None, :] >= np.asarray(lengths, dtype=np.int64)[:, None]  # [B, L]
    return torch.from_numpy(ids), torch.from_numpy(mask)


@dataclass(frozen=True)
class Collator:
    """Turns a list of :class:`Example` into the batch dict the model and the LightningModule read.

    Batch keys:
        ``src`` ``[B, S]`` long, ``src_padding_mask`` ``[B, S]`` bool (True = pad),
        ``tgt_in`` ``[B, T]`` long (``<s>`` + target), ``tgt_out`` ``[B, T]`` long (target + ``</s>``),
        ``tgt_padding_mask`` ``[B, T]`` bool (True = pad, the same for ``tgt_in`` and ``tgt_out``),
        ``task`` list of B labels, ``is_repeat`` bool (the batch only evens out the ranks' batch counts),
        and, when the examples carry text (evaluation), ``src_text`` / ``ref_text`` lists of B strings.

    Arguments:
        pad_id, bos_id, eos_id: the tokenizer's special ids.
    """

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError("examples is empty: a batch needs at least one example")
        src, src_mask = pad_sequences([e.source_ids for e in examples], self.pad_id)  # [B, S]
        targets = [e.target_ids for e in examples]
        tgt_in, tgt_mask = pad_sequences(targets, self.pad_id, prefix=self.bos_id)  # [B, T]
        tgt_out, _ = pad_sequences(targets, self.pad_id, suffix=self.eos_id)  # [B, T]
        batch: dict[str, Any] = {
            "src": src,
            "src_padding_mask": src_mask,
            "tgt_in": tgt_in,
            "tgt_out": tgt_out,
            "tgt_padding_mask": tgt_mask,
            "task": [e.task for e in examples],
            "is_repeat": all(e.is_repeat for e in examples),
        }
        if all(e.ref_text is not None for e in examples):
            batch["src_text"] = [e.src_text for e in examples]
            batch["ref_text"] = [e.ref_text for e in examples]
        return batch


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`TokenBucketBatchSampler` whose position survives a restart.

    Lightning saves the ``state_dict`` of a stateful train loader into each checkpoint and hands it back
    to ``load_state_dict`` on resume, before iterating. The state is the epoch and the number of batches
    training has consumed in it (read from ``progress``, not from the iterator, which runs ahead by the
    batches Lightning prefetches); on resume the sampler skips those batches, so a restarted run sees
    exactly the batches an uninterrupted one would.

    Arguments:
        progress: returns ``(epoch, batches consumed in it)``.
        *args, **kwargs: DataLoader arguments; ``batch_sampler`` must be a :class:`TokenBucketBatchSampler`.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, TokenBucketBatchSampler):
            raise ValueError("ResumableDataLoader needs batch_sampler=TokenBucketBatchSampler(...)")
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, consumed = self._progress()
        return {"epoch": int(epoch), "batches_consumed": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume_at(int(state["epoch"]), int(state["batches_consumed"]))
