"""Data pipeline: corpus reading, download, the shared tokenizer, token-bucket batching and the data module.

``MultitaskDataModule``, ``DataConfig``, ``DATA_PRESETS`` and ``get_data_preset`` live in
:mod:`lightning_moe.data.datamodule` and are imported on first access (that module imports
``lightning_moe.tasks``, which imports this package's lower layers).
"""

from typing import Any

from lightning_moe.data.batching import Collator, SampleIndex, TokenBucketBatchSampler, pad_sequences
from lightning_moe.data.corpus import (
    CorpusError,
    CorpusReport,
    ParallelCorpus,
    available_languages,
    available_splits,
    corpus_file,
    load_split,
    write_split,
)
from lightning_moe.data.download import (
    SAMPLE_DIR,
    ChecksumError,
    default_cache_dir,
    download_file,
    download_multi30k,
    resolve_data_root,
)
from lightning_moe.data.examples import Example, TokenizedCorpus
from lightning_moe.data.tokenizer import SubwordTokenizer, build_tokenizer, lang_tag

_LAZY = {"MultitaskDataModule", "DataConfig", "DATA_PRESETS", "get_data_preset"}

__all__ = [
    "Collator",
    "SampleIndex",
    "TokenBucketBatchSampler",
    "pad_sequences",
    "CorpusError",
    "CorpusReport",
    "ParallelCorpus",
    "available_languages",
    "available_splits",
    "corpus_file",
    "load_split",
    "write_split",
    "SAMPLE_DIR",
    "ChecksumError",
    "default_cache_dir",
    "download_file",
    "download_multi30k",
    "resolve_data_root",
    "Example",
    "TokenizedCorpus",
    "SubwordTokenizer",
    "build_tokenizer",
    "lang_tag",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lightning_moe.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
