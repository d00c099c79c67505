"""Data pipeline: corpus reading, download, the shared tokenizer and token-bucket batching.

The data module (``MultitaskDataModule``, ``DataConfig``, ``DATA_PRESETS``, ``get_data_preset``) is imported
from :mod:`lightning_moe.data.datamodule`: it builds on ``lightning_moe.tasks``, which builds on this
package's lower layers, so this package does not import it.
"""

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
    cache_lock,
    default_cache_dir,
    download_file,
    download_multi30k,
    resolve_data_root,
)
from lightning_moe.data.examples import Example, TokenizedCorpus
from lightning_moe.data.tokenizer import SubwordTokenizer, build_tokenizer, lang_tag

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
    "cache_lock",
    "default_cache_dir",
    "download_file",
    "download_multi30k",
    "resolve_data_root",
    "Example",
    "TokenizedCorpus",
    "SubwordTokenizer",
    "build_tokenizer",
    "lang_tag",
]
