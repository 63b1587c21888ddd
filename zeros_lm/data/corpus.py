"""The prepared corpus: documents tokenised and packed into blocks of ``seq_len + 1`` tokens with
``datasets.map`` (batched, ``num_proc`` processes), split into training and validation, and saved
in the cache under a key of the sources, the tokenizer and the options, so that a second run loads
it and skips all the work."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .cache import _CACHE_VERSION, _atomic_save_dir, _cache_lock, _die_with, _hash, _work_dir, default_cache_dir
from .errors import DataError
from .sources import _files_fingerprint, load_documents, load_hub_documents, resolve_files
from .tokenizer import _check_texts, _train_tokenizer_on, check_vocab_size, load_tokenizer


# --------------------------------------------------------------------------------------------
# Tokenise and pack (functions used by datasets.map; module level so num_proc can pickle them)
# --------------------------------------------------------------------------------------------
_TOKENIZER_CACHE: dict[str, Any] = {}


def _backend(tokenizer_json: str, split_special_tokens: bool = True):
    """The ``tokenizers.Tokenizer`` of ``tokenizer_json``, kept between batches. With
    ``split_special_tokens`` the text of a special token (``<|endoftext|>`` written inside a
    document) is encoded as the ordinary text it is, never as the special token: only the pipeline
    itself puts EOS between documents."""
    key = hashlib.sha1(tokenizer_json.encode()).hexdigest()
    tok = _TOKENIZER_CACHE.get(key)
    if tok is None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        _TOKENIZER_CACHE.clear()
        _TOKENIZER_CACHE[key] = tok
    tok.encode_special_tokens = split_special_tokens  # a setting of the encoder, not of the saved tokenizer
    return tok


def _tokenize_batch(
    batch: dict, tokenizer_json: str, split_special_tokens: bool = True, parent_pid: Optional[int] = None
) -> dict:
    if parent_pid is not None:
        _die_with(parent_pid)
    _check_texts(batch["text"])
    tok = _backend(tokenizer_json, split_special_tokens)
    texts = [t if (t and t.strip()) else "" for t in batch["text"]]
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=np.int32) if t else np.zeros(0, dtype=np.int32) for e, t in zip(encodings, texts)]
    return {"ids": ids, "n_tokens": [len(x) for x in ids]}


def _pack_batch(batch: dict, block_size: int, eos_id: int, parent_pid: Optional[int] = None) -> dict:
    if parent_pid is not None:
        _die_with(parent_pid)
    pieces = []
    for ids in batch["ids"]:
        if len(ids):
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.asarray([eos_id], dtype=np.int32))
    if not pieces:
        return {"input_ids": []}
    stream = np.concatenate(pieces)
    n = len(stream) // block_size
    return {"input_ids": stream[: n * block_size].reshape(n, block_size)}


def _tokenize_and_pack(
    batch: dict, tokenizer_json: str, block_size: int, eos_id: int, split_special_tokens: bool = True
) -> dict:
    return _pack_batch(_tokenize_batch(batch, tokenizer_json, split_special_tokens), block_size, eos_id)


# --------------------------------------------------------------------------------------------
# The prepared (cached) corpus
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusOptions:
    """What the corpus is made of and how it is cut into blocks: the ``--data.*`` options that the
    packed and the streaming pipelines share (their one set of defaults).

    Args:
        dataset_name: a Hugging Face hub dataset (or a local dataset directory) instead of files.
        dataset_config: its configuration name.
        dataset_split: its split.
        text_column: the text column of jsonl / parquet / hub data.
        sample_by: for plain text files: one document per ``"document"`` (file), ``"paragraph"``
            or ``"line"``.
        tokenizer: a tokenizer directory to load; if unset a byte-level BPE is trained on the
            training data (cached).
        tokenizer_vocab_size: size of the BPE to train (special tokens included).
        tokenizer_train_chars: train the BPE on at most this many characters of the corpus.
        split_special_tokens: ``True`` (the default): the text of a special token inside a document
            (``<|endoftext|>``, ``<|pad|>``, a loaded tokenizer's own) is encoded as ordinary text,
            so only the pipeline's own EOS separates documents. ``False`` turns such text into the
            special token (transformers' ``split_special_tokens=False``), for corpora that write
            their separators as text on purpose.
        seq_len: tokens per training sequence (blocks hold ``seq_len + 1``).
        val_fraction: share of the packed blocks held out for validation (0 disables validation).
        seed: document order, validation split and batch order.
    """

    dataset_name: Optional[str] = None
    dataset_config: Optional[str] = None
    dataset_split: str = "train"
    text_column: str = "text"
    sample_by: Literal["document", "paragraph", "line"] = "document"
    tokenizer: Optional[str] = None
    tokenizer_vocab_size: int = 4096
    tokenizer_train_chars: int = 50_000_000
    split_special_tokens: bool = True
    seq_len: int = 256
    val_fraction: float = 0.01
    seed: int = 1234


@dataclass
class PreparedCorpus:
    train: Any  # datasets.Dataset with a fixed-length "input_ids" column (int32, seq_len + 1)
    val: Any  # same, or None
    tokenizer: Any
    stats: dict
    from_cache: bool
    path: Optional[str] = None


def _block_features(block_size: int):
    import datasets

    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=block_size)})


def _pack_documents(
    docs, tokenizer_json: str, block_size: int, eos_id: int, num_proc: Optional[int], what: str,
    split_special_tokens: bool = True,
):
    """Tokenise (datasets.map, batched, num_proc) and pack into blocks; returns (blocks, n_docs, n_tokens),
    where ``n_docs`` counts the documents with text (an empty or blank one adds nothing to the blocks)."""
    import datasets

    n_rows = len(docs)
    if n_rows == 0:
        raise DataError(f"empty corpus: {what} holds no documents")
    nproc = num_proc if (num_proc and num_proc > 1 and n_rows >= 8 * num_proc) else None
    if nproc:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenized = _batched_map(
        docs, _tokenize_batch, 256, nproc,
        {"tokenizer_json": tokenizer_json, "split_special_tokens": split_special_tokens},
        datasets.Features({"ids": datasets.Sequence(datasets.Value("int32")), "n_tokens": datasets.Value("int64")}),
        f"Tokenising {what}",
    )
    lengths = np.asarray(tokenized.with_format("numpy")["n_tokens"]) if len(tokenized) else np.zeros(0)
    n_tokens, n_docs = int(lengths.sum()), int((lengths > 0).sum())
    if n_tokens == 0:
        raise DataError(f"empty corpus: {what} contains no text")
    # Pack in few large batches so little is lost at batch ends; several processes only when there
    # is enough for every one of them to fill many blocks.
    pack_proc = nproc if (nproc and n_tokens > 2000 * block_size * nproc) else None
    blocks = _batched_map(
        tokenized, _pack_batch, 2000, pack_proc, {"block_size": block_size, "eos_id": eos_id},
        _block_features(block_size), f"Packing {what}",
    )
    return blocks, n_docs, n_tokens


def _batched_map(ds, fn, batch_size: int, num_proc: Optional[int], fn_kwargs: dict, features, desc: str):
    """``ds.map(fn)`` in batches, replacing the columns; worker processes (``num_proc``) die with
    this one (``parent_pid``, see :func:`~zeros_lm.data.cache._die_with`)."""
    return ds.map(
        fn,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        fn_kwargs={**fn_kwargs, "parent_pid": os.getpid() if num_proc else None},
        features=features,
        desc=desc,
    )


def prepare_corpus(
    *,
    train_files: Optional[list[str]] = None,
    val_files: Optional[list[str]] = None,
    num_proc: Optional[int] = None,
    cache_dir: Optional[str] = None,
    use_cache: bool = True,
    **options: Any,
) -> PreparedCorpus:
    """Tokenise and pack a corpus, or load it from the cache if this was done before.

    ``options`` are the fields of :class:`CorpusOptions` (``seq_len=``, ``tokenizer=``, ...). Two
    cached stages: the tokenizer (keyed by the sources and the BPE settings) and the blocks (keyed
    by the sources, the validation files, the tokenizer and the cutting)."""
    o = CorpusOptions(**options)
    _check_options(o, train_files)
    cache_root = Path(cache_dir or default_cache_dir())
    cache_root.mkdir(parents=True, exist_ok=True)
    source_fp = _source_fingerprint(o, train_files)

    with _cache_lock(cache_root), _work_dir(cache_root) as work:
        docs = None

        def get_docs():
            nonlocal docs
            if docs is None:
                if o.dataset_name:
                    docs = load_hub_documents(o.dataset_name, o.dataset_config, o.dataset_split, o.text_column, False)
                else:
                    docs = load_documents(
                        train_files,
                        text_column=o.text_column,
                        sample_by=o.sample_by,
                        cache_dir=str(work),
                        num_proc=num_proc,
                    )
                if len(docs) == 0:
                    raise DataError("empty corpus: the training sources hold no documents")
                docs = docs.shuffle(seed=o.seed).flatten_indices()
            return docs

        tok = _corpus_tokenizer(o, cache_root / "tokenizers", source_fp, get_docs, use_cache)
        tokenizer_json = tok.backend_tokenizer.to_str()
        block_size = o.seq_len + 1
        data_dir = cache_root / "data" / _hash(
            _CACHE_VERSION,
            source_fp,
            _files_fingerprint(val_files) if val_files else None,
            hashlib.sha256(tokenizer_json.encode()).hexdigest(),
            block_size,
            o.val_fraction,
            o.seed,
            o.split_special_tokens,
        )
        if use_cache and (data_dir / "meta.json").is_file():
            return _load_blocks(data_dir, tok)

        def val_docs():
            return load_documents(
                val_files, text_column=o.text_column, sample_by=o.sample_by, cache_dir=str(work), num_proc=num_proc
            )

        train, val, stats = _cut_blocks(o, get_docs(), val_docs if val_files else None, tok, num_proc)
        if use_cache:
            train, val = _save_blocks(data_dir, train, val, stats)
        rank_zero_info(
            f"Data: {stats['documents']} documents, {stats['tokens']:,} tokens -> {len(train)} training and "
            f"{len(val) if val is not None else 0} validation blocks of {block_size} tokens "
            f"({stats['seconds']} s)"
        )
        return PreparedCorpus(train, val, tok, stats, False, str(data_dir) if use_cache else None)


def _check_options(o: CorpusOptions, train_files) -> None:
    if o.seq_len < 1:
        raise DataError(f"seq_len must be positive, got {o.seq_len}")
    if not 0.0 <= o.val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {o.val_fraction}")
    if o.tokenizer is None:
        check_vocab_size(o.tokenizer_vocab_size)
    if not train_files and not o.dataset_name:
        raise DataError("no training data: give --data.train_files or --data.dataset_name")


def _source_fingerprint(o: CorpusOptions, train_files) -> str:
    """What the training documents are: the hub dataset's name (and a local one's files), or the
    files' paths, sizes and modification times; with how they are read."""
    if o.dataset_name:
        source_fp = _hash("hub", o.dataset_name, o.dataset_config, o.dataset_split, o.text_column)
        if os.path.isdir(o.dataset_name):  # a local dataset directory: its files' state counts
            source_fp = _hash(source_fp, _files_fingerprint(resolve_files(o.dataset_name)))
        return source_fp
    return _hash("files", _files_fingerprint(train_files), o.text_column, o.sample_by)


def _corpus_tokenizer(o: CorpusOptions, cache: Path, source_fp: str, get_docs, use_cache: bool):
    """The tokenizer given by ``o.tokenizer``, else a BPE from the cache or trained on the documents."""
    if o.tokenizer is not None:
        return load_tokenizer(o.tokenizer)
    tok_dir = cache / _hash(_CACHE_VERSION, source_fp, o.tokenizer_vocab_size, o.tokenizer_train_chars, o.seed)
    if use_cache and (tok_dir / "tokenizer.json").is_file():
        tok = load_tokenizer(str(tok_dir))
        rank_zero_info(f"Tokenizer: loaded from the cache {tok_dir}")
        return tok
    t0 = time.time()
    tok = _train_tokenizer_on(get_docs(), o.tokenizer_vocab_size, o.tokenizer_train_chars)
    rank_zero_info(f"Tokenizer: trained a byte-level BPE of {len(tok)} entries in {time.time() - t0:.1f} s")
    if use_cache:
        _atomic_save_dir(lambda d: tok.save_pretrained(d), tok_dir)
    return tok


def _cut_blocks(o: CorpusOptions, docs, get_val_docs, tok, num_proc: Optional[int]):
    """Pack the training documents (and the validation documents from ``get_val_docs``, if given,
    else the last ``val_fraction`` of the blocks); returns (train, val, stats)."""
    t0 = time.time()
    tokenizer_json, eos_id, block_size = tok.backend_tokenizer.to_str(), tok.eos_token_id, o.seq_len + 1
    split = o.split_special_tokens
    blocks, n_docs, n_tokens = _pack_documents(
        docs, tokenizer_json, block_size, eos_id, num_proc, "the training data", split
    )
    n_blocks = len(blocks)
    if n_blocks == 0:
        raise DataError(
            f"corpus too small: {n_tokens} tokens in {n_docs} documents make no block of "
            f"seq_len + 1 = {block_size} tokens; give more data or a smaller --data.seq_len"
        )
    val = None
    val_stats: dict = {}
    if get_val_docs is not None:
        val_docs = get_val_docs()
        val, vd, vt = _pack_documents(
            val_docs, tokenizer_json, block_size, eos_id, num_proc, "the validation data", split
        )
        if len(val) == 0:
            raise DataError(
                f"validation data too small: {vt} tokens make no block of seq_len + 1 = {block_size} tokens"
            )
        train = blocks
        val_stats = {"val_documents": vd, "val_tokens": vt}
    elif o.val_fraction > 0:
        n_val = max(1, int(round(o.val_fraction * n_blocks)))
        if n_blocks - n_val < 1:
            raise DataError(
                f"corpus too small: {n_blocks} block(s) of {block_size} tokens cannot be split into "
                f"training and validation (val_fraction={o.val_fraction}); give more data, a smaller "
                "--data.seq_len, --data.val_files, or --data.val_fraction 0"
            )
        train = blocks.select(range(n_blocks - n_val))
        val = blocks.select(range(n_blocks - n_val, n_blocks))
    else:
        train = blocks
    stats = {
        "documents": n_docs,
        "tokens": n_tokens,
        "block_size": block_size,
        "train_blocks": len(train),
        "val_blocks": len(val) if val is not None else 0,
        "vocab_size": len(tok),
        "seconds": round(time.time() - t0, 2),
        **val_stats,
    }
    return train, val, stats


def _save_blocks(data_dir: Path, train, val, stats: dict):
    """Write the blocks into the cache (atomically) and return them memory-mapped from there."""
    import datasets

    def write(d):
        train.save_to_disk(os.path.join(d, "train"))
        if val is not None:
            val.save_to_disk(os.path.join(d, "val"))
        Path(d, "meta.json").write_text(json.dumps(stats, indent=1))

    _atomic_save_dir(write, data_dir)
    train = datasets.load_from_disk(str(data_dir / "train"))
    val = datasets.load_from_disk(str(data_dir / "val")) if val is not None else None
    return train, val


def _load_blocks(data_dir: Path, tok) -> PreparedCorpus:
    import datasets

    train = datasets.load_from_disk(str(data_dir / "train"))
    val = datasets.load_from_disk(str(data_dir / "val")) if (data_dir / "val").is_dir() else None
    stats = json.loads((data_dir / "meta.json").read_text())
    rank_zero_info(
        f"Data: loaded {len(train)} training and {len(val) if val is not None else 0} validation "
        f"blocks of {stats.get('block_size')} tokens from the cache {data_dir}"
    )
    return PreparedCorpus(train, val, tok, stats, True, str(data_dir))


__all__ = ["CorpusOptions", "PreparedCorpus", "prepare_corpus"]
