"""The LightningDataModule of the multitask translator: corpus, tokenizer, task mixture and token-bucket loaders.

Flow:

- ``prepare_data`` (Lightning: one process per node; safe on every rank): find or download the corpus
  (:func:`resolve_data_root`), then train the shared tokenizer on the train split, or find it in the cache.
- ``setup(stage)`` (every process): load the corpus and the cached tokenizer, build the training mixture
  (:class:`~lightning_moe.tasks.MultitaskDataset`) and one evaluation dataset per translation direction.
- ``train_dataloader``: a :class:`TokenBucketBatchSampler` sharded over ``num_replicas`` / ``rank`` taken from
  the attached trainer (``trainer.distributed_sampler_kwargs``, else ``world_size`` / ``global_rank``), so it
  shards the data itself under any distributed strategy. **Run the Trainer with
  ``use_distributed_sampler=False``**: Lightning cannot put a ``DistributedSampler`` into a custom batch
  sampler (it raises a ``TypeError``), and this module already gives every rank its own, equally many batches.
  Lightning's per-epoch ``set_epoch`` reaches the sampler through ``batch_sampler.sampler``.
- ``val_dataloader`` / ``test_dataloader``: a list of loaders, one per direction; their names, in the same
  order (the ``dataloader_idx`` of the LightningModule hooks), are :attr:`val_names` / :attr:`test_names`.
  Evaluation batches carry ``src_text`` / ``ref_text`` for BLEU. They are sharded over ranks too; a batch with
  ``is_repeat=True`` only evens out the ranks' batch counts and must be left out of metrics.

Batch dict (see :class:`~lightning_moe.data.batching.Collator`): ``src`` ``[B, S]`` long, ``src_padding_mask``
``[B, S]`` bool (True = pad), ``tgt_in`` / ``tgt_out`` ``[B, T]`` long, ``tgt_padding_mask`` ``[B, T]`` bool,
``task`` list[str], ``is_repeat`` bool, and ``src_text`` / ``ref_text`` list[str] in evaluation batches.
The model's vocabulary size is :attr:`MultitaskDataModule.vocab_size` (= ``DataConfig.vocab_size``); the pad,
BOS, EOS, mask and language-tag ids are those of :attr:`MultitaskDataModule.tokenizer`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_moe.data.batching import Collator, ResumableDataLoader, TokenBucketBatchSampler
from lightning_moe.data.corpus import (
    ON_ERROR,
    CorpusReport,
    ParallelCorpus,
    available_languages,
    available_splits,
    load_split,
)
from lightning_moe.data.download import SAMPLE_DIR, default_cache_dir, resolve_data_root
from lightning_moe.data.examples import TokenizedCorpus
from lightning_moe.data.tokenizer import MODEL_TYPES, SubwordTokenizer, build_tokenizer
from lightning_moe.tasks import MultitaskConfig, MultitaskDataset, StreamDataset

__all__ = ["DataConfig", "DATA_PRESETS", "get_data_preset", "MultitaskDataModule"]

log = logging.getLogger(__name__)


def _default_langs() -> list[str]:
    return ["en", "de", "fr"]


def _default_test_splits() -> list[str]:
    return ["test_2016_flickr", "test_2017_flickr"]


@dataclass
class DataConfig:
    """Where the corpus comes from and how it is tokenized and batched."""

    root: str | None = None
    """An existing folder of ``{split}.{lang}[.gz]`` files, used as is; None = ``$LIGHTNING_MOE_DATA``, else
    Multi30k in ``{cache_dir}/multi30k`` (downloaded if ``download``)."""
    cache_dir: str | None = None
    """Cache of downloads and tokenizers; None = ``$LIGHTNING_MOE_CACHE`` or ``~/.cache/lightning_moe``."""
    download: bool = True
    """Download missing Multi30k files into the cache (only when ``root`` and ``$LIGHTNING_MOE_DATA`` are unset)."""
    langs: list[str] = field(default_factory=_default_langs)
    """Languages of the corpus to read; the tokenizer is trained on all of them and has a tag for each."""
    train_split: str = "train"
    """Split the mixture (and the tokenizer) is trained on."""
    val_split: str = "val"
    """Split of the validation loaders."""
    test_splits: list[str] = field(default_factory=_default_test_splits)
    """Splits of the test loaders (directions whose languages a split lacks are skipped)."""
    vocab_size: int = 8000
    """Size of the shared subword vocabulary, special tokens included (= the model's vocabulary size)."""
    tokenizer_type: str = "unigram"
    """sentencepiece model type: ``unigram`` or ``bpe``."""
    character_coverage: float = 1.0
    """Fraction of the training characters the vocabulary covers, in (0, 1]."""
    max_tokens: int = 4096
    """Token budget of a training batch per rank: ``max(length) * batch_size <= max_tokens`` (padding included)."""
    eval_max_tokens: int | None = None
    """Token budget of an evaluation batch; None = ``max_tokens``."""
    max_len: int = 128
    """Longest sequence the model sees (tag/BOS and EOS included): longer training pairs are dropped,
    longer evaluation sources are cut. At least 3, at most ``max_tokens``."""
    max_len_chars: int | None = 512
    """Drop training lines longer than this many characters in any language before tokenizing; None = keep."""
    max_train_sentences: int | None = None
    """Use only the first N training lines (small presets); None = all."""
    max_eval_sentences: int | None = None
    """Use only the first N lines of each validation/test split; None = all."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the main process)."""
    pin_memory: bool = False
    """Pin batch memory (for CUDA)."""
    seed: int = 0
    """Seed of batch shuffling, the mixture draws and the denoising noise (the same on every rank)."""
    on_error: str = "raise"
    """Lines that are not valid UTF-8: ``raise`` (naming file and line) or ``filter`` (drop and count)."""
    drop_last: bool = False
    """Drop the training batches that do not fill a round over the ranks, instead of repeating batches."""

    def __post_init__(self) -> None:
        if isinstance(self.langs, str) or not self.langs or not all(isinstance(x, str) and x for x in self.langs):
            raise ValueError(f"data.langs={self.langs!r} is invalid: use a list of language codes, e.g. [en, de, fr]")
        if len(set(self.langs)) != len(self.langs):
            raise ValueError(f"data.langs={list(self.langs)} repeats a language: list each once")
        self.langs = list(self.langs)
        if isinstance(self.test_splits, str):
            raise ValueError(f"data.test_splits={self.test_splits!r} is a string: use a list of split names")
        self.test_splits = list(self.test_splits)
        for key in ("train_split", "val_split"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"data.{key}={getattr(self, key)!r} is invalid: use a split name such as 'train'")
        _check_int("data.vocab_size", self.vocab_size, 16)
        if self.tokenizer_type not in MODEL_TYPES:
            raise ValueError(f"data.tokenizer_type={self.tokenizer_type!r} is invalid: use one of {list(MODEL_TYPES)}")
        if isinstance(self.character_coverage, bool) or not 0 < self.character_coverage <= 1:
            raise ValueError(f"data.character_coverage={self.character_coverage!r} is invalid: use a number in (0, 1]")
        _check_int("data.max_len", self.max_len, 3)
        _check_int("data.max_tokens", self.max_tokens, self.max_len)
        if self.eval_max_tokens is not None:
            _check_int("data.eval_max_tokens", self.eval_max_tokens, self.max_len)
        for key in ("max_len_chars", "max_train_sentences", "max_eval_sentences"):
            if getattr(self, key) is not None:
                _check_int(f"data.{key}", getattr(self, key), 1)
        _check_int("data.num_workers", self.num_workers, 0)
        _check_int("data.seed", self.seed, 0)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error={self.on_error!r} is invalid: use one of {list(ON_ERROR)}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = " (max_tokens must hold one sequence of max_len)" if key.endswith("max_tokens") else ""
        raise ValueError(f"{key}={value!r} is invalid: use an integer >= {minimum}{hint}")


DATA_PRESETS: dict[str, DataConfig] = {
    # Full Multi30k (root / $LIGHTNING_MOE_DATA / download into the cache).
    "multi30k": DataConfig(),
    # The sample shipped in the package (3000 training lines): offline, a tiny model trains on CPU in minutes.
    "sample": DataConfig(
        root=str(SAMPLE_DIR),
        test_splits=["test_2016_flickr"],
        vocab_size=2000,
        max_tokens=2048,
        max_len=64,
    ),
    # The first 2000 training lines of the full corpus, a small vocabulary and short evaluation.
    "small": DataConfig(
        vocab_size=1000,
        max_tokens=2048,
        max_len=64,
        max_train_sentences=2000,
        max_eval_sentences=200,
    ),
}
"""Named data configs; :func:`get_data_preset` returns a copy with overrides."""


def get_data_preset(name: str, **overrides: Any) -> DataConfig:
    """A copy of preset ``name`` with ``overrides`` (fields of :class:`DataConfig`) applied and validated."""
    if name not in DATA_PRESETS:
        raise ValueError(f"data preset {name!r} does not exist: use one of {sorted(DATA_PRESETS)}")
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}: use fields of DataConfig {sorted(known)}")
    return replace(DATA_PRESETS[name], **overrides)


def _plain(value: Any) -> Any:
    """Nested mappings and sequences (e.g. OmegaConf containers) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(item) for item in value]
    return value


def _as_config(cls: type, value: Any, key: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}
        items = _plain(value)
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"{key} has unknown keys {unknown}: use fields of {cls.__name__} {sorted(known)}")
        return cls(**items)
    raise ValueError(f"{key} is a {type(value).__name__}: pass a {cls.__name__} or a mapping of its fields")


class MultitaskDataModule(pl.LightningDataModule):
    """Multi30k-style corpus -> shared tokenizer -> temperature-sampled task mixture -> token-bucket batches.

    Arguments:
        data: a :class:`DataConfig` or a mapping of its fields (None = defaults).
        tasks: a :class:`~lightning_moe.tasks.MultitaskConfig` or a mapping of its fields (None = defaults).

    Attributes (after ``setup``):
        tokenizer: the shared :class:`SubwordTokenizer`.
        train_dataset: the :class:`MultitaskDataset` of the train split.
        val_names / test_names: labels of the evaluation loaders in order (``"translate:en-de"`` /
            ``"test_2016_flickr/translate:en-de"``).
        reports: a :class:`CorpusReport` per split read, for logging.
    """

    def __init__(
        self,
        data: DataConfig | Mapping | None = None,
        tasks: MultitaskConfig | Mapping | None = None,
    ) -> None:
        super().__init__()
        self.data_config: DataConfig = _as_config(DataConfig, data, "data")
        self.task_config: MultitaskConfig = _as_config(MultitaskConfig, tasks, "tasks")
        missing = [lang for lang in self.task_config.langs() if lang not in self.data_config.langs]
        if missing:
            raise ValueError(
                f"the task mixture reads languages {missing} that data.langs={self.data_config.langs} lacks: "
                f"add them to data.langs or change the tasks"
            )
        self.save_hyperparameters({"data": asdict(self.data_config), "tasks": asdict(self.task_config)})
        self.tokenizer: SubwordTokenizer | None = None
        self.train_dataset: MultitaskDataset | None = None
        self.val_datasets: dict[str, StreamDataset] = {}
        self.test_datasets: dict[str, StreamDataset] = {}
        self.reports: dict[str, CorpusReport] = {}
        self._val_ready = False
        self._test_ready = False
        self._root: Path | None = None
        self._train_corpus: ParallelCorpus | None = None

    # ------------------------------------------------------------------ properties
    @property
    def cache_dir(self) -> Path:
        """The cache folder (downloads, tokenizers)."""
        cfg = self.data_config
        return Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else default_cache_dir()

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the model (= ``data.vocab_size``, known before the tokenizer is trained)."""
        return self.data_config.vocab_size

    @property
    def data_root(self) -> Path:
        """The corpus folder in use (resolved, and downloaded if needed, on first access)."""
        return self._resolve_root()

    @property
    def val_names(self) -> list[str]:
        """Labels of the validation loaders, in ``dataloader_idx`` order."""
        return list(self.val_datasets)

    @property
    def test_names(self) -> list[str]:
        """Labels of the test loaders, in ``dataloader_idx`` order."""
        return list(self.test_datasets)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Find or download the corpus and train (or find cached) the tokenizer.

        Safe to call on every rank at once (file locks: one process downloads/trains, the others wait and
        reuse the result). Keeps the loaded train split for a following ``setup`` in the same process.
        """
        root = self._resolve_root()
        self._make_tokenizer(self._load_train(root))

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs (``fit``: train + val, ``validate``: val, ``test``: test)."""
        root = self._resolve_root()
        if self.tokenizer is None:
            self.tokenizer = self._make_tokenizer(self._load_train(root))
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build_train(root)
        if stage in (None, "fit", "validate") and not self._val_ready:
            self.val_datasets = self._build_eval(root, self.data_config.val_split, prefix="")
            self._val_ready = True
        if stage in (None, "test") and not self._test_ready:
            for split in self.data_config.test_splits:
                self.test_datasets.update(self._build_eval(root, split, prefix=f"{split}/"))
            self._test_ready = True
        self._train_corpus = None  # the tokenized datasets hold what they need

    def train_dataloader(self) -> DataLoader:
        """Token-bucket batches of the mixture, sharded over the trainer's data-parallel ranks."""
        dataset = self._require(self.train_dataset, "train_dataset", "fit")
        num_replicas, rank = self._replicas()
        sampler = TokenBucketBatchSampler(
            dataset.lengths,  # a function of the epoch: the mixture changes every epoch
            max_tokens=self.data_config.max_tokens,
            shuffle=True,
            seed=self.data_config.seed,
            num_replicas=num_replicas,
            rank=rank,
            drop_last=self.data_config.drop_last,
        )
        return self._loader(dataset, sampler, resumable=True)

    def _train_progress(self) -> tuple[int, int]:
        """``(epoch, batches processed in it)`` of the attached trainer, for mid-epoch resumes."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return trainer.current_epoch, progress.processed

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per validation direction, in :attr:`val_names` order."""
        if not self._val_ready:
            self._require(None, "val_datasets", "fit' or 'validate")
        return [self._eval_loader(ds) for ds in self.val_datasets.values()]

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per (test split, direction), in :attr:`test_names` order."""
        if not self._test_ready:
            self._require(None, "test_datasets", "test")
        return [self._eval_loader(ds) for ds in self.test_datasets.values()]

    def state_dict(self) -> dict[str, Any]:
        """Saved into Lightning checkpoints: the configs and the tokenizer model, so a checkpoint translates alone."""
        state: dict[str, Any] = {"data": asdict(self.data_config), "tasks": asdict(self.task_config)}
        if self.tokenizer is not None:
            state["tokenizer_model"] = self.tokenizer.model_proto
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the tokenizer of a checkpoint (when this module has none yet; warn if it has another)."""
        proto = state_dict.get("tokenizer_model")
        if proto is None:
            return
        if self.tokenizer is None:
            self.tokenizer = SubwordTokenizer(proto)
        elif self.tokenizer.model_proto != proto:
            log.warning(
                "the checkpoint was trained with another tokenizer than the one built from this data config: "
                "token ids differ; use the same data config (corpus, langs, vocab_size, max_train_sentences)"
            )

    # ------------------------------------------------------------------ helpers
    def _resolve_root(self) -> Path:
        cfg = self.data_config
        splits = [cfg.train_split, cfg.val_split, *cfg.test_splits]
        known = {"train", "val", "test_2016_flickr", "test_2017_flickr"}
        root = resolve_data_root(
            cfg.root,
            self.cache_dir,
            download=cfg.download,
            langs=cfg.langs if set(cfg.langs) <= {"cs", "de", "en", "fr"} else None,
            splits=[s for s in splits if s in known] or None,
        )
        self._root = root
        return root

    def _load_train(self, root: Path) -> ParallelCorpus:
        cfg = self.data_config
        if self._train_corpus is None:
            corpus = load_split(
                root,
                cfg.train_split,
                cfg.langs,
                cfg.max_len_chars,
                on_error=cfg.on_error,
                max_sentences=cfg.max_train_sentences,
            )
            self.reports[cfg.train_split] = corpus.report
            log.info("%s", corpus.report.summary())
            self._train_corpus = corpus
        return self._train_corpus

    def _make_tokenizer(self, corpus: ParallelCorpus) -> SubwordTokenizer:
        cfg = self.data_config
        return build_tokenizer(
            corpus.sentences,
            self.cache_dir,
            vocab_size=cfg.vocab_size,
            model_type=cfg.tokenizer_type,
            character_coverage=cfg.character_coverage,
        )

    def _build_train(self, root: Path) -> MultitaskDataset:
        assert self.tokenizer is not None
        raw = self._load_train(root)
        corpus = TokenizedCorpus.build(raw, self.tokenizer, max_tokens=self.data_config.max_len - 2, overflow="drop")
        raw.report.dropped["too_many_tokens"] = corpus.dropped_too_long
        raw.report.kept = len(corpus)
        if len(corpus) == 0:
            raise ValueError(
                f"no training lines are left in split {self.data_config.train_split!r} after filtering: "
                f"raise data.max_len / data.max_len_chars"
            )
        return MultitaskDataset.from_config(self.task_config, corpus, self.tokenizer, seed=self.data_config.seed)

    def _build_eval(self, root: Path, split: str, prefix: str) -> dict[str, StreamDataset]:
        assert self.tokenizer is not None
        cfg = self.data_config
        if split not in available_splits(root):
            raise ValueError(
                f"evaluation split {split!r} has no files in {root}: available splits are "
                f"{available_splits(root)}; fix data.val_split / data.test_splits"
            )
        tasks = [task for task, _ in self.task_config.build_tasks()]
        present = set(available_languages(root, split))
        needed = [lang for lang in cfg.langs if lang in present and any(lang in t.langs() for t in tasks)]
        out: dict[str, StreamDataset] = {}
        if not needed:
            return out
        corpus = load_split(root, split, needed, None, on_error=cfg.on_error, max_sentences=cfg.max_eval_sentences)
        self.reports[split] = corpus.report
        tokenized = TokenizedCorpus.build(corpus, self.tokenizer, max_tokens=cfg.max_len - 2, overflow="truncate")
        corpus.report.tokens_cut = tokenized.truncated
        for task in tasks:
            if not set(task.langs()) <= set(needed):
                log.info("split %s lacks languages of task %s: skipping its evaluation", split, task.name)
                continue
            for stream in task.eval_streams(tokenized, self.tokenizer):
                out[prefix + stream.name] = StreamDataset(stream)
        return out

    def _replicas(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of data parallelism: from the trainer's strategy when attached."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        kwargs = trainer.distributed_sampler_kwargs
        if kwargs and kwargs.get("num_replicas"):
            num_replicas, rank = int(kwargs["num_replicas"]), int(kwargs.get("rank", 0))
        else:
            num_replicas, rank = int(trainer.world_size), int(trainer.global_rank)
        connector = getattr(trainer, "_accelerator_connector", None)
        if num_replicas > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "Trainer(use_distributed_sampler=True) would replace this datamodule's token-bucket batch "
                "sampler, which shards the data itself: build the Trainer with use_distributed_sampler=False"
            )
        return num_replicas, rank

    def _eval_loader(self, dataset: StreamDataset) -> DataLoader:
        num_replicas, rank = self._replicas()
        sampler = TokenBucketBatchSampler(
            dataset.lengths(),
            max_tokens=self.data_config.eval_max_tokens or self.data_config.max_tokens,
            shuffle=False,
            seed=self.data_config.seed,
            num_replicas=num_replicas,
            rank=rank,
            drop_last=False,
        )
        return self._loader(dataset, sampler)

    def _loader(self, dataset: Any, sampler: TokenBucketBatchSampler, resumable: bool = False) -> DataLoader:
        assert self.tokenizer is not None
        workers = self.data_config.num_workers
        extra: dict[str, Any] = {"progress": self._train_progress} if resumable else {}
        return (ResumableDataLoader if resumable else DataLoader)(
            dataset,
            **extra,
            batch_sampler=sampler,
            collate_fn=Collator(self.tokenizer.pad_id, self.tokenizer.bos_id, self.tokenizer.eos_id),
            num_workers=workers,
            pin_memory=self.data_config.pin_memory,
            persistent_workers=workers > 0,
        )

    @staticmethod
    def _require(value: Any, name: str, stage: str) -> Any:
        if value is None:
            raise ValueError(f"{name} is not built: call setup('{stage}') first (the Trainer does it for you)")
        return value
