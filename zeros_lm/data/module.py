"""Training data for zeros-lm: sources, a byte-level BPE tokenizer, tokenising and packing with
``datasets``, an on-disk cache, and the LightningDataModule that serves fixed-length blocks.

Pipeline (map-style, the default)::

    sources (files / dirs / globs / "stdlib" / jsonl / parquet / a hub dataset)
      -> one row per document (column "text"), documents shuffled with the seed
      -> tokenizer: loaded from a directory, or a byte-level BPE trained on the documents
      -> datasets.map(batched, num_proc): token ids, EOS after every document
      -> packed into blocks of seq_len + 1 tokens (inputs and shifted targets)
      -> validation: the given files, or the last ``val_fraction`` of the blocks
      -> saved under the cache directory, keyed by a fingerprint of the sources (path, size,
         mtime), the tokenizer and the options, so a second run loads it and skips all the work.

Streaming mode (``streaming=True``) reads the sources lazily (``datasets`` IterableDataset),
tokenises and packs on the fly and gives each rank its own share of the stream.

Every problem with the input is raised as :class:`DataError`, one message, before training.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import json
import os
import shutil
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset as TorchDataset, IterableDataset as TorchIterableDataset
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "DataError",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "MIN_VOCAB_SIZE",
    "TextDataModule",
    "resolve_files",
    "stdlib_files",
    "train_tokenizer",
    "load_tokenizer",
    "tokenizer_from_json",
    "prepare_corpus",
    "PreparedCorpus",
    "BlockSampler",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
# A byte-level BPE starts from the 256 byte symbols; the special tokens come on top.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
STDLIB_EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
_CACHE_VERSION = "1"
_GLOB_CHARS = set("*?[")


class DataError(ValueError):
    """A problem with the training data or the tokenizer, found before training starts."""


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """The Python standard library's own ``.py`` sources: no tests, no site-packages."""
    root = stdlib_dir()
    if not root.is_dir():
        raise DataError(f"the Python standard library was not found at {root}")
    return _walk(root, extensions=[".py"], exclude=list(STDLIB_EXCLUDED_DIRS))


def _walk(root: Path, extensions: Optional[Sequence[str]], exclude: Sequence[str]) -> list[str]:
    exts = tuple(e if e.startswith(".") else "." + e for e in extensions) if extensions else None
    excluded = set(exclude)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in excluded)
        for name in sorted(filenames):
            if name.startswith(".") or name in excluded:
                continue
            if exts and not name.endswith(exts):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                out.append(path)
    return out


def resolve_files(
    sources: Union[str, Sequence[str], None],
    extensions: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> list[str]:
    """Expand files, directories (recursively), glob patterns and ``"stdlib"`` into a sorted list
    of files. Raises :class:`DataError` for a missing path, a pattern or directory matching no
    file, or an empty list of sources."""
    if sources is None:
        return []
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    if not sources:
        raise DataError("no data source given")
    exclude = list(exclude or [])
    files: list[str] = []
    for src in sources:
        if src == "stdlib":
            files.extend(stdlib_files())
            continue
        if src.startswith("stdlib:"):
            # A part of the standard library, e.g. "stdlib:json" or "stdlib:email/*.py".
            rel = src[len("stdlib:") :]
            files.extend(resolve_files([str(stdlib_dir() / rel)], [".py"], list(STDLIB_EXCLUDED_DIRS)))
            continue
        expanded = os.path.expanduser(src)
        if _GLOB_CHARS & set(expanded):
            matches = sorted(globlib.glob(expanded, recursive=True))
            found = []
            for m in matches:
                if os.path.isdir(m):
                    found.extend(_walk(Path(m), extensions, exclude))
                elif os.path.isfile(m):
                    found.append(m)
            if not found:
                raise DataError(f"no file matched the pattern {src!r}")
            files.extend(found)
        elif os.path.isdir(expanded):
            found = _walk(Path(expanded), extensions, exclude)
            if not found:
                what = f" with extension {list(extensions)}" if extensions else ""
                raise DataError(f"no file{what} found in the directory {src!r}")
            files.extend(found)
        elif os.path.isfile(expanded):
            files.append(expanded)
        else:
            raise DataError(f"no such file or directory: {src!r}")
    seen, unique = set(), []
    for f in files:
        a = os.path.abspath(f)
        if a not in seen:
            seen.add(a)
            unique.append(a)
    return sorted(unique)


def _kind(path: str) -> str:
    p = path.lower()
    if p.endswith(JSON_SUFFIXES):
        return "json"
    if p.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _files_fingerprint(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------
def _read_text_file(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 (undecodable byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 or leave it out (--data.extensions / --data.exclude)"
        ) from None


def _split_text(text: str, sample_by: str) -> list[str]:
    if sample_by == "document":
        return [text]
    if sample_by == "line":
        return text.splitlines()
    if sample_by == "paragraph":
        return [p for p in text.split("\n\n")]
    raise DataError(f"sample_by must be 'document', 'paragraph' or 'line', got {sample_by!r}")


def _text_generator(files: list[str], sample_by: str, parent_pid: Optional[int] = None) -> Iterator[dict]:
    if parent_pid is not None:
        _die_with(parent_pid)
    for f in files:
        for doc in _split_text(_read_text_file(f), sample_by):
            yield {"text": doc}


def _unwrap_generation_error(e: BaseException) -> None:
    cause = e
    while cause is not None:
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from None
        cause = cause.__cause__ or cause.__context__
    return None


def _load_structured(kind: str, files: list[str], text_column: str, cache_dir: str, streaming: bool):
    import datasets

    try:
        ds = datasets.load_dataset(
            kind, data_files=files, split="train", cache_dir=None if streaming else cache_dir, streaming=streaming
        )
    except Exception as e:  # noqa: BLE001 - turned into one clear message
        _unwrap_generation_error(e)
        problem = _first_structured_problem(kind, files, text_column)
        if problem:
            raise DataError(problem) from None
        message = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(f"could not read {kind} file(s) {_short(files)}: {message}") from None
    what = f"{kind} file(s) {_short(files)}"
    ds = _select_text_column(ds, text_column, what=what)
    feature = ds.features.get("text") if ds.features is not None else None  # None: streamed, not known yet
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        problem = _first_structured_problem(kind, files, text_column)
        raise DataError(
            problem or f"{what}: the text column {text_column!r} holds {feature}, not strings; set --data.text_column"
        )
    return ds


def _describe_value(value: Any) -> str:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({shown})"


def _not_a_string(path: str, where: str, text_column: str, value: Any) -> str:
    return (
        f"{path}, {where}: the text column {text_column!r} holds {_describe_value(value)}, not a string; "
        "fix that row, or choose another column with --data.text_column"
    )


def _first_structured_problem(kind: str, files: Sequence[str], text_column: str) -> Optional[str]:
    """The first row of the first file that is malformed or whose text column is not a string, as
    a one-line message naming the file and row (None if none is found). Only called once reading
    has failed, so it may read the files again."""
    for path in files:
        try:
            problem = (_json_problem if kind == "json" else _parquet_problem)(path, text_column)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{path}: cannot be read as {kind}: {' '.join(str(e).split())}"
        if problem:
            return problem
    return None


def _json_problem(path: str, text_column: str) -> Optional[str]:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                whole = _json_document_problem(path, opener, text_column)
                if whole is not False:  # the file is one JSON document, not JSON lines
                    return whole
                return f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line"
            if isinstance(record, list):  # a JSON document written on one line
                problem = _records_problem(path, record, text_column, where=lambda i: f"record {i}")
            else:
                problem = _records_problem(path, [record], text_column, where=lambda i, n=n: f"line {n}")
            if problem:
                return problem
    return None


def _records_problem(path: str, records: list, text_column: str, where) -> Optional[str]:
    """The first record (a dict) whose text column holds something other than a string or null;
    ``where(i)`` names the i-th record (1-based) in the message."""
    for i, record in enumerate(records, 1):
        value = record.get(text_column) if isinstance(record, dict) else None
        if value is not None and not isinstance(value, str):
            return _not_a_string(path, where(i), text_column, value)
    return None


def _json_document_problem(path: str, opener, text_column: str):
    """For a file holding one JSON document (a list of records): its problem, None, or False if it
    is not one valid JSON document."""
    with opener(path, "rt", encoding="utf-8") as fh:
        try:
            document = json.load(fh)
        except json.JSONDecodeError:
            return False
    records = document if isinstance(document, list) else [document]
    return _records_problem(path, records, text_column, where=lambda i: f"record {i}")


def _parquet_problem(path: str, text_column: str) -> Optional[str]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if text_column not in schema.names:
        return None
    for i, value in enumerate(pq.read_table(path, columns=[text_column]).column(0).to_pylist(), 1):
        if value is not None and not isinstance(value, str):
            return _not_a_string(path, f"row {i}", text_column, value)
    return None


def _select_text_column(ds, text_column: str, what: str):
    columns = ds.column_names
    if columns is None:  # a streaming dataset whose features are unknown until read
        first = next(iter(ds), None)
        columns = list(first) if first else []
    if text_column not in columns:
        raise DataError(f"{what} has no column {text_column!r} (columns: {columns}); set --data.text_column")
    drop = [c for c in columns if c != text_column]
    if drop:
        ds = ds.remove_columns(drop)
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def _short(files: Sequence[str], n: int = 3) -> str:
    files = list(files)
    s = ", ".join(files[:n])
    return s + (f" and {len(files) - n} more" if len(files) > n else "")


def load_documents(
    files: list[str],
    *,
    text_column: str = "text",
    sample_by: str = "document",
    cache_dir: str,
    num_proc: Optional[int] = None,
    streaming: bool = False,
):
    """One ``datasets`` row (column ``text``) per document from local files of any supported kind."""
    import datasets

    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_kind(f), []).append(f)
    parts = []
    if "text" in groups:
        text_files = groups["text"]
        features = datasets.Features({"text": datasets.Value("string")})
        if streaming:
            ds = datasets.IterableDataset.from_generator(
                _text_generator, gen_kwargs={"files": text_files, "sample_by": sample_by}, features=features
            )
        else:
            nproc = num_proc if num_proc and num_proc > 1 and len(text_files) >= 4 * num_proc else None
            try:
                ds = datasets.Dataset.from_generator(
                    _text_generator,
                    gen_kwargs={"files": text_files, "sample_by": sample_by, "parent_pid": os.getpid()},
                    features=features,
                    cache_dir=cache_dir,
                    num_proc=nproc,
                )
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                _unwrap_generation_error(e)
                raise
        parts.append(ds)
    for kind in ("json", "parquet"):
        if kind in groups:
            parts.append(_load_structured(kind, groups[kind], text_column, cache_dir, streaming))
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(parts)


def load_hub_documents(name: str, config: Optional[str], split: str, text_column: str, streaming: bool):
    """A dataset by hub name (or a local dataset directory / script), reduced to its text column."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load the dataset {name!r} (config {config!r}, split {split!r}): {e}") from None
    return _select_text_column(ds, text_column, what=f"dataset {name!r}")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def _wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1_000_000_000,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_from_json(tokenizer_json: str):
    """A ``PreTrainedTokenizerFast`` from a serialized ``tokenizers.Tokenizer`` (as stored in our
    checkpoints)."""
    from tokenizers import Tokenizer

    return _wrap_tokenizer(Tokenizer.from_str(tokenizer_json))


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"tokenizer_vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} entries (256 bytes + {len(SPECIAL_TOKENS)} special tokens); 4096 or more is usual"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: Optional[int] = None):
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens ``<|endoftext|>`` and
    ``<|pad|>`` included) and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return _wrap_tokenizer(tok)


def load_tokenizer(path: str):
    """Load a tokenizer from a directory (ours or any fast HF tokenizer). It needs an EOS token;
    a missing pad token falls back to EOS."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"tokenizer directory not found: {path!r}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load a tokenizer from {path!r}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"the tokenizer in {path!r} is not a fast (Rust) tokenizer")
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer in {path!r} has no EOS token; documents are separated by EOS")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if len(tok) < MIN_VOCAB_SIZE:
        raise DataError(f"the tokenizer in {path!r} has only {len(tok)} entries; at least {MIN_VOCAB_SIZE} are needed")
    return tok


def _check_texts(texts: Iterable[Any]) -> None:
    """Raise :class:`DataError` for a text that is neither a string nor null (files are checked row by
    row when they are loaded; this catches what streams in from elsewhere)."""
    for t in texts:
        if t is not None and not isinstance(t, str):
            raise DataError(f"the text column holds {_describe_value(t)}, not a string; set --data.text_column")


def _text_sample(ds, max_chars: int, batch: int = 256) -> Iterator[list[str]]:
    """Batches of document texts from ``ds`` (map-style or iterable) up to about ``max_chars``."""
    total = 0
    if hasattr(ds, "__len__"):
        for start in range(0, len(ds), batch):
            texts = ds[start : start + batch]["text"]
            _check_texts(texts)
            texts = [t for t in texts if t]
            yield texts
            total += sum(len(t) for t in texts)
            if total >= max_chars:
                return
    else:
        buf = []
        for row in ds:
            t = row["text"]
            _check_texts([t])
            if t:
                buf.append(t)
                total += len(t)
            if len(buf) >= batch:
                yield buf
                buf = []
            if total >= max_chars:
                break
        if buf:
            yield buf


def _train_tokenizer_on(ds, vocab_size: int, max_chars: int):
    sample = (t for batch in _text_sample(ds, max_chars) for t in batch)
    return train_tokenizer(sample, vocab_size)


# --------------------------------------------------------------------------------------------
# Tokenise and pack (functions used by datasets.map; module level so num_proc can pickle them)
# --------------------------------------------------------------------------------------------
_TOKENIZER_CACHE: dict[str, Any] = {}


def _backend(tokenizer_json: str):
    key = hashlib.sha1(tokenizer_json.encode()).hexdigest()
    tok = _TOKENIZER_CACHE.get(key)
    if tok is None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        _TOKENIZER_CACHE.clear()
        _TOKENIZER_CACHE[key] = tok
    return tok


def _tokenize_batch(batch: dict, tokenizer_json: str, parent_pid: Optional[int] = None) -> dict:
    if parent_pid is not None:
        _die_with(parent_pid)
    _check_texts(batch["text"])
    tok = _backend(tokenizer_json)
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


def _tokenize_and_pack(batch: dict, tokenizer_json: str, block_size: int, eos_id: int) -> dict:
    return _pack_batch(_tokenize_batch(batch, tokenizer_json), block_size, eos_id)


# --------------------------------------------------------------------------------------------
# The prepared (cached) corpus
# --------------------------------------------------------------------------------------------
@dataclass
class PreparedCorpus:
    train: Any  # datasets.Dataset with a fixed-length "input_ids" column (int32, seq_len + 1)
    val: Any  # same, or None
    tokenizer: Any
    stats: dict
    from_cache: bool
    path: Optional[str] = None


CACHE_LOCK_NAME = ".lock"
LOCK_TIMEOUT_ENV = "ZEROS_LM_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 3600.0
_WORK_PREFIX = "work-"
_TMP_MARK = ".tmp-"  # _atomic_save_dir's temporary directories


def lock_timeout() -> float:
    """Seconds to wait for another process preparing data in the same cache (``$ZEROS_LM_LOCK_TIMEOUT``)."""
    value = os.environ.get(LOCK_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


@contextlib.contextmanager
def _cache_lock(cache_root: Path):
    """Hold the cache's lock: one process at a time prepares data in ``cache_root``.

    The lock dies with its owner (see ``_locks.py``), so a killed preparation never blocks later
    runs; a live owner is waited for, with a message, for at most :func:`lock_timeout` seconds.
    Once held, whatever a killed preparation left behind is removed (only the holder writes
    there): its ``work-*`` folder, half-written cache entries, and the processes it had forked
    (``datasets`` workers and managers; see :func:`_work_dir`).
    """
    from ._locks import LockBusy, describe_holder, held

    path = cache_root / CACHE_LOCK_NAME
    timeout = lock_timeout()

    def waiting(holder):
        print(
            f"Waiting for {describe_holder(holder)}, which is preparing data in the cache {cache_root} "
            f"(up to {timeout:.0f} s; {LOCK_TIMEOUT_ENV} sets the limit) ...",
            file=sys.stderr,
            flush=True,
        )

    try:
        with held(path, timeout=timeout, on_wait=waiting):
            _remove_leftovers(cache_root)
            yield
    except LockBusy as e:
        raise DataError(
            f"the data cache {cache_root} is still locked by {describe_holder(e.holder)} after {timeout:.0f} s "
            f"(lock file {path}); wait for that run to finish or stop it, use another --data.cache_dir, or "
            f"set {LOCK_TIMEOUT_ENV}=SECONDS to wait longer"
        ) from None


_OWNER_FILE = "owner"


@contextlib.contextmanager
def _work_dir(cache_root: Path):
    """A fresh ``work-<pid>-<ms>`` folder for ``datasets``' intermediate files, removed afterwards.

    The preparing process keeps its ``owner`` file open while it works; every process it forks
    inherits that descriptor. If the preparation is killed, the next holder of the cache lock finds
    the processes still holding the file (orphaned workers, a ``datasets`` manager) and ends them.
    """
    work = cache_root / f"{_WORK_PREFIX}{os.getpid()}-{int(time.time() * 1000)}"
    work.mkdir(parents=True)
    fd = os.open(work / _OWNER_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        yield work
    finally:
        os.close(fd)
        shutil.rmtree(work, ignore_errors=True)


def _kill_processes_holding(path: Path) -> None:
    """SIGKILL every other process with ``path`` open (Linux: read from /proc; elsewhere a no-op)."""
    target = os.path.realpath(path)
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for pid_dir in proc.glob("[0-9]*"):
        pid = int(pid_dir.name)
        if pid == os.getpid():
            continue
        try:
            holds = any(os.readlink(fd) == target for fd in (pid_dir / "fd").iterdir())
        except OSError:  # gone meanwhile, or another user's
            continue
        if holds:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _remove_leftovers(cache_root: Path) -> None:
    """What preparations that were killed left behind (call with the lock held): their work
    folders and forked processes, and temporary cache entries."""
    leftovers = list(cache_root.glob(_WORK_PREFIX + "*"))
    for work in leftovers:
        if (work / _OWNER_FILE).exists():
            _kill_processes_holding(work / _OWNER_FILE)
    for sub in ("tokenizers", "data"):
        leftovers += [p for p in (cache_root / sub).glob(f"*{_TMP_MARK}*")]
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


_PARENT_WATCH_SET_IN: Optional[int] = None
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def _die_with(parent_pid: int) -> None:
    """In a worker process of ``datasets`` (forked from the preparing process ``parent_pid``): be
    killed when that process dies, instead of living on as an orphan. Linux only; a no-op in the
    preparing process itself and elsewhere."""
    global _PARENT_WATCH_SET_IN
    pid = os.getpid()
    if pid == parent_pid or _PARENT_WATCH_SET_IN == pid or not sys.platform.startswith("linux"):
        return
    _PARENT_WATCH_SET_IN = pid
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the request was made
        os._exit(1)


def default_cache_dir() -> str:
    return os.environ.get("ZEROS_LM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zeros_lm")


def _block_features(block_size: int):
    import datasets

    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=block_size)})


def _pack_documents(docs, tokenizer_json: str, block_size: int, eos_id: int, num_proc: Optional[int], what: str):
    """Tokenise (datasets.map, batched, num_proc) and pack into blocks; returns (blocks, n_docs, n_tokens)."""
    import datasets

    n_docs = len(docs)
    if n_docs == 0:
        raise DataError(f"empty corpus: {what} holds no documents")
    nproc = num_proc if (num_proc and num_proc > 1 and n_docs >= 8 * num_proc) else None
    if nproc:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenized = docs.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=nproc,
        remove_columns=docs.column_names,
        fn_kwargs={"tokenizer_json": tokenizer_json, "parent_pid": os.getpid() if nproc else None},
        features=datasets.Features(
            {"ids": datasets.Sequence(datasets.Value("int32")), "n_tokens": datasets.Value("int64")}
        ),
        desc=f"Tokenising {what}",
    )
    n_tokens = int(np.sum(tokenized.with_format("numpy")["n_tokens"])) if len(tokenized) else 0
    if n_tokens == 0:
        raise DataError(f"empty corpus: {what} contains no text")
    # Pack in few large batches so little is lost at batch ends; several processes only when there
    # is enough for every one of them to fill many blocks.
    pack_proc = nproc if (nproc and n_tokens > 2000 * block_size * nproc) else None
    blocks = tokenized.map(
        _pack_batch,
        batched=True,
        batch_size=2000,
        num_proc=pack_proc,
        remove_columns=tokenized.column_names,
        fn_kwargs={"block_size": block_size, "eos_id": eos_id, "parent_pid": os.getpid() if pack_proc else None},
        features=_block_features(block_size),
        desc=f"Packing {what}",
    )
    return blocks, n_docs, n_tokens


def prepare_corpus(
    *,
    train_files: Optional[list[str]] = None,
    val_files: Optional[list[str]] = None,
    dataset_name: Optional[str] = None,
    dataset_config: Optional[str] = None,
    dataset_split: str = "train",
    text_column: str = "text",
    sample_by: str = "document",
    tokenizer: Optional[str] = None,
    tokenizer_vocab_size: int = 4096,
    tokenizer_train_chars: int = 50_000_000,
    seq_len: int = 512,
    val_fraction: float = 0.01,
    seed: int = 1234,
    num_proc: Optional[int] = None,
    cache_dir: Optional[str] = None,
    use_cache: bool = True,
) -> PreparedCorpus:
    """Tokenise and pack a corpus, or load it from the cache if this was done before."""
    import datasets

    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer is None:
        check_vocab_size(tokenizer_vocab_size)
    if not train_files and not dataset_name:
        raise DataError("no training data: give --data.train_files or --data.dataset_name")
    block_size = seq_len + 1
    cache_root = Path(cache_dir or default_cache_dir())
    cache_root.mkdir(parents=True, exist_ok=True)

    if dataset_name:
        source_fp = _hash("hub", dataset_name, dataset_config, dataset_split, text_column)
        if os.path.isdir(dataset_name):  # a local dataset directory: its files' state counts
            source_fp = _hash(source_fp, _files_fingerprint(resolve_files(dataset_name)))
    else:
        source_fp = _hash("files", _files_fingerprint(train_files), text_column, sample_by)
    val_fp = _files_fingerprint(val_files) if val_files else None

    with _cache_lock(cache_root), _work_dir(cache_root) as work:
        docs = None

        def get_docs():
            nonlocal docs
            if docs is None:
                if dataset_name:
                    docs = load_hub_documents(dataset_name, dataset_config, dataset_split, text_column, False)
                else:
                    docs = load_documents(
                        train_files,
                        text_column=text_column,
                        sample_by=sample_by,
                        cache_dir=str(work),
                        num_proc=num_proc,
                    )
                if len(docs) == 0:
                    raise DataError("empty corpus: the training sources hold no documents")
                docs = docs.shuffle(seed=seed).flatten_indices()
            return docs

        # 1. Tokenizer
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        else:
            tok_dir = cache_root / "tokenizers" / _hash(
                _CACHE_VERSION, source_fp, tokenizer_vocab_size, tokenizer_train_chars, seed
            )
            if use_cache and (tok_dir / "tokenizer.json").is_file():
                tok = load_tokenizer(str(tok_dir))
                rank_zero_info(f"Tokenizer: loaded from the cache {tok_dir}")
            else:
                t0 = time.time()
                tok = _train_tokenizer_on(get_docs(), tokenizer_vocab_size, tokenizer_train_chars)
                rank_zero_info(
                    f"Tokenizer: trained a byte-level BPE of {len(tok)} entries in {time.time() - t0:.1f} s"
                )
                if use_cache:
                    _atomic_save_dir(lambda d: tok.save_pretrained(d), tok_dir)
        tokenizer_json = tok.backend_tokenizer.to_str()
        eos_id = tok.eos_token_id

        # 2. Blocks
        data_dir = cache_root / "data" / _hash(
            _CACHE_VERSION,
            source_fp,
            val_fp,
            hashlib.sha256(tokenizer_json.encode()).hexdigest(),
            block_size,
            val_fraction,
            seed,
        )
        if use_cache and (data_dir / "meta.json").is_file():
            train = datasets.load_from_disk(str(data_dir / "train"))
            val = datasets.load_from_disk(str(data_dir / "val")) if (data_dir / "val").is_dir() else None
            stats = json.loads((data_dir / "meta.json").read_text())
            rank_zero_info(
                f"Data: loaded {len(train)} training and {len(val) if val is not None else 0} validation "
                f"blocks of {block_size} tokens from the cache {data_dir}"
            )
            return PreparedCorpus(train, val, tok, stats, True, str(data_dir))

        t0 = time.time()
        blocks, n_docs, n_tokens = _pack_documents(
            get_docs(), tokenizer_json, block_size, eos_id, num_proc, "the training data"
        )
        n_blocks = len(blocks)
        if n_blocks == 0:
            raise DataError(
                f"corpus too small: {n_tokens} tokens in {n_docs} documents make no block of "
                f"seq_len + 1 = {block_size} tokens; give more data or a smaller --data.seq_len"
            )
        val = None
        val_stats: dict = {}
        if val_files:
            val_docs = load_documents(
                val_files, text_column=text_column, sample_by=sample_by, cache_dir=str(work), num_proc=num_proc
            )
            val, vd, vt = _pack_documents(val_docs, tokenizer_json, block_size, eos_id, num_proc, "the validation data")
            if len(val) == 0:
                raise DataError(
                    f"validation data too small: {vt} tokens make no block of seq_len + 1 = {block_size} tokens"
                )
            train = blocks
            val_stats = {"val_documents": vd, "val_tokens": vt}
        elif val_fraction > 0:
            n_val = max(1, int(round(val_fraction * n_blocks)))
            if n_blocks - n_val < 1:
                raise DataError(
                    f"corpus too small: {n_blocks} block(s) of {block_size} tokens cannot be split into "
                    f"training and validation (val_fraction={val_fraction}); give more data, a smaller "
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
        if use_cache:

            def write(d):
                train.save_to_disk(os.path.join(d, "train"))
                if val is not None:
                    val.save_to_disk(os.path.join(d, "val"))
                Path(d, "meta.json").write_text(json.dumps(stats, indent=1))

            _atomic_save_dir(write, data_dir)
            train = datasets.load_from_disk(str(data_dir / "train"))
            val = datasets.load_from_disk(str(data_dir / "val")) if val is not None else None
        rank_zero_info(
            f"Data: {n_docs} documents, {n_tokens:,} tokens -> {len(train)} training and "
            f"{len(val) if val is not None else 0} validation blocks of {block_size} tokens "
            f"({stats['seconds']} s)"
        )
        return PreparedCorpus(train, val, tok, stats, False, str(data_dir) if use_cache else None)


def _atomic_save_dir(write_fn, final: Path) -> None:
    """Write a directory under a temporary name and rename it into place. If another process (a
    rank on another node sharing the cache) got there first, its result is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{_TMP_MARK}{os.uname().nodename}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_fn(str(tmp))
        if not final.exists():
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Torch-side datasets and the resumable sampler
# --------------------------------------------------------------------------------------------
class BlockDataset(TorchDataset):
    """Fixed-length token blocks from an Arrow-backed ``datasets.Dataset`` (memory-mapped)."""

    def __init__(self, hf_dataset):
        self.ds = hf_dataset.with_format("numpy")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.ds[int(i)]["input_ids"], dtype=np.int64))

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        rows = np.asarray(self.ds[list(map(int, indices))]["input_ids"], dtype=np.int64)
        return list(torch.from_numpy(rows))


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch correctly: the position is not kept
    here but derived from the trainer's restored batch counters (see :class:`BlockSampler`)."""

    def state_dict(self) -> dict:
        return {"position": "from the trainer's batch counters"}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def collate_blocks(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


class BlockSampler(DistributedSampler):
    """Shuffles the blocks once per data epoch (seed + epoch), gives each rank an equal share, and
    continues exactly where training stopped.

    The position comes from ``position_fn``: the number of batches this rank has trained on so
    far (Lightning restores that count from a checkpoint). Batch ``b`` of the whole run is always
    the same data, however the run was interrupted and resumed: after a resume the first epoch is
    shortened to what was left of the interrupted one. Without ``position_fn`` it behaves like a
    plain ``DistributedSampler`` (epoch from ``set_epoch``).

    It is a ``DistributedSampler`` so that Lightning keeps it as it is in distributed runs;
    ``len()`` is always a full per-rank epoch.
    """

    def __init__(
        self,
        num_blocks: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        position_fn=None,
    ):
        super().__init__(
            range(num_blocks), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.position_fn = position_fn
        # Samples per rank and data epoch, whole batches only (the loader drops a partial batch).
        self.per_epoch = (self.num_samples // batch_size) * batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_blocks, generator=g).tolist()
        else:
            order = list(range(self.num_blocks))
        total = self.num_samples * self.num_replicas
        return order[self.rank : total : self.num_replicas]

    def position(self) -> tuple[int, int]:
        """(data epoch, samples already used in it) at the start of the next iteration."""
        if self.position_fn is None or self.per_epoch == 0:
            return self.epoch, 0
        consumed = int(self.position_fn()) * self.batch_size
        return divmod(consumed, self.per_epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.position()
        return iter(self.epoch_indices(epoch)[skip : self.per_epoch])

    def __len__(self) -> int:
        return self.num_samples


class StreamingBlocks(TorchIterableDataset):
    """Blocks from a streaming ``datasets.IterableDataset`` (already sharded for this rank)."""

    def __init__(self, hf_iterable, seed: int, shuffle_buffer: int, max_blocks: Optional[int] = None, skip_fn=None):
        self.ds = hf_iterable
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_blocks = max_blocks
        self.skip_fn = skip_fn  # blocks of this epoch already trained on (after a resume)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        ds = self.ds
        if self.shuffle_buffer and self.shuffle_buffer > 1:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(self.epoch)
        if self.max_blocks is not None:
            ds = ds.take(self.max_blocks)
        skip = int(self.skip_fn()) if self.skip_fn is not None else 0
        if skip:
            ds = ds.skip(skip)
        for row in ds:
            yield torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))


# --------------------------------------------------------------------------------------------
# LightningDataModule
# --------------------------------------------------------------------------------------------
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
        val_fraction: share of the packed blocks held out for validation (0 disables validation).
        dataset_name: a Hugging Face hub dataset (or a local dataset directory) instead of files.
        dataset_config: its configuration name.
        dataset_split: its split.
        text_column: the text column of jsonl / parquet / hub data.
        sample_by: for plain text files: one document per ``"document"`` (file), ``"paragraph"``
            or ``"line"``.
        extensions: when scanning directories, keep only files with these suffixes (e.g. ``[".py"]``).
        exclude: file or directory names skipped when scanning directories.
        streaming: read, tokenise and pack lazily (for corpora larger than memory); each rank
            reads its own share of the stream. Needs ``--trainer.max_steps``.
        shuffle_buffer: streaming only: size of the block shuffle buffer.
        val_docs: streaming only, without ``val_files``: this many documents at the start of the
            stream are held out for validation.
        tokenizer: a tokenizer directory to load; if unset a byte-level BPE is trained on the
            training data (cached).
        tokenizer_vocab_size: size of the BPE to train (special tokens included).
        tokenizer_train_chars: train the BPE on at most this many characters of the corpus.
        seq_len: tokens per training sequence (blocks hold ``seq_len + 1``).
        batch_size: sequences per device and step.
        num_workers: DataLoader worker processes.
        num_proc: processes for ``datasets.map`` (default: all cores, up to 8).
        cache_dir: where tokenizers and packed data are cached (default ``$ZEROS_LM_CACHE`` or
            ``~/.cache/zeros_lm``).
        seed: document order, validation split and batch order.
    """

    def __init__(
        self,
        train_files: Union[list[str], str, None] = "stdlib",
        val_files: Union[list[str], str, None] = None,
        val_fraction: float = 0.01,
        dataset_name: Optional[str] = None,
        dataset_config: Optional[str] = None,
        dataset_split: str = "train",
        text_column: str = "text",
        sample_by: Literal["document", "paragraph", "line"] = "document",
        extensions: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        val_docs: int = 100,
        tokenizer: Optional[str] = None,
        tokenizer_vocab_size: int = 4096,
        tokenizer_train_chars: int = 50_000_000,
        seq_len: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        num_proc: Optional[int] = None,
        cache_dir: Optional[str] = None,
        seed: int = 1234,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.streaming = streaming
        self.num_proc = num_proc if num_proc is not None else max(1, min(8, os.cpu_count() or 1))
        self.cache_dir = cache_dir or default_cache_dir()
        self._train_loader: Optional[DataLoader] = None
        self.corpus: Optional[PreparedCorpus] = None

        self.train_files = None if dataset_name else resolve_files(train_files, extensions, exclude)
        self.val_files = resolve_files(val_files, extensions, exclude) if val_files else None
        if dataset_name is None and not self.train_files:
            raise DataError("no training data: give --data.train_files or --data.dataset_name")

        # Everything that can fail on bad input happens here, at construction, before any
        # training process starts; the work is cached, so the other ranks only load it.
        if streaming:
            self.tokenizer = self._streaming_tokenizer()
        else:
            self.corpus = prepare_corpus(
                train_files=self.train_files,
                val_files=self.val_files,
                dataset_name=dataset_name,
                dataset_config=dataset_config,
                dataset_split=dataset_split,
                text_column=text_column,
                sample_by=sample_by,
                tokenizer=tokenizer,
                tokenizer_vocab_size=tokenizer_vocab_size,
                tokenizer_train_chars=tokenizer_train_chars,
                seq_len=seq_len,
                val_fraction=val_fraction,
                seed=seed,
                num_proc=self.num_proc,
                cache_dir=self.cache_dir,
            )
            self.tokenizer = self.corpus.tokenizer

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

    # -- streaming -----------------------------------------------------------------------------
    def _stream_documents(self):
        hp = self.hparams
        if hp.dataset_name:
            return load_hub_documents(hp.dataset_name, hp.dataset_config, hp.dataset_split, hp.text_column, True)
        return load_documents(
            self.train_files, text_column=hp.text_column, sample_by=hp.sample_by, cache_dir=self.cache_dir, streaming=True
        )

    def _streaming_tokenizer(self):
        hp = self.hparams
        if hp.tokenizer:
            return load_tokenizer(hp.tokenizer)
        check_vocab_size(hp.tokenizer_vocab_size)
        cache_root = Path(self.cache_dir)
        key = _hash(_CACHE_VERSION, "stream", hp.dataset_name, hp.dataset_config, hp.dataset_split, hp.text_column,
                    _files_fingerprint(self.train_files) if self.train_files else None,
                    hp.tokenizer_vocab_size, hp.tokenizer_train_chars)
        tok_dir = cache_root / "tokenizers" / key
        with _cache_lock(cache_root):
            if (tok_dir / "tokenizer.json").is_file():
                return load_tokenizer(str(tok_dir))
            docs = self._stream_documents()
            try:
                sample = [t for batch in _text_sample(docs, hp.tokenizer_train_chars) for t in batch]
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                _unwrap_generation_error(e)
                raise
            if not any(t.strip() for t in sample):
                raise DataError("empty corpus: the streamed training data holds no text")
            tok = train_tokenizer(iter(sample), hp.tokenizer_vocab_size)
            _atomic_save_dir(lambda d: tok.save_pretrained(d), tok_dir)
            return tok

    def _streaming_blocks(self, docs, rank: int, world: int):
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
                "block_size": self.seq_len + 1,
                "eos_id": self.eos_token_id,
            },
        )

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # -- Lightning hooks -----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if self.streaming:
            docs = self._stream_documents()
            if not self.val_files:
                docs = docs.skip(self.hparams.val_docs)
            dataset = StreamingBlocks(
                self._streaming_blocks(docs, rank, world),
                self.seed,
                self.hparams.shuffle_buffer,
                skip_fn=lambda: self._batches_done(epoch_only=True) * self.batch_size,
            )
            loader = ResumableDataLoader(
                dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_blocks, drop_last=True
            )
        else:
            dataset = BlockDataset(self.corpus.train)
            if len(dataset) < world * self.batch_size:
                raise DataError(
                    f"corpus too small: {len(dataset)} training blocks cannot fill one batch of "
                    f"{self.batch_size} on each of {world} device(s); lower --data.batch_size or --data.seq_len"
                )
            sampler = BlockSampler(
                len(dataset),
                num_replicas=world,
                rank=rank,
                shuffle=True,
                seed=self.seed,
                batch_size=self.batch_size,
                position_fn=self._batches_done,
            )
            loader = ResumableDataLoader(
                dataset,
                batch_size=self.batch_size,
                sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=collate_blocks,
                drop_last=True,
                persistent_workers=self.num_workers > 0,
            )
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        rank, world = self._rank_world()
        if self.streaming:
            if self.val_files:
                docs = load_documents(self.val_files, text_column=self.hparams.text_column,
                                      sample_by=self.hparams.sample_by, cache_dir=self.cache_dir, streaming=True)
            else:
                if self.hparams.val_docs <= 0:
                    return []
                docs = self._stream_documents().take(self.hparams.val_docs)
            dataset = StreamingBlocks(self._streaming_blocks(docs, rank, world), self.seed, 0)
            return DataLoader(dataset, batch_size=self.batch_size, num_workers=0, collate_fn=collate_blocks)
        if self.corpus is None or self.corpus.val is None:
            return []
        dataset = BlockDataset(self.corpus.val)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=0, collate_fn=collate_blocks)

    def set_epoch(self, epoch: int) -> None:
        """Called by the training module at each epoch start (streaming datasets need it)."""
        loader = self._train_loader
        if loader is not None and isinstance(loader.dataset, StreamingBlocks):
            loader.dataset.set_epoch(epoch)

    def _batches_done(self, epoch_only: bool = False) -> int:
        """Training batches this rank has gone through (restored by Lightning on resume)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return int((progress.current if epoch_only else progress.total).processed)

