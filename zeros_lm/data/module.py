"""The LightningDataModule: ``TextDataModule`` picks its pipeline once, at construction, and serves
its loaders.

- :class:`PackedPipeline` (the default): the corpus is tokenised, packed and cached up front
  (:func:`~zeros_lm.data.corpus.prepare_corpus`); training batches come through
  :class:`~zeros_lm.data.loading.BlockSampler`.
- :class:`StreamingPipeline` (``streaming=True``): the sources are read lazily, tokenised and packed
  on the fly, each rank reading its own share of the stream.

Both resume from the trainer's restored batch counters (nothing of the position is stored here).
The data module's own ``state_dict`` carries the tokenizer, so that a checkpoint holds what an
export needs (see :mod:`zeros_lm.checkpoint`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .cache import _CACHE_VERSION, _cache_lock, _atomic_save_dir, _hash, default_cache_dir
from .corpus import CorpusOptions, PreparedCorpus, _tokenize_and_pack, prepare_corpus
from .errors import DataError
from .loading import BlockDataset, BlockSampler, ResumableDataLoader, StreamingBlocks, collate_blocks
from .sources import _files_fingerprint, _unwrap_generation_error, load_documents, load_hub_documents, resolve_files
from .tokenizer import _text_sample, check_vocab_size, load_tokenizer, train_tokenizer

__all__ = ["TextDataModule", "PackedPipeline", "StreamingPipeline"]


class PackedPipeline:
    """The corpus tokenised, packed and cached at construction; map-style loaders over its blocks."""

    def __init__(self, dm: "TextDataModule"):
        self.dm = dm
        self.corpus: Optional[PreparedCorpus] = prepare_corpus(
            train_files=dm.train_files,
            val_files=dm.val_files,
            num_proc=dm.num_proc,
            cache_dir=dm.cache_dir,
            **vars(dm.options),
        )
        self.tokenizer = self.corpus.tokenizer

    def train_loader(self, rank: int, world: int) -> DataLoader:
        dm = self.dm
        dataset = BlockDataset(self.corpus.train)
        if len(dataset) < world * dm.batch_size:
            raise DataError(
                f"corpus too small: {len(dataset)} training blocks cannot fill one batch of "
                f"{dm.batch_size} on each of {world} device(s); lower --data.batch_size or --data.seq_len"
            )
        sampler = BlockSampler(
            len(dataset),
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=dm.seed,
            batch_size=dm.batch_size,
            position_fn=dm._batches_done,
        )
        return ResumableDataLoader(
            dataset,
            batch_size=dm.batch_size,
            sampler=sampler,
            num_workers=dm.num_workers,
            collate_fn=collate_blocks,
            drop_last=True,
            persistent_workers=dm.num_workers > 0,
        )

    def val_loader(self, rank: int, world: int):
        if self.corpus.val is None:
            return []
        dataset = BlockDataset(self.corpus.val)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        return DataLoader(dataset, batch_size=self.dm.batch_size, sampler=sampler, num_workers=0,
                          collate_fn=collate_blocks)


class StreamingPipeline:
    """The sources read lazily and packed on the fly; the tokenizer is loaded, or trained on the
    start of the stream (cached), at construction."""

    corpus = None

    def __init__(self, dm: "TextDataModule"):
        self.dm = dm
        self.tokenizer = self._tokenizer()

    def documents(self):
        dm, o = self.dm, self.dm.options
        if o.dataset_name:
            return load_hub_documents(o.dataset_name, o.dataset_config, o.dataset_split, o.text_column, True)
        return load_documents(
            dm.train_files, text_column=o.text_column, sample_by=o.sample_by, cache_dir=dm.cache_dir, streaming=True
        )

    def _tokenizer(self):
        dm, o = self.dm, self.dm.options
        if o.tokenizer:
            return load_tokenizer(o.tokenizer)
        check_vocab_size(o.tokenizer_vocab_size)
        cache_root = Path(dm.cache_dir)
        key = _hash(_CACHE_VERSION, "stream", o.dataset_name, o.dataset_config, o.dataset_split, o.text_column,
                    _files_fingerprint(dm.train_files) if dm.train_files else None,
                    o.tokenizer_vocab_size, o.tokenizer_train_chars)
        tok_dir = cache_root / "tokenizers" / key
        with _cache_lock(cache_root):
            if (tok_dir / "tokenizer.json").is_file():
                return load_tokenizer(str(tok_dir))
            docs = self.documents()
            try:
                sample = [t for batch in _text_sample(docs, o.tokenizer_train_chars) for t in batch]
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                _unwrap_generation_error(e)
                raise
            if not any(t.strip() for t in sample):
                raise DataError("empty corpus: the streamed training data holds no text")
            tok = train_tokenizer(iter(sample), o.tokenizer_vocab_size)
            _atomic_save_dir(lambda d: tok.save_pretrained(d), tok_dir)
            return tok

    def blocks(self, docs, rank: int, world: int):
        from datasets.distributed import split_dataset_by_node

        if world > 1:
            docs = split_dataset_by_node(docs, rank=rank, world_size=world)
        return docs.map(
            _tokenize_and_pack,
            batched=True,
            batch_size=256,
            remove_columns=["text"],
            fn_kwargs={
                "tokenizer_json": self.tokenizer.backend_tokenizer.to_str(),
                "block_size": self.dm.seq_len + 1,
                "eos_id": self.tokenizer.eos_token_id,
                "split_special_tokens": self.dm.options.split_special_tokens,
            },
        )

    def train_loader(self, rank: int, world: int) -> DataLoader:
        dm, hp = self.dm, self.dm.hparams
        docs = self.documents()
        if not dm.val_files:
            docs = docs.skip(hp.val_docs)
        dataset = StreamingBlocks(
            self.blocks(docs, rank, world),
            dm.seed,
            hp.shuffle_buffer,
            skip_fn=lambda: dm._batches_done(epoch_only=True) * dm.batch_size,
            epoch_fn=dm._epoch,
        )
        return ResumableDataLoader(
            dataset, batch_size=dm.batch_size, num_workers=dm.num_workers, collate_fn=collate_blocks, drop_last=True
        )

    def val_loader(self, rank: int, world: int):
        dm, hp, o = self.dm, self.dm.hparams, self.dm.options
        if dm.val_files:
            docs = load_documents(dm.val_files, text_column=o.text_column, sample_by=o.sample_by,
                                  cache_dir=dm.cache_dir, streaming=True)
        else:
            if hp.val_docs <= 0:
                return []
            docs = self.documents().take(hp.val_docs)
        dataset = StreamingBlocks(self.blocks(docs, rank, world), dm.seed, 0)
        return DataLoader(dataset, batch_size=dm.batch_size, num_workers=0, collate_fn=collate_blocks)


class TextDataModule(LightningDataModule):
    """Text corpora for causal-LM pretraining, served as blocks of ``seq_len + 1`` token ids.

    Args:
        train_files: files, directories (recursive), glob patterns, ``"stdlib"`` (the Python
            standard library's ``.py`` sources without tests and site-packages) or a part of it
            (``"stdlib:json"``, ``"stdlib:email/*.py"``). ``.jsonl``/``.json``
            and ``.parquet`` files are read as tables (see ``text_column``); any other file is UTF-8
            text.
        val_files: validation files (same forms); if unset, the last ``val_fraction`` of the
            training blocks is held out.
        extensions: when scanning directories, keep only files with these suffixes (e.g. ``[".py"]``).
        exclude: file or directory names skipped when scanning directories.
        streaming: read, tokenise and pack lazily (for corpora larger than memory); each rank
            reads its own share of the stream. Needs ``--trainer.max_steps``.
        shuffle_buffer: streaming only: size of the block shuffle buffer.
        val_docs: streaming only, without ``val_files``: this many documents at the start of the
            stream are held out for validation.
        document_resets: the blocks hold several documents (``doc EOS doc EOS ...``); with ``True``
            (the default) training keeps them apart: each EOS opens a new document, whose tokens see
            nothing before it (the model's state resets, softmax attention stays inside it). ``False``
            is the old behaviour: a block is read as one sequence across its documents. It changes
            how the blocks are read, not how they are cut (the packed cache is shared); the training
            command passes it on to the model's ``document_resets``.
        batch_size: sequences per device and step.
        num_workers: DataLoader worker processes.
        num_proc: processes for ``datasets.map`` (default: all cores, up to 8).
        cache_dir: where tokenizers and packed data are cached (default ``$ZEROS_LM_CACHE`` or
            ``~/.cache/zeros_lm``).
        corpus: the fields of :class:`~zeros_lm.data.corpus.CorpusOptions` (``seq_len``,
            ``tokenizer``, ``dataset_name``, ...), with their defaults there; the training command
            offers them as ``--data.<field>``.
    """

    def __init__(
        self,
        train_files: Union[list[str], str, None] = "stdlib",
        val_files: Union[list[str], str, None] = None,
        extensions: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        val_docs: int = 100,
        document_resets: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        num_proc: Optional[int] = None,
        cache_dir: Optional[str] = None,
        **corpus: Any,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.options = CorpusOptions(**corpus)
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if self.options.seq_len < 1:
            raise DataError(f"seq_len must be positive, got {self.options.seq_len}")
        self.seq_len = self.options.seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = self.options.seed
        self.streaming = streaming
        self.document_resets = document_resets
        self.num_proc = num_proc if num_proc is not None else max(1, min(8, os.cpu_count() or 1))
        self.cache_dir = cache_dir or default_cache_dir()

        self.train_files = None if self.options.dataset_name else resolve_files(train_files, extensions, exclude)
        self.val_files = resolve_files(val_files, extensions, exclude) if val_files else None
        if self.options.dataset_name is None and not self.train_files:
            raise DataError("no training data: give --data.train_files or --data.dataset_name")

        # Everything that can fail on bad input happens here, at construction, before any
        # training process starts; the work is cached, so the other ranks only load it.
        self.pipeline = (StreamingPipeline if streaming else PackedPipeline)(self)
        self.tokenizer = self.pipeline.tokenizer
        self.corpus: Optional[PreparedCorpus] = self.pipeline.corpus

    # -- what the model needs from the data --------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id

    @property
    def from_cache(self) -> bool:
        return bool(self.corpus and self.corpus.from_cache)

    # -- Lightning hooks -----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return self.pipeline.train_loader(*self._rank_world())

    def val_dataloader(self):
        return self.pipeline.val_loader(*self._rank_world())

    def state_dict(self) -> dict:
        """Saved by Lightning in every checkpoint: the tokenizer (an export of the checkpoint ships it)."""
        from ..checkpoint import data_state

        return data_state(self.tokenizer)

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore: the tokenizer is rebuilt from the data options (and the cache), and
        the position in the data follows the trainer's restored counters."""

    # -- where training stands (restored by Lightning on resume) --------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _epoch(self) -> int:
        """The trainer's current epoch (0 without a trainer)."""
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def _batches_done(self, epoch_only: bool = False) -> int:
        """Training batches this rank has gone through (restored by Lightning on resume)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return int((progress.current if epoch_only else progress.total).processed)
