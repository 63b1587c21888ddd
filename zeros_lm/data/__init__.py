"""Training data for zeros-lm, one module per stage:

- :mod:`.sources`: files / directories / globs / ``"stdlib"`` / jsonl / json / parquet / a hub
  dataset -> one ``datasets`` row (column ``text``) per document;
- :mod:`.tokenizer`: a byte-level BPE trained on the documents, or a tokenizer loaded from a
  directory;
- :mod:`.corpus`: tokenise (``datasets.map``, batched, ``num_proc``), put EOS after every document,
  pack into blocks of ``seq_len + 1`` tokens, hold out validation (the given files, or the last
  ``val_fraction`` of the blocks), and save it all in the cache under a fingerprint of the sources
  (path, size, mtime), the tokenizer and the options, so a second run loads it;
- :mod:`.cache`: the cache directory, its lock and atomic entries;
- :mod:`.loading`: torch datasets over blocks, the resumable sampler and loader;
- :mod:`.module`: ``TextDataModule``, which picks the packed (cached, map-style) or the streaming
  (lazy, each rank its own share of the stream) pipeline once.

Every problem with the input is raised as :class:`DataError`, one message, before training. The
names below are re-exported, so ``from zeros_lm.data import X`` works for all of them.
"""

from .cache import CACHE_LOCK_NAME, DEFAULT_LOCK_TIMEOUT_S, LOCK_TIMEOUT_ENV, default_cache_dir, lock_timeout
from .corpus import CorpusOptions, PreparedCorpus, prepare_corpus
from .errors import DataError
from .loading import BlockDataset, BlockSampler, ResumableDataLoader, StreamingBlocks, collate_blocks
from .module import PackedPipeline, StreamingPipeline, TextDataModule
from .sources import (
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    STDLIB_EXCLUDED_DIRS,
    load_documents,
    load_hub_documents,
    resolve_files,
    stdlib_dir,
    stdlib_files,
)
from .tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    check_vocab_size,
    load_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)

__all__ = [
    "DataError",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "MIN_VOCAB_SIZE",
    "STDLIB_EXCLUDED_DIRS",
    "JSON_SUFFIXES",
    "PARQUET_SUFFIXES",
    "CACHE_LOCK_NAME",
    "LOCK_TIMEOUT_ENV",
    "DEFAULT_LOCK_TIMEOUT_S",
    "TextDataModule",
    "PackedPipeline",
    "StreamingPipeline",
    "resolve_files",
    "stdlib_dir",
    "stdlib_files",
    "load_documents",
    "load_hub_documents",
    "train_tokenizer",
    "load_tokenizer",
    "tokenizer_from_json",
    "check_vocab_size",
    "prepare_corpus",
    "CorpusOptions",
    "PreparedCorpus",
    "default_cache_dir",
    "lock_timeout",
    "BlockDataset",
    "BlockSampler",
    "ResumableDataLoader",
    "StreamingBlocks",
    "collate_blocks",
]
